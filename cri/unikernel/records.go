package unikernel

import (
	"context"
	"encoding/json"
	"time"

	"github.com/sirupsen/logrus"
	"google.golang.org/protobuf/proto"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/cri/store"
	"github.com/unilet-dev/unilet/image"
	"github.com/unilet-dev/unilet/pkg/cni"
	"github.com/unilet-dev/unilet/pkg/metadata"
	"github.com/unilet-dev/unilet/pkg/vmnet"
	"github.com/unilet-dev/unilet/vmm"
	"github.com/unilet-dev/unilet/vmm/manager"
)

// containerMeta is what a container is made of; it never changes.
type containerMeta struct {
	SandboxID string
	Config    *runtimeapi.ContainerConfig
	Image     *image.Image
	ImageRef  string
	LogPath   string
	CreatedAt time.Time
	Machine   vmm.MachineConfig // the VM booted cold (also a templated VM's fallback)
	Cgroup    string            // "" = none
	// Template is the template the VM starts from ("" = it boots).
	Template string
	// Idle is its scale-to-zero and autostart (nil: always running).
	Idle *vmm.IdleSpec
}

// containerStatus changes only through store.Object.Update.
type containerStatus struct {
	State     store.ContainerState
	StartedAt time.Time
	Exit      vmm.ExitStatus
	Pid       int
	Sizing    Sizing
	Warnings  []string // replaced, never appended to in place
	// Not persisted: the VM while one runs, a staged shim waiting for the
	// start, and how to cancel a start in flight.
	vm          manager.VM
	staged      *manager.Staged
	cancelStart context.CancelFunc
}

type container = store.Object[containerMeta, containerStatus]

// sandboxMeta is what a pod sandbox is made of; it never changes.
type sandboxMeta struct {
	Config    *runtimeapi.PodSandboxConfig
	Handler   string
	CreatedAt time.Time
	NetNS     string // the pod's network namespace ("" = no pod network)
	// rt holds what lives only as long as this daemon.
	rt *sandboxRuntime
}

// sandboxRuntime is a sandbox's not-persisted state.
// All of it is guarded by the sandbox's Lifecycle lock.
type sandboxRuntime struct {
	staged *manager.Staged
	// stagedLater delivers the staged warm clone, staged after CNI ADD
	// (takeStaged waits for it).
	stagedLater <-chan *manager.Staged
	// warmID and warmDigest are the container ID the staged warm clone
	// (if any) was made for and the template state it was made from.
	warmID, warmDigest string
	// routes is what the pod namespace routes to its VMs now (nil: not
	// known since the daemon started; routePod installs it anew).
	routes *vmnet.Routes
}

// takeStaged returns the staged shim or warm clone (nil: none), waiting
// for one being staged, and forgets it.
func (rt *sandboxRuntime) takeStaged() *manager.Staged {
	if rt.stagedLater != nil {
		rt.staged, rt.stagedLater = <-rt.stagedLater, nil
	}
	st := rt.staged
	rt.staged, rt.warmID, rt.warmDigest = nil, "", ""
	return st
}

type sandboxStatus struct {
	State store.SandboxState
	Net   *cni.Result
	MAC   string // the guest NIC's
	// Guest is the guest's fixed network, translated to the pod IP in the
	// pod's namespace (nil: bridged, a pod made before routed networking).
	Guest *vmnet.Guest
	// NetPending is true from before CNI ADD until DEL succeeded.
	NetPending bool
}

type sandbox = store.Object[sandboxMeta, sandboxStatus]

// Records as stored in meta.db. State is the CRI state (what versions
// before the explicit state machine wrote and read); Phase is the state.
type sandboxRecord struct {
	ID         string      `json:"id"`
	Config     []byte      `json:"config"`
	Handler    string      `json:"handler,omitempty"`
	CreatedAt  time.Time   `json:"createdAt"`
	State      int32       `json:"state"`
	Phase      string      `json:"phase,omitempty"`
	NetNS      string      `json:"netns,omitempty"`
	Net        *cni.Result `json:"net,omitempty"`
	MAC        string      `json:"mac,omitempty"`
	NetPending bool        `json:"netPending,omitempty"`
	// Guest is the routed guest network (nil: a pod made before routed
	// networking, whose guest NIC owns the pod IP through tc mirred).
	Guest *vmnet.Guest `json:"guest,omitempty"`
}

