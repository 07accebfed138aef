// Package vm is the CRI RuntimeService and ImageService for unikernel pods:
// a sandbox is metadata plus a log directory (no pause process), each
// container is one QEMU microVM supervised by package runtime, images come
// from the Unikraft image store. One file per group of CRI verbs.
package vm

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"k8s.io/cri-streaming/pkg/streaming"

	"github.com/unilet-dev/unilet/image"
	"github.com/unilet-dev/unilet/pkg/cni"
	"github.com/unilet-dev/unilet/pkg/metadata"
	"github.com/unilet-dev/unilet/pkg/netns"
	"github.com/unilet-dev/unilet/runtime"
	"github.com/unilet-dev/unilet/runtime/shim"
)

// RuntimeName is reported by Version.
const RuntimeName = "unilet"

// Config is what the VM service needs from the daemon.
type Config struct {
	QEMU     string
	Accel    string // resolved: kvm or tcg
	StateDir string // runtime sockets and per-VM state
	Version  string
	// ShimBinary is unilet-shim: each VM runs under its own shim so VMs
	// outlive the daemon. Required to start VMs.
	ShimBinary string
	// Limits bound what pods may ask for (memory, vCPUs, library parameters).
	Limits Limits
	// Network runs CNI for pods; nil gives pods no network (unit tests).
	Network Network
	// NetNSDir holds the pods' named network namespaces.
	NetNSDir string
	// CgroupRoot is the cgroup parent of VMs whose pod names none;
	// "" disables cgroups (unit tests).
	CgroupRoot string
	// ShimPool hands out pre-forked shims (nil: every VM spawns its own).
	ShimPool *shim.Pool
}

// Network is the pod network (package cni in production).
type Network interface {
	Status() error
	Setup(ctx context.Context, p cni.PodInfo, netnsPath string) (*cni.Result, error)
	Teardown(ctx context.Context, p cni.PodInfo, netnsPath string) error
}

// vmHandle is a running VM behind its shim (*shim.Handle); an interface so
// the CRI service can be tested without processes.
type vmHandle interface {
	Done() <-chan struct{}
	Exit() runtime.ExitStatus
	Stop(timeout time.Duration) runtime.ExitStatus
	Kill()
	ReopenLog() error
	Pid() int
	StartedAt() time.Time
	Stats() (runtime.Stats, error)
	Attach(ctx context.Context, in io.Reader, out io.Writer) error
	// Release frees what supervises an ended VM (ends its shim).
	Release()
	// Close drops the daemon's connection; the VM goes on.
	Close() error
}

// Service serves CRI for unikernel pods.
type Service struct {
	runtimeapi.UnimplementedRuntimeServiceServer
	runtimeapi.UnimplementedImageServiceServer

	cfg    Config
	images *image.Store
	meta   *metadata.Store // nil: state is not persisted (unit tests)
	stream streaming.Server

	staged     atomic.Int32 // staged shims alive (≤ maxStaged)
	mu         sync.Mutex
	sandboxes  map[string]*sandbox
	containers map[string]*container
}

type sandbox struct {
	id        string
	config    *runtimeapi.PodSandboxConfig
	handler   string
	createdAt time.Time
	state     runtimeapi.PodSandboxState
	// Pod network: the namespace, the CNI result and the MAC the VM's NIC
	// takes over. netPending is true from before CNI ADD until DEL succeeded.
	netns      string
	net        *cni.Result
	mac        string
	netPending bool
	netMu      sync.Mutex // serialises teardown
	// staged is an idle shim already placed in a staging cgroup for the
	// pod's next VM (not persisted: a restarted daemon reaps idle shims).
	staged *stagedShim
}

// stagedShim is a pre-forked shim waiting in a staging cgroup that becomes
// the container's cgroup by a rename (no migration on the start path).
type stagedShim struct {
	idle   *shim.Idle
	cgroup string
}

// maxStaged bounds the shims waiting staged for pods whose container is not
// started yet (memory, and a burst of refills when many pods are created).
const maxStaged = 8

type container struct {
	id        string
	sandboxID string
	config    *runtimeapi.ContainerConfig
	image     *image.Image
	imageRef  string
	logPath   string
	createdAt time.Time
	startedAt time.Time
	state     runtimeapi.ContainerState
	exit      runtime.ExitStatus
	machine   runtime.MachineConfig
	sizing    Sizing
	cgroup    string     // cgroup path of the VM ("" = none)
	staged    *shim.Idle // a shim already in cgroup, waiting for StartContainer
	vmDir     string
	vm        vmHandle
	warnings  []string
}

