package unikernel

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/unilet-dev/unilet/api/admin"
	"github.com/unilet-dev/unilet/cri/errdefs"
	"github.com/unilet-dev/unilet/cri/store"
	"github.com/unilet-dev/unilet/vmm"
	"github.com/unilet-dev/unilet/vmm/shim"
)

// The read-only introspection of the operator API (uniletctl ps, inspect):
// what the stores hold, what the shims report and what /proc shows of the
// QEMUs they run.

// ListPods lists the unikernel pods and their containers' VMs.
func (s *Service) ListPods(ctx context.Context, r *admin.ListPodsRequest) (*admin.ListPodsResponse, error) {
	ctx, cancel := context.WithTimeout(ctx, scrapeTimeout)
	defer cancel()
	var out []*admin.Pod
	for _, sb := range s.sandboxes.List() {
		out = append(out, s.podInfo(ctx, sb))
	}
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if a.Namespace+"/"+a.Name != b.Namespace+"/"+b.Name {
			return a.Namespace+"/"+a.Name < b.Namespace+"/"+b.Name
		}
		return a.CreatedUnixNano < b.CreatedUnixNano
	})
	return &admin.ListPodsResponse{Pods: out}, nil
}

func (s *Service) podInfo(ctx context.Context, sb *sandbox) *admin.Pod {
	m, st := sb.Meta(), sb.Status()
	md := m.Config.GetMetadata()
	p := &admin.Pod{Id: sb.ID(), Namespace: md.GetNamespace(), Name: md.GetName(), State: string(st.State),
		Ip: primaryIP(st.Net), CreatedUnixNano: m.CreatedAt.UnixNano(), RuntimeHandler: m.Handler}
	ctrs := s.containersOf(sb.ID())
	sort.Slice(ctrs, func(i, j int) bool { return ctrs[i].Meta().CreatedAt.Before(ctrs[j].Meta().CreatedAt) })
	for _, c := range ctrs {
		p.Vms = append(p.Vms, s.vmInfo(ctx, c))
	}
	return p
}

func (s *Service) vmInfo(ctx context.Context, c *container) *admin.VM {
	m, st := c.Meta(), c.Status()
	v := &admin.VM{ContainerId: c.ID(), Name: m.Config.GetMetadata().GetName(), Attempt: m.Config.GetMetadata().GetAttempt(),
		State: string(st.State), Image: imageName(m), ImageId: m.Image.ID, CreatedUnixNano: m.CreatedAt.UnixNano(),
		ExitCode: st.Exit.Code, Reason: st.Exit.Reason, MemoryMib: int32(m.Machine.MemoryMiB), Vcpus: int32(m.Machine.VCPUs),
		Accel: m.Machine.Accel, Template: m.Template, JailUid: -1, LogPath: m.LogPath}
	if !st.StartedAt.IsZero() {
		v.StartedUnixNano = st.StartedAt.UnixNano()
	}
	if !st.Exit.FinishedAt.IsZero() {
		v.FinishedUnixNano = st.Exit.FinishedAt.UnixNano()
	}
	if st.State.Live() {
		v.Pid = int32(st.Pid)
	}
	if s.adopting.get(c.ID()) != nil {
		v.State = "unknown"
	} else if st.State == store.ContainerRunning && st.vm != nil {
		if suspended, _, _, err := st.vm.Idle(ctx); err == nil && suspended {
			v.State = "suspended"
		}
	}
	if spec, err := s.vmSpec(c.ID()); err == nil && spec.Jail != nil {
		v.JailUid = int64(spec.Jail.UID)
	}
	return v
}

// imageName is the image as the pod names it: kubelet passes the resolved
// image ID in ContainerConfig.image and the pod's own name beside it.
func imageName(m containerMeta) string {
	for _, n := range []string{m.Config.GetImage().GetUserSpecifiedImage(), m.ImageRef, m.Config.GetImage().GetImage()} {
		if n != "" && !strings.HasPrefix(n, "sha256:") {
			return n
		}
	}
	return m.Config.GetImage().GetImage()
}

// vmSpec reads the spec a container's shim runs its VM by.
func (s *Service) vmSpec(id string) (vmm.VMSpec, error) {
	dir, err := s.vms.Dir(id)
	if err != nil {
		return vmm.VMSpec{}, err
	}
	return shim.ReadSpec(dir)
}

