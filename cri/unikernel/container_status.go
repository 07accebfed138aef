package unikernel

import (
	"context"
	"fmt"
	"net"
	"strings"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/cri/errdefs"
	"github.com/unilet-dev/unilet/cri/store"
	"github.com/unilet-dev/unilet/pkg/cni"
	"github.com/unilet-dev/unilet/pkg/vmnet"
	"github.com/unilet-dev/unilet/vmm/manager"
)

// containerMatches applies the ID-prefix, pod-prefix and label filters of CRI lists.
func containerMatches(c *container, idPrefix, podPrefix string, selector map[string]string) bool {
	return strings.HasPrefix(c.ID(), idPrefix) && strings.HasPrefix(c.Meta().SandboxID, podPrefix) && labelsMatch(c.Meta().Config.GetLabels(), selector)
}

func containerToAPI(c *container, st containerStatus) *runtimeapi.Container {
	m := c.Meta()
	return &runtimeapi.Container{
		Id: c.ID(), PodSandboxId: m.SandboxID, Metadata: m.Config.GetMetadata(),
		Image: m.Config.GetImage(), ImageRef: m.Image.ID, ImageId: m.Image.ID, State: st.State.CRI(), CreatedAt: m.CreatedAt.UnixNano(),
		Labels: m.Config.GetLabels(), Annotations: m.Config.GetAnnotations(),
	}
}

// ContainerStatus reports state, timestamps, exit code and reason. It
// reads the recorded status only: it answers while a stop or start of the
// same container is in progress.
func (s *Service) ContainerStatus(ctx context.Context, r *runtimeapi.ContainerStatusRequest) (*runtimeapi.ContainerStatusResponse, error) {
	c, err := s.getContainer(r.GetContainerId())
	if err != nil {
		return nil, err
	}
	m, cur := c.Meta(), c.Status()
	st := &runtimeapi.ContainerStatus{
		Id: c.ID(), Metadata: m.Config.GetMetadata(), State: cur.State.CRI(), CreatedAt: m.CreatedAt.UnixNano(),
		Image: m.Config.GetImage(), ImageRef: m.Image.ID, ImageId: m.Image.ID,
		Labels: m.Config.GetLabels(), Annotations: m.Config.GetAnnotations(), LogPath: m.LogPath,
		Resources: &runtimeapi.ContainerResources{Linux: &runtimeapi.LinuxContainerResources{
			CpuQuota: cur.Sizing.CPUQuota, CpuPeriod: cur.Sizing.CPUPeriod, CpuShares: cur.Sizing.CPUShares, MemoryLimitInBytes: cur.Sizing.MemoryLimit}},
	}
	if !cur.StartedAt.IsZero() {
		st.StartedAt = cur.StartedAt.UnixNano()
	}
	if st.State == runtimeapi.ContainerState_CONTAINER_EXITED {
		st.FinishedAt = cur.Exit.FinishedAt.UnixNano()
		st.ExitCode = cur.Exit.Code
		st.Reason = cur.Exit.Reason
		st.Message = cur.Exit.Message
	}
	if ad := s.adopting.get(c.ID()); ad != nil {
		st.State, st.Reason, st.Message = ad.reason()
	} else if m.Idle != nil && cur.State == store.ContainerRunning && cur.vm != nil {
		st.Reason, st.Message = idleReason(ctx, cur.vm, m.Idle.Paused)
	}
	resp := &runtimeapi.ContainerStatusResponse{Status: st}
	if r.GetVerbose() {
		info := map[string]string{"state": string(cur.State), "accel": m.Machine.Accel, "cmdline": m.Machine.Cmdline,
			"memoryMiB": fmt.Sprint(m.Machine.MemoryMiB), "vcpus": fmt.Sprint(m.Machine.VCPUs)}
		if cur.Pid != 0 && cur.State.Live() {
			info["pid"] = fmt.Sprint(cur.Pid)
		}
		if len(cur.Warnings) > 0 {
			info["warnings"] = strings.Join(cur.Warnings, "; ")
		}
		resp.Info = info
	}
	return resp, nil
}

// ListContainers lists unikernel containers matching the filter.
func (s *Service) ListContainers(ctx context.Context, r *runtimeapi.ListContainersRequest) (*runtimeapi.ListContainersResponse, error) {
	f := r.GetFilter()
	var out []*runtimeapi.Container
	for _, c := range s.containers.List() {
		if !containerMatches(c, f.GetId(), f.GetPodSandboxId(), f.GetLabelSelector()) {
			continue
		}
		api := containerToAPI(c, c.Status())
		if ad := s.adopting.get(c.ID()); ad != nil {
			api.State, _, _ = ad.reason()
		}
		if f.GetState() != nil && f.GetState().GetState() != api.State {
			continue
		}
		out = append(out, api)
	}
	return &runtimeapi.ListContainersResponse{Containers: out}, nil
}

// ReopenContainerLog reopens the CRI log after kubelet rotated it.
func (s *Service) ReopenContainerLog(ctx context.Context, r *runtimeapi.ReopenContainerLogRequest) (*runtimeapi.ReopenContainerLogResponse, error) {
	c, err := s.getContainer(r.GetContainerId())
	if err != nil {
		return nil, err
	}
	st := c.Status()
	if st.State != store.ContainerRunning || st.vm == nil {
		return nil, errorf(errdefs.ErrFailedPrecondition, "container %s is not running; its log cannot be reopened", c.ID())
	}
	ctx, cancel := context.WithTimeout(ctx, manager.CallTimeout)
	defer cancel()
	if err := st.vm.ReopenLog(ctx); err != nil {
		return nil, fmt.Errorf("reopen the log of container %s: %w", c.ID(), err)
	}
	return &runtimeapi.ReopenContainerLogResponse{}, nil
}