type containerRecord struct {
	ID        string            `json:"id"`
	SandboxID string            `json:"sandboxId"`
	Config    []byte            `json:"config"`
	ImageID   string            `json:"imageId"`
	ImageRef  string            `json:"imageRef"`
	LogPath   string            `json:"logPath,omitempty"`
	CreatedAt time.Time         `json:"createdAt"`
	StartedAt time.Time         `json:"startedAt,omitempty"`
	State     int32             `json:"state"`
	Phase     string            `json:"phase,omitempty"`
	Exit      vmm.ExitStatus    `json:"exit"`
	Machine   vmm.MachineConfig `json:"machine"`
	VMDir     string            `json:"vmDir,omitempty"` // informational; the directory follows from the ID
	Warnings  []string          `json:"warnings,omitempty"`
	Pid       int               `json:"pid,omitempty"`
	Sizing    Sizing            `json:"sizing"`
	Cgroup    string            `json:"cgroup,omitempty"`
	Template  string            `json:"template,omitempty"`
	Idle      *vmm.IdleSpec     `json:"idle,omitempty"`
}

func sandboxToRecord(id string, m sandboxMeta, st sandboxStatus) (sandboxRecord, error) {
	cfg, err := proto.Marshal(m.Config)
	if err != nil {
		return sandboxRecord{}, err
	}
	return sandboxRecord{ID: id, Config: cfg, Handler: m.Handler, CreatedAt: m.CreatedAt, State: int32(st.State.CRI()),
		Phase: string(st.State), NetNS: m.NetNS, Net: st.Net, MAC: st.MAC, NetPending: st.NetPending, Guest: st.Guest}, nil
}

func containerToRecord(id string, m containerMeta, st containerStatus) (containerRecord, error) {
	cfg, err := proto.Marshal(m.Config)
	if err != nil {
		return containerRecord{}, err
	}
	return containerRecord{ID: id, SandboxID: m.SandboxID, Config: cfg, ImageID: m.Image.ID, ImageRef: m.ImageRef, LogPath: m.LogPath,
		CreatedAt: m.CreatedAt, StartedAt: st.StartedAt, State: int32(st.State.CRI()), Phase: string(st.State), Exit: st.Exit,
		Machine: m.Machine, Warnings: st.Warnings, Pid: st.Pid, Sizing: st.Sizing, Cgroup: m.Cgroup, Template: m.Template, Idle: m.Idle}, nil
}

// sandboxSaver and containerSaver write records to meta.db.
type sandboxSaver struct{ db *metadata.Store }

func (s sandboxSaver) Save(id string, m sandboxMeta, st sandboxStatus) error {
	rec, err := sandboxToRecord(id, m, st)
	if err != nil {
		return err
	}
	return s.db.PutSandbox(id, rec)
}

func (s sandboxSaver) Delete(id string) error { return s.db.DeleteSandbox(id) }

type containerSaver struct{ db *metadata.Store }

func (s containerSaver) Save(id string, m containerMeta, st containerStatus) error {
	rec, err := containerToRecord(id, m, st)
	if err != nil {
		return err
	}
	return s.db.PutContainer(id, rec)
}

func (s containerSaver) Delete(id string) error { return s.db.DeleteContainer(id) }

// ownerRecord is the copy of a running VM's records kept in its directory
// (VMs.WriteOwner): what a daemon whose meta.db was corrupted rebuilds the
// pod and container from.
type ownerRecord struct {
	Sandbox   json.RawMessage `json:"sandbox"`
	Container json.RawMessage `json:"container"`
}

// podFields are the log fields naming a pod: its sandbox ID and
// namespace/name, as an operator finds it in kubectl.
func podFields(id string, cfg *runtimeapi.PodSandboxConfig) logrus.Fields {
	md := cfg.GetMetadata()
	return logrus.Fields{"sandbox": id, "pod": md.GetNamespace() + "/" + md.GetName()}
}

// ctrLog is the log entry of a container's lifecycle step: its pod
// (podFields), ID and name.
func (s *Service) ctrLog(c *container) *logrus.Entry {
	m := c.Meta()
	var cfg *runtimeapi.PodSandboxConfig
	if sb, err := s.sandboxes.Get(m.SandboxID); err == nil {
		cfg = sb.Meta().Config
	}
	return logrus.WithFields(podFields(m.SandboxID, cfg)).WithFields(logrus.Fields{"container": c.ID(), "name": m.Config.GetMetadata().GetName()})
}