// resolve finds the pod or container name names: an ID or unique ID
// prefix of either, NAMESPACE/POD (its newest sandbox) or
// NAMESPACE/POD/CONTAINER (that container's newest attempt).
func (s *Service) resolve(name string) (*sandbox, *container, error) {
	if name == "" {
		return nil, nil, errorf(errdefs.ErrInvalidArgument, "name a pod or container: ID, ID prefix, NAMESPACE/POD or NAMESPACE/POD/CONTAINER")
	}
	parts := strings.Split(name, "/")
	switch len(parts) {
	case 1:
		sb, serr := s.sandboxes.Get(name)
		c, cerr := s.containers.Get(name)
		switch {
		case serr == nil && cerr == nil:
			return nil, nil, errorf(errdefs.ErrInvalidArgument, "%q is a prefix of pod %s and of container %s: give more of the ID", name, sb.ID(), c.ID())
		case serr == nil:
			return sb, nil, nil
		case cerr == nil:
			sb, _ := s.sandboxes.Get(c.Meta().SandboxID)
			return sb, c, nil
		case errors.Is(serr, store.ErrAmbiguous):
			return nil, nil, serr
		case errors.Is(cerr, store.ErrAmbiguous):
			return nil, nil, cerr
		}
		return nil, nil, errorf(errdefs.ErrNotFound, "no unikernel pod or container %q on this node (uniletctl ps lists them)", name)
	case 2, 3:
		var sb *sandbox
		for _, cand := range s.sandboxes.List() {
			md := cand.Meta().Config.GetMetadata()
			if md.GetNamespace() == parts[0] && md.GetName() == parts[1] && (sb == nil || cand.Meta().CreatedAt.After(sb.Meta().CreatedAt)) {
				sb = cand
			}
		}
		if sb == nil {
			return nil, nil, errorf(errdefs.ErrNotFound, "no unikernel pod %s/%s on this node (uniletctl ps lists them)", parts[0], parts[1])
		}
		if len(parts) == 2 {
			return sb, nil, nil
		}
		var c *container
		for _, cand := range s.containersOf(sb.ID()) {
			if cand.Meta().Config.GetMetadata().GetName() == parts[2] &&
				(c == nil || cand.Meta().Config.GetMetadata().GetAttempt() > c.Meta().Config.GetMetadata().GetAttempt()) {
				c = cand
			}
		}
		if c == nil {
			return nil, nil, errorf(errdefs.ErrNotFound, "pod %s/%s has no container %q", parts[0], parts[1], parts[2])
		}
		return sb, c, nil
	}
	return nil, nil, errorf(errdefs.ErrInvalidArgument, "%q: want an ID, ID prefix, NAMESPACE/POD or NAMESPACE/POD/CONTAINER", name)
}

// resolveContainer is resolve for verbs that need a container: a pod with
// one container names it.
func (s *Service) resolveContainer(name string) (*container, error) {
	sb, c, err := s.resolve(name)
	if err != nil || c != nil {
		return c, err
	}
	ctrs := s.containersOf(sb.ID())
	names := map[string]bool{}
	var newest *container
	for _, cand := range ctrs {
		names[cand.Meta().Config.GetMetadata().GetName()] = true
		if newest == nil || cand.Meta().CreatedAt.After(newest.Meta().CreatedAt) {
			newest = cand
		}
	}
	switch len(names) {
	case 0:
		return nil, errorf(errdefs.ErrNotFound, "pod %s has no containers", name)
	case 1:
		return newest, nil
	}
	var list []string
	for n := range names {
		list = append(list, n)
	}
	sort.Strings(list)
	return nil, errorf(errdefs.ErrInvalidArgument, "pod %s has containers %s: name one as NAMESPACE/POD/CONTAINER", name, strings.Join(list, ", "))
}

// containerInspect is what `uniletctl inspect CONTAINER` shows.
type containerInspect struct {
	Kind      string       `json:"kind"`
	ID        string       `json:"id"`
	Name      string       `json:"name"`
	Attempt   uint32       `json:"attempt"`
	Pod       string       `json:"pod"`
	PodID     string       `json:"podId"`
	State     string       `json:"state"`
	Image     string       `json:"image"`
	ImageID   string       `json:"imageId"`
	CreatedAt time.Time    `json:"createdAt"`
	StartedAt *time.Time   `json:"startedAt,omitempty"`
	LastExit  *exitInspect `json:"lastExit,omitempty"`
	Warnings  []string     `json:"warnings,omitempty"`
	VM        vmInspect    `json:"vm"`
}

