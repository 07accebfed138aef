// Package unikernel is the CRI RuntimeService and ImageService for
// unikernel pods, and the operator API: it turns CRI requests into VM specs
// and answers. In unilet a VM is always one QEMU microVM running one
// container. A sandbox is a network
// namespace plus metadata (no pause process); each container is one QEMU
// microVM whose lifecycle package vmm/manager owns. Objects live in
// typed stores (package cri/store) with explicit states, a lock per object
// and records written to disk before memory. One file per CRI verb.
package unikernel

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"path/filepath"
	"strings"
	"sync"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"k8s.io/cri-streaming/pkg/streaming"

	"github.com/unilet-dev/unilet/api/admin"
	"github.com/unilet-dev/unilet/cri/errdefs"
	"github.com/unilet-dev/unilet/cri/store"
	"github.com/unilet-dev/unilet/image"
	"github.com/unilet-dev/unilet/pkg/cni"
	"github.com/unilet-dev/unilet/pkg/metadata"
	"github.com/unilet-dev/unilet/pkg/netns"
	"github.com/unilet-dev/unilet/pkg/vmnet"
	"github.com/unilet-dev/unilet/vmm/manager"
	"github.com/unilet-dev/unilet/vmm/templates"
)

// RuntimeName is reported by Version.
const RuntimeName = "unilet"

// Config is what the VM service needs from the daemon.
type Config struct {
	QEMU     string // reported by Status
	Accel    string // resolved: kvm or tcg
	StateDir string // runtime sockets and per-VM state
	Version  string
	// Limits bound what pods may ask for (memory, vCPUs, library parameters).
	Limits Limits
	// Network runs CNI for pods; nil gives pods no network (unit tests).
	Network Network
	// NetNSDir holds the pods' named network namespaces.
	NetNSDir string
	// GuestNet is the fixed network every guest sees, translated to its pod
	// IP (zero: vmnet.DefaultGuestNetwork).
	GuestNet vmnet.Guest
	// LogRoots are the directories pods' log directories must lie in
	// (kubelet's podLogsDir, /var/log/pods by default).
	LogRoots []string
	// Templates holds the VM templates (nil: templates are off).
	Templates *templates.Store
	// TemplateWarm is how many warm clones of each template are kept ready
	// (0: none; a templated pod then restores its template at start).
	TemplateWarm int
	// Effective is the daemon's effective configuration (TOML), which the
	// operator API's Info reports.
	Effective []byte
}

// Network is the pod network (package cni in production).
type Network interface {
	Status() error
	Setup(ctx context.Context, p cni.PodInfo, netnsPath string) (*cni.Result, error)
	Teardown(ctx context.Context, p cni.PodInfo, netnsPath string) error
}

// Service serves CRI for unikernel pods.
type Service struct {
	runtimeapi.UnimplementedRuntimeServiceServer
	runtimeapi.UnimplementedImageServiceServer
	admin.UnimplementedAdminServer

	cfg     Config
	images  *image.Store
	meta    *metadata.Store // nil: state is not persisted (unit tests)
	vms     VMs
	stream  streaming.Server
	wrapURL func(pod, url string) (string, error) // see SetStreamServer

	sandboxes  *store.Store[sandboxMeta, sandboxStatus]
	containers *store.Store[containerMeta, containerStatus]
	// podNames guards the uniqueness check of new sandboxes' names and
	// podReserved, the names whose record is being written.
	podNames    sync.Mutex
	podReserved map[string]bool
	events      events
	adopting    adoptions // containers whose shim has not answered since the restart
	warm        *warmPool // nil: no warm clones
	started     time.Time
}