const noExec = "unikernel pods run a single application in a VM with no shell or process model: %s is not possible. " +
	"Use the console (kubectl logs) instead"

// ExecSync is impossible in a unikernel.
func (s *Service) ExecSync(ctx context.Context, r *runtimeapi.ExecSyncRequest) (*runtimeapi.ExecSyncResponse, error) {
	return nil, errorf(errdefs.ErrUnimplemented, noExec, "exec")
}

// Exec is impossible in a unikernel.
func (s *Service) Exec(ctx context.Context, r *runtimeapi.ExecRequest) (*runtimeapi.ExecResponse, error) {
	return nil, errorf(errdefs.ErrUnimplemented, noExec, "exec")
}

// PortForward returns a streaming URL that forwards to the pod's guest.
func (s *Service) PortForward(ctx context.Context, r *runtimeapi.PortForwardRequest) (*runtimeapi.PortForwardResponse, error) {
	sb, err := s.getSandbox(r.GetPodSandboxId())
	if err != nil {
		return nil, err
	}
	if _, err := s.podTarget(sb.ID()); err != nil {
		return nil, err
	}
	if s.stream == nil {
		return nil, errorf(errdefs.ErrUnavailable, "the streaming server is not running")
	}
	for _, p := range r.GetPort() {
		if p <= 0 || p > 65535 {
			return nil, errorf(errdefs.ErrInvalidArgument, "invalid port %d", p)
		}
	}
	resp, err := s.stream.GetPortForward(r)
	if err != nil {
		return nil, err
	}
	if resp.Url, err = s.streamURL(sb.ID(), resp.Url); err != nil {
		return nil, err
	}
	return resp, nil
}

// podTarget is where port-forward connects for a ready unikernel pod.
type podTarget struct {
	addr  string // IP address
	netns string // dialled from inside this namespace ("" = from the host's)
}

// podTarget returns where a ready unikernel pod's guest is reached. A
// routed pod is dialled at the IPv4 address its own namespace holds, from
// inside that namespace, which routes the port to the VM that declares it:
// no record can make the daemon dial anything else (docs/security.md). A
// pod made before routed networking (its guest NIC owns the pod IP) is
// dialled from the host at the pod IP, once its namespace proves it holds
// that address.
func (s *Service) podTarget(id string) (podTarget, error) {
	sb, err := s.getSandbox(id)
	if err != nil {
		return podTarget{}, err
	}
	st := sb.Status()
	if st.State != store.SandboxReady {
		return podTarget{}, errorf(errdefs.ErrFailedPrecondition, "pod %s is not ready", sb.ID())
	}
	ip := primaryIP(st.Net)
	if ip == "" || sb.Meta().NetNS == "" {
		return podTarget{}, errorf(errdefs.ErrFailedPrecondition, "pod %s has no IP address (no pod network)", sb.ID())
	}
	live, err := vmnet.Addresses(sb.Meta().NetNS, cni.IfName)
	if err != nil {
		return podTarget{}, errorf(errdefs.ErrFailedPrecondition, "pod %s: reading its network namespace: %v", sb.ID(), err)
	}
	for _, a := range live {
		switch {
		case st.Guest != nil && a.To4() != nil:
			// The namespace's own IPv4 address, dialled inside it: the
			// namespace routes the port to its VM. No record names it.
			return podTarget{addr: a.String(), netns: sb.Meta().NetNS}, nil
		case st.Guest == nil && a.Equal(net.ParseIP(ip)):
			return podTarget{addr: a.String()}, nil
		}
	}
	return podTarget{}, errorf(errdefs.ErrFailedPrecondition, "pod %s: its recorded address %s is not an address of its network namespace (%v); "+
		"not connecting", sb.ID(), ip, live)
}

// Reasons of a running container that scale-to-zero or autostart hold.
const (
	ReasonScaledToZero   = "ScaledToZero"
	ReasonAwaitingWakeup = "AwaitingFirstRequest"
)

// idleStatusTimeout bounds asking a shim about scale-to-zero in a status.
const idleStatusTimeout = time.Second

// idleReason is the reason and message of a running VM that scale-to-zero
// holds suspended, or of one not yet started (autostart off); none else.
func idleReason(ctx context.Context, vm manager.VM, noAutostart bool) (string, string) {
	ctx, cancel := context.WithTimeout(ctx, idleStatusTimeout)
	defer cancel()
	suspended, since, wakes, err := vm.Idle(ctx)
	if err != nil || !suspended {
		return "", ""
	}
	at := since.UTC().Format(time.RFC3339)
	if noAutostart && wakes == 0 {
		return ReasonAwaitingWakeup, "autostart is off: the guest starts on the first packet for the pod or console input (waiting since " + at + ")"
	}
	return ReasonScaledToZero, "suspended by scale-to-zero since " + at + " (no traffic for the cooldown); the next packet for the pod or console input wakes it"
}