type vmInspect struct {
	Accel     string `json:"accel"`
	MemoryMiB int    `json:"memoryMiB"`
	VCPUs     int    `json:"vcpus"`
	Template  string `json:"template,omitempty"`
	Restored  bool   `json:"restoredFromTemplate,omitempty"`
	// QEMUArgv is QEMU's command line: as the running process has it, else
	// as the shim would execute it (argvSource says which).
	QEMUArgv   []string         `json:"qemuArgv,omitempty"`
	ArgvSource string           `json:"argvSource,omitempty"`
	Cmdline    string           `json:"guestCmdline"`
	QEMUPid    int              `json:"qemuPid,omitempty"`
	ShimPid    int              `json:"shimPid,omitempty"`
	Jail       *jailInspect     `json:"jail,omitempty"`
	Cgroup     string           `json:"cgroup,omitempty"`
	Idle       *vmm.IdleSpec    `json:"scaleToZero,omitempty"`
	Dir        string           `json:"dir,omitempty"`
	Files      map[string]int64 `json:"files,omitempty"` // in Dir, with sizes
	LogPath    string           `json:"logPath"`
}

// jailInspect is who a jailed QEMU runs as.
type jailInspect struct {
	UID uint32 `json:"uid"`
	GID uint32 `json:"gid"`
	Pod string `json:"sharedWithPod,omitempty"` // the pod whose VMs share the ids
}

// exitInspect is a container's last exit.
type exitInspect struct {
	Code       int32     `json:"code"`
	Reason     string    `json:"reason"`
	Message    string    `json:"message,omitempty"`
	FinishedAt time.Time `json:"finishedAt"`
}

// podInspect is what `uniletctl inspect POD` shows.
type podInspect struct {
	Kind           string            `json:"kind"`
	ID             string            `json:"id"`
	Namespace      string            `json:"namespace"`
	Name           string            `json:"name"`
	UID            string            `json:"uid"`
	State          string            `json:"state"`
	IP             string            `json:"ip,omitempty"`
	CreatedAt      time.Time         `json:"createdAt"`
	RuntimeHandler string            `json:"runtimeHandler,omitempty"`
	Containers     []podContainer    `json:"containers"`
	NetNS          string            `json:"netns,omitempty"`
	MAC            string            `json:"mac,omitempty"`
	GuestNet       any               `json:"guestNetwork,omitempty"`
	Labels         map[string]string `json:"labels,omitempty"`
	Annotations    map[string]string `json:"annotations,omitempty"`
	LogDir         string            `json:"logDirectory,omitempty"`
	Cgroup         string            `json:"cgroupParent,omitempty"`
}

// podContainer is one container in podInspect.
type podContainer struct {
	ID      string `json:"id"`
	Name    string `json:"name"`
	Attempt uint32 `json:"attempt"`
	State   string `json:"state"`
}

// Inspect describes one pod or container as JSON.
func (s *Service) Inspect(ctx context.Context, r *admin.InspectRequest) (*admin.InspectResponse, error) {
	sb, c, err := s.resolve(r.GetName())
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, scrapeTimeout)
	defer cancel()
	if c == nil {
		m, st := sb.Meta(), sb.Status()
		p := s.podInfo(ctx, sb)
		doc := podInspect{Kind: "pod", ID: p.Id, Namespace: p.Namespace, Name: p.Name, UID: m.Config.GetMetadata().GetUid(), State: p.State,
			IP: p.Ip, CreatedAt: m.CreatedAt, RuntimeHandler: p.RuntimeHandler, Containers: []podContainer{}, NetNS: m.NetNS, MAC: st.MAC, Labels: m.Config.GetLabels(),
			Annotations: m.Config.GetAnnotations(), LogDir: m.Config.GetLogDirectory(), Cgroup: m.Config.GetLinux().GetCgroupParent()}
		if st.Guest != nil {
			doc.GuestNet = st.Guest
		}
		for _, v := range p.Vms {
			doc.Containers = append(doc.Containers, podContainer{ID: v.ContainerId, Name: v.Name, Attempt: v.Attempt, State: v.State})
		}
		b, err := indentJSON(doc)
		return &admin.InspectResponse{Kind: "pod", Id: sb.ID(), Json: b}, err
	}
	doc := any(s.inspectContainer(ctx, sb, c))
	if r.GetRedact() {
		secrets := envValues(c)
		raw, err := json.Marshal(doc)
		if err != nil {
			return nil, err
		}
		var generic any
		if err := json.Unmarshal(raw, &generic); err != nil {
			return nil, err
		}
		doc = redactStrings(generic, secrets)
	}
	b, err := indentJSON(doc)
	return &admin.InspectResponse{Kind: "container", Id: c.ID(), Json: b}, err
}