// New returns a Service running its VMs through vms (a *manager.Manager
// in the daemon); meta may be nil (no persistence). Call Load to restore
// state recorded by an earlier daemon.
func New(cfg Config, vms VMs, images *image.Store, meta *metadata.Store) (*Service, error) {
	cfg.Limits = cfg.Limits.withDefaults()
	if cfg.NetNSDir == "" {
		cfg.NetNSDir = netns.DefaultDir
	}
	if !cfg.GuestNet.Addr.IsValid() {
		cfg.GuestNet, _ = vmnet.ParseGuestNetwork(vmnet.DefaultGuestNetwork)
	}
	if abs, err := filepath.Abs(cfg.StateDir); err == nil {
		cfg.StateDir = abs
	}
	if vms == nil {
		return nil, errors.New("no VM manager")
	}
	s := &Service{cfg: cfg, images: images, meta: meta, vms: vms, podReserved: map[string]bool{}, started: time.Now()}
	if cfg.Templates != nil && cfg.TemplateWarm > 0 {
		s.warm = newWarmPool(s, cfg.TemplateWarm)
	}
	if meta != nil {
		s.sandboxes = store.New[sandboxMeta, sandboxStatus]("pod sandbox", sandboxSaver{meta})
		s.containers = store.New[containerMeta, containerStatus]("container", containerSaver{meta})
	} else {
		s.sandboxes = store.New[sandboxMeta, sandboxStatus]("pod sandbox", nil)
		s.containers = store.New[containerMeta, containerStatus]("container", nil)
	}
	return s, nil
}

// MatchSandbox reports whether id names a unikernel sandbox exactly or as
// a unique prefix (an ambiguous prefix is an error), from the ownership index.
func (s *Service) MatchSandbox(id string) (exact, found bool, err error) {
	return s.sandboxes.Match(id)
}

// MatchContainer is MatchSandbox for containers.
func (s *Service) MatchContainer(id string) (exact, found bool, err error) {
	return s.containers.Match(id)
}

// OwnsPod reports whether a unikernel sandbox exists for the pod md names
// (namespace, name and UID; any attempt).
func (s *Service) OwnsPod(md *runtimeapi.PodSandboxMetadata) bool {
	if md == nil || md.GetUid() == "" {
		return false
	}
	for _, sb := range s.sandboxes.List() {
		m := sb.Meta().Config.GetMetadata()
		if m.GetUid() == md.GetUid() && m.GetNamespace() == md.GetNamespace() && m.GetName() == md.GetName() {
			return true
		}
	}
	return false
}

func newID() string {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

// netnsPath is where the network namespace of sandbox id is bound.
func (s *Service) netnsPath(id string) string { return filepath.Join(s.cfg.NetNSDir, "unilet-"+id) }

// getContainer and getSandbox look objects up by ID or unique prefix.
func (s *Service) getContainer(id string) (*container, error) {
	if id == "" {
		return nil, errorf(errdefs.ErrInvalidArgument, "container ID is required")
	}
	return s.containers.Get(id)
}

func (s *Service) getSandbox(id string) (*sandbox, error) {
	if id == "" {
		return nil, errorf(errdefs.ErrInvalidArgument, "pod sandbox ID is required")
	}
	return s.sandboxes.Get(id)
}

// containersOf lists the containers of a sandbox.
func (s *Service) containersOf(sandboxID string) []*container {
	var out []*container
	for _, c := range s.containers.List() {
		if c.Meta().SandboxID == sandboxID {
			out = append(out, c)
		}
	}
	return out
}

// errorf is an error of kind (errdefs) with an operator's message.
func errorf(kind error, format string, a ...any) error { return errdefs.Errorf(kind, format, a...) }

// Shutdown prepares for the daemon's exit: it lets go of every VM, which
// keeps running under its shim (the next daemon reconnects).
func (s *Service) Shutdown() {
	s.warm.close()
	for _, c := range s.containers.List() {
		if vm := c.Status().vm; vm != nil {
			_ = vm.Close()
		}
	}
}

// runningVM returns the VM of a running container or a FailedPrecondition error.
func (s *Service) runningVM(id string) (manager.VM, error) {
	c, err := s.getContainer(id)
	if err != nil {
		return nil, err
	}
	if ad := s.adopting.get(c.ID()); ad != nil {
		return nil, errNotAdopted(c.ID(), ad)
	}
	st := c.Status()
	if st.State != store.ContainerRunning || st.vm == nil {
		return nil, errorf(errdefs.ErrFailedPrecondition, "container %s is not running (%s); only a running VM's console can be attached", c.ID(), st.State)
	}
	return st.vm, nil
}

// insideDir reports whether path is dir or below it, after cleaning.
func insideDir(path, dir string) bool {
	rel, err := filepath.Rel(dir, filepath.Clean(path))
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../") && !filepath.IsAbs(rel)
}