// New returns a Service; meta may be nil (no persistence). Call Load to
// restore state recorded by an earlier daemon.
func New(cfg Config, images *image.Store, meta *metadata.Store) *Service {
	cfg.Limits = cfg.Limits.withDefaults()
	if cfg.NetNSDir == "" {
		cfg.NetNSDir = netns.DefaultDir
	}
	return &Service{cfg: cfg, images: images, meta: meta, sandboxes: map[string]*sandbox{}, containers: map[string]*container{}}
}

// OwnsSandbox reports whether id is a unikernel sandbox (for routing).
func (s *Service) OwnsSandbox(id string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.sandboxes[id]
	return ok
}

// OwnsPod reports whether a unikernel sandbox exists for the pod md names
// (namespace, name and UID; any attempt).
func (s *Service) OwnsPod(md *runtimeapi.PodSandboxMetadata) bool {
	if md == nil || md.GetUid() == "" {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, sb := range s.sandboxes {
		m := sb.config.GetMetadata()
		if m.GetUid() == md.GetUid() && m.GetNamespace() == md.GetNamespace() && m.GetName() == md.GetName() {
			return true
		}
	}
	return false
}

// OwnsContainer reports whether id is a unikernel container (for routing).
func (s *Service) OwnsContainer(id string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.containers[id]
	return ok
}

func newID() string {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

func (s *Service) vmDir(id string) string {
	// Unix socket paths are limited to 108 bytes: keep per-VM paths short.
	return filepath.Join(s.cfg.StateDir, "vm", id[:16])
}

// lookupID finds id in m by full ID or unique prefix (≥ 6 characters), as
// crictl users expect. kind names the object in errors.
func lookupID[T any](m map[string]T, id, kind string) (T, error) {
	var zero T
	if id == "" {
		return zero, status.Errorf(codes.InvalidArgument, "%s ID is required", kind)
	}
	if v, ok := m[id]; ok {
		return v, nil
	}
	var found []T
	if len(id) >= 6 {
		for k, v := range m {
			if strings.HasPrefix(k, id) {
				found = append(found, v)
			}
		}
	}
	switch len(found) {
	case 0:
		return zero, status.Errorf(codes.NotFound, "%s %q not found", kind, id)
	case 1:
		return found[0], nil
	}
	return zero, status.Errorf(codes.InvalidArgument, "%s ID prefix %q is ambiguous", kind, id)
}

// sandboxLocked and containerLocked look objects up; callers hold s.mu.
func (s *Service) sandboxLocked(id string) (*sandbox, error) {
	return lookupID(s.sandboxes, id, "pod sandbox")
}

func (s *Service) containerLocked(id string) (*container, error) {
	return lookupID(s.containers, id, "container")
}

// currentLocked looks a container up and brings its state up to date (a VM
// that ended becomes EXITED). Caller holds s.mu.
func (s *Service) currentLocked(id string) (*container, error) {
	c, err := s.containerLocked(id)
	if err != nil {
		return nil, err
	}
	s.refresh(c)
	return c, nil
}

// containerIDsOf lists the containers of a sandbox; callers hold s.mu.
func (s *Service) containerIDsOf(sandboxID string) []string {
	var ids []string
	for _, c := range s.containers {
		if c.sandboxID == sandboxID {
			ids = append(ids, c.id)
		}
	}
	return ids
}

// refresh moves a running container whose VM ended to EXITED. Caller holds s.mu.
func (s *Service) refresh(c *container) {
	if c.state != runtimeapi.ContainerState_CONTAINER_RUNNING || c.vm == nil {
		return
	}
	select {
	case <-c.vm.Done():
		c.exit = c.vm.Exit()
		c.state = runtimeapi.ContainerState_CONTAINER_EXITED
		c.vm.Release()
		_ = os.RemoveAll(c.vmDir)
		s.saveContainer(c)
		s.releaseCgroup(c)
	default:
	}
}

func errorf(code codes.Code, format string, a ...any) error {
	return status.Error(code, fmt.Sprintf(format, a...))
}

// Shutdown prepares for the daemon's exit: it lets go of every VM, which
// keeps running under its shim (the next daemon reconnects).
func (s *Service) Shutdown() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.containers {
		if c.vm != nil {
			_ = c.vm.Close()
		}
	}
}

// runningVM returns the VM of a running container or a FailedPrecondition error.
func (s *Service) runningVM(id string) (vmHandle, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c, err := s.currentLocked(id)
	if err != nil {
		return nil, err
	}
	if c.state != runtimeapi.ContainerState_CONTAINER_RUNNING || c.vm == nil {
		return nil, errorf(codes.FailedPrecondition, "container %s is not running (%s); only a running VM's console can be attached", c.id, c.state)
	}
	return c.vm, nil
}