func (s *Service) inspectContainer(ctx context.Context, sb *sandbox, c *container) containerInspect {
	m, st := c.Meta(), c.Status()
	info := s.vmInfo(ctx, c)
	doc := containerInspect{Kind: "container", ID: c.ID(), Name: info.Name, Attempt: info.Attempt, PodID: m.SandboxID, State: info.State,
		Image: info.Image, ImageID: m.Image.ID, CreatedAt: m.CreatedAt, Warnings: st.Warnings}
	if sb != nil {
		md := sb.Meta().Config.GetMetadata()
		doc.Pod = md.GetNamespace() + "/" + md.GetName()
	}
	if !st.StartedAt.IsZero() {
		doc.StartedAt = &st.StartedAt
	}
	if !st.Exit.FinishedAt.IsZero() {
		doc.LastExit = &exitInspect{Code: st.Exit.Code, Reason: st.Exit.Reason, Message: st.Exit.Message, FinishedAt: st.Exit.FinishedAt}
	}
	vm := vmInspect{Accel: m.Machine.Accel, MemoryMiB: m.Machine.MemoryMiB, VCPUs: m.Machine.VCPUs, Template: m.Template,
		Cmdline: m.Machine.Cmdline, Cgroup: m.Cgroup, Idle: m.Idle, LogPath: m.LogPath}
	if dir, err := s.vms.Dir(c.ID()); err == nil {
		if ents, err := os.ReadDir(dir); err == nil {
			vm.Dir, vm.Files = dir, map[string]int64{}
			for _, e := range ents {
				if fi, err := e.Info(); err == nil {
					vm.Files[e.Name()] = fi.Size()
				}
			}
		}
	}
	spec, specErr := s.vmSpec(c.ID())
	if specErr == nil {
		vm.Restored = spec.Restore != nil
		if j := spec.Jail; j != nil {
			vm.Jail = &jailInspect{UID: j.UID, GID: j.GID, Pod: j.Pod}
		}
		vm.Cmdline = spec.Machine.Cmdline
	}
	if st.State.Live() && st.vm != nil && st.Pid > 0 {
		if argv, shimPid, ok := s.vms.QEMUOf(c.ID(), st.Pid); ok {
			vm.QEMUArgv, vm.ArgvSource, vm.QEMUPid, vm.ShimPid = argv, "/proc/"+strconv.Itoa(st.Pid)+"/cmdline", st.Pid, shimPid
		}
	}
	if vm.QEMUArgv == nil && specErr == nil {
		if argv, err := vmm.BuildArgv(spec.Machine); err == nil {
			vm.QEMUArgv, vm.ArgvSource = append([]string{spec.QEMU}, argv...), "spec.json (the VM does not run)"
		}
	}
	if vm.QEMUArgv == nil { // no VM directory: what a cold boot of the record runs
		if argv, err := vmm.BuildArgv(m.Machine); err == nil {
			vm.QEMUArgv, vm.ArgvSource = append([]string{s.cfg.QEMU}, argv...), "the container's record (no VM directory: the VM does not run)"
		}
	}
	doc.VM = vm
	return doc
}

// envValues are the values of a container's environment (what redaction
// hides).
func envValues(c *container) []string {
	var out []string
	for _, e := range c.Meta().Config.GetEnvs() {
		if len(e.GetValue()) > 0 {
			out = append(out, string(e.GetValue()))
		}
	}
	return out
}
