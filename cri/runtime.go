package cri

import (
	"context"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/cri/errdefs"
	"github.com/unilet-dev/unilet/cri/unikernel"
)

// Version answers for unilet itself.
func (r *Router) Version(ctx context.Context, req *runtimeapi.VersionRequest) (*runtimeapi.VersionResponse, error) {
	return r.vm.Version(ctx, req)
}

// unikraftHandler is the runtime handler of unikernel pods in Status: a VM has no
// recursive read-only bind mounts nor user namespaces to offer.
func (r *Router) unikraftHandler() *runtimeapi.RuntimeHandler {
	return &runtimeapi.RuntimeHandler{Name: r.cfg.Handler, Features: &runtimeapi.RuntimeHandlerFeatures{}}
}

// Status merges the unikernel side with the upstream's: conditions (a dead
// upstream shows as a false condition, never a failure), the upstream's
// runtime handlers and features unchanged plus the unikernel handler, and
// the upstream's verbose info beside unilet's.
func (r *Router) Status(ctx context.Context, req *runtimeapi.StatusRequest) (*runtimeapi.StatusResponse, error) {
	resp, err := r.vm.Status(ctx, req)
	if err != nil {
		return resp, err
	}
	resp.RuntimeHandlers = []*runtimeapi.RuntimeHandler{r.unikraftHandler()}
	if r.upRT == nil {
		return resp, nil
	}
	up, uerr := r.upRT.Status(ctx, req)
	if uerr == nil {
		var handlers []*runtimeapi.RuntimeHandler
		for _, h := range up.GetRuntimeHandlers() {
			if h.GetName() != r.cfg.Handler {
				handlers = append(handlers, h)
			}
		}
		resp.RuntimeHandlers = append(handlers, resp.RuntimeHandlers...)
		resp.Features = up.GetFeatures()
		for k, v := range up.GetInfo() {
			if _, mine := resp.Info[k]; !mine {
				if resp.Info == nil {
					resp.Info = map[string]string{}
				}
				resp.Info[k] = v
			}
		}
	}
	cond := &runtimeapi.RuntimeCondition{Type: "UpstreamReady", Status: true}
	if uerr != nil {
		cond.Status, cond.Reason, cond.Message = false, "UpstreamUnreachable", uerr.Error()
	} else {
		for _, c := range up.GetStatus().GetConditions() {
			if c.GetType() == runtimeapi.NetworkReady && !c.GetStatus() {
				// Plain pods use the upstream's network: both must be ready.
				for _, mine := range resp.Status.Conditions {
					if mine.Type == runtimeapi.NetworkReady && mine.Status {
						mine.Status, mine.Reason, mine.Message = false, c.GetReason(), c.GetMessage()
					}
				}
			}
		}
	}
	resp.Status.Conditions = append(resp.Status.Conditions, cond)
	return resp, nil
}

// RuntimeConfig reports unilet's cgroup driver.
func (r *Router) RuntimeConfig(ctx context.Context, req *runtimeapi.RuntimeConfigRequest) (*runtimeapi.RuntimeConfigResponse, error) {
	if r.upRT != nil {
		if resp, err := r.upRT.RuntimeConfig(ctx, req); err == nil {
			return resp, nil
		}
	}
	return r.vm.RuntimeConfig(ctx, req)
}

// UpdateRuntimeConfig is forwarded upstream (pod CIDR); the unikernel side has nothing to update yet.
func (r *Router) UpdateRuntimeConfig(ctx context.Context, req *runtimeapi.UpdateRuntimeConfigRequest) (*runtimeapi.UpdateRuntimeConfigResponse, error) {
	if r.upRT != nil {
		if _, err := r.upRT.UpdateRuntimeConfig(ctx, req); err != nil {
			r.logUpstreamDown("UpdateRuntimeConfig", err)
		}
	}
	return &runtimeapi.UpdateRuntimeConfigResponse{}, nil
}

// RunPodSandbox routes by annotation / runtime handler.
func (r *Router) RunPodSandbox(ctx context.Context, req *runtimeapi.RunPodSandboxRequest) (*runtimeapi.RunPodSandboxResponse, error) {
	if req.GetConfig() == nil {
		return nil, errdefs.Errorf(errdefs.ErrInvalidArgument, "RunPodSandbox needs a sandbox config")
	}
	if r.IsUnikernelPod(req.GetConfig(), req.GetRuntimeHandler()) {
		return r.vm.RunPodSandbox(ctx, req)
	}
	if r.upRT == nil {
		md := req.GetConfig().GetMetadata()
		return nil, r.noUpstream("pod " + md.GetNamespace() + "/" + md.GetName())
	}
	resp, err := r.upRT.RunPodSandbox(ctx, req)
	return resp, upstreamErr(err)
}

// sandboxSide decides where a sandbox-ID call goes (true = VM). IDs resolve
// the same way on both sides: a full VM ID goes to the unikernel side; a prefix
// that names one VM sandbox goes there only if it names nothing upstream,
// else it is ambiguous (InvalidArgument), never silently sent to one side.
// With no upstream the unikernel side answers (NotFound / idempotent success).
func (r *Router) sandboxSide(ctx context.Context, id string) (bool, error) {
	if r.upRT == nil {
		return true, nil
	}
	return r.side(id, r.vm.MatchSandbox, "pod sandbox", func() error {
		_, err := r.upRT.PodSandboxStatus(ctx, &runtimeapi.PodSandboxStatusRequest{PodSandboxId: id})
		return err
	})
}

// containerSide is sandboxSide for container IDs.
func (r *Router) containerSide(ctx context.Context, id string) (bool, error) {
	if r.upRT == nil {
		return true, nil
	}
	return r.side(id, r.vm.MatchContainer, "container", func() error {
		_, err := r.upRT.ContainerStatus(ctx, &runtimeapi.ContainerStatusRequest{ContainerId: id})
		return err
	})
}

// vmExactSandbox and vmExactContainer: a list filtered by a full VM ID
// stays on the unikernel side; a prefix is asked of both sides (lists merge).
func (r *Router) vmExactSandbox(id string) bool {
	exact, _, _ := r.vm.MatchSandbox(id)
	return exact
}

func (r *Router) vmExactContainer(id string) bool {
	exact, _, _ := r.vm.MatchContainer(id)
	return exact
}

func (r *Router) side(id string, match func(string) (exact, found bool, err error), kind string, upstreamHas func() error) (bool, error) {
	exact, found, err := match(id)
	switch {
	case err != nil:
		return false, err // ambiguous among the unikernel side's own
	case !found:
		return false, nil
	case exact:
		return true, nil
	}
	if upstreamHas() == nil {
		return false, errdefs.Errorf(errdefs.ErrInvalidArgument, "%s ID prefix %q is ambiguous: it names a unikernel %s and one of the upstream runtime's", kind, id, kind)
	}
	return true, nil
}

// StopPodSandbox routes by ID.
func (r *Router) StopPodSandbox(ctx context.Context, req *runtimeapi.StopPodSandboxRequest) (*runtimeapi.StopPodSandboxResponse, error) {
	return routed(ctx, r, r.sandboxSide, req.GetPodSandboxId(), req, (*unikernel.Service).StopPodSandbox, runtimeapi.RuntimeServiceClient.StopPodSandbox, empty[runtimeapi.StopPodSandboxResponse])
}

// RemovePodSandbox routes by ID.
func (r *Router) RemovePodSandbox(ctx context.Context, req *runtimeapi.RemovePodSandboxRequest) (*runtimeapi.RemovePodSandboxResponse, error) {
	return routed(ctx, r, r.sandboxSide, req.GetPodSandboxId(), req, (*unikernel.Service).RemovePodSandbox, runtimeapi.RuntimeServiceClient.RemovePodSandbox, empty[runtimeapi.RemovePodSandboxResponse])
}

// PodSandboxStatus routes by ID.
func (r *Router) PodSandboxStatus(ctx context.Context, req *runtimeapi.PodSandboxStatusRequest) (*runtimeapi.PodSandboxStatusResponse, error) {
	return routed(ctx, r, r.sandboxSide, req.GetPodSandboxId(), req, (*unikernel.Service).PodSandboxStatus, runtimeapi.RuntimeServiceClient.PodSandboxStatus, nil)
}

// ListPodSandbox merges both sides; a dead upstream degrades to the unikernel side.
func (r *Router) ListPodSandbox(ctx context.Context, req *runtimeapi.ListPodSandboxRequest) (*runtimeapi.ListPodSandboxResponse, error) {
	id := req.GetFilter().GetId()
	return mergedRT(ctx, r, "ListPodSandbox", req, (*unikernel.Service).ListPodSandbox, runtimeapi.RuntimeServiceClient.ListPodSandbox, id != "" && r.vmExactSandbox(id),
		func(into, from *runtimeapi.ListPodSandboxResponse) *runtimeapi.ListPodSandboxResponse {
			into.Items = append(into.Items, from.GetItems()...)
			return into
		})
}

// CreateContainer routes by the sandbox ID.
func (r *Router) CreateContainer(ctx context.Context, req *runtimeapi.CreateContainerRequest) (*runtimeapi.CreateContainerResponse, error) {
	return routed(ctx, r, r.sandboxSide, req.GetPodSandboxId(), req, (*unikernel.Service).CreateContainer, runtimeapi.RuntimeServiceClient.CreateContainer, nil)
}

// StartContainer routes by ID.
func (r *Router) StartContainer(ctx context.Context, req *runtimeapi.StartContainerRequest) (*runtimeapi.StartContainerResponse, error) {
	return routed(ctx, r, r.containerSide, req.GetContainerId(), req, (*unikernel.Service).StartContainer, runtimeapi.RuntimeServiceClient.StartContainer, nil)
}

// StopContainer routes by ID; unknown IDs succeed.
func (r *Router) StopContainer(ctx context.Context, req *runtimeapi.StopContainerRequest) (*runtimeapi.StopContainerResponse, error) {
	return routed(ctx, r, r.containerSide, req.GetContainerId(), req, (*unikernel.Service).StopContainer, runtimeapi.RuntimeServiceClient.StopContainer, empty[runtimeapi.StopContainerResponse])
}

// RemoveContainer routes by ID; unknown IDs succeed.
func (r *Router) RemoveContainer(ctx context.Context, req *runtimeapi.RemoveContainerRequest) (*runtimeapi.RemoveContainerResponse, error) {
	return routed(ctx, r, r.containerSide, req.GetContainerId(), req, (*unikernel.Service).RemoveContainer, runtimeapi.RuntimeServiceClient.RemoveContainer, empty[runtimeapi.RemoveContainerResponse])
}

// ContainerStatus routes by ID.
func (r *Router) ContainerStatus(ctx context.Context, req *runtimeapi.ContainerStatusRequest) (*runtimeapi.ContainerStatusResponse, error) {
	return routed(ctx, r, r.containerSide, req.GetContainerId(), req, (*unikernel.Service).ContainerStatus, runtimeapi.RuntimeServiceClient.ContainerStatus, nil)
}

// ListContainers merges both sides.
func (r *Router) ListContainers(ctx context.Context, req *runtimeapi.ListContainersRequest) (*runtimeapi.ListContainersResponse, error) {
	f := req.GetFilter()
	return mergedRT(ctx, r, "ListContainers", req, (*unikernel.Service).ListContainers, runtimeapi.RuntimeServiceClient.ListContainers, (f.GetId() != "" && r.vmExactContainer(f.GetId())) || (f.GetPodSandboxId() != "" && r.vmExactSandbox(f.GetPodSandboxId())),
		func(into, from *runtimeapi.ListContainersResponse) *runtimeapi.ListContainersResponse {
			into.Containers = append(into.Containers, from.GetContainers()...)
			return into
		})
}

// UpdateContainerResources routes by ID.
func (r *Router) UpdateContainerResources(ctx context.Context, req *runtimeapi.UpdateContainerResourcesRequest) (*runtimeapi.UpdateContainerResourcesResponse, error) {
	return routed(ctx, r, r.containerSide, req.GetContainerId(), req, (*unikernel.Service).UpdateContainerResources, runtimeapi.RuntimeServiceClient.UpdateContainerResources, nil)
}

// ReopenContainerLog routes by ID.
func (r *Router) ReopenContainerLog(ctx context.Context, req *runtimeapi.ReopenContainerLogRequest) (*runtimeapi.ReopenContainerLogResponse, error) {
	return routed(ctx, r, r.containerSide, req.GetContainerId(), req, (*unikernel.Service).ReopenContainerLog, runtimeapi.RuntimeServiceClient.ReopenContainerLog, nil)
}

// ExecSync routes by ID (VM: Unimplemented with a reason).
func (r *Router) ExecSync(ctx context.Context, req *runtimeapi.ExecSyncRequest) (*runtimeapi.ExecSyncResponse, error) {
	return routed(ctx, r, r.containerSide, req.GetContainerId(), req, (*unikernel.Service).ExecSync, runtimeapi.RuntimeServiceClient.ExecSync, nil)
}

// Exec routes by ID.
func (r *Router) Exec(ctx context.Context, req *runtimeapi.ExecRequest) (*runtimeapi.ExecResponse, error) {
	return routed(ctx, r, r.containerSide, req.GetContainerId(), req, (*unikernel.Service).Exec, runtimeapi.RuntimeServiceClient.Exec, nil)
}

// Attach routes by ID.
func (r *Router) Attach(ctx context.Context, req *runtimeapi.AttachRequest) (*runtimeapi.AttachResponse, error) {
	return routed(ctx, r, r.containerSide, req.GetContainerId(), req, (*unikernel.Service).Attach, runtimeapi.RuntimeServiceClient.Attach, nil)
}

// PortForward routes by sandbox ID.
func (r *Router) PortForward(ctx context.Context, req *runtimeapi.PortForwardRequest) (*runtimeapi.PortForwardResponse, error) {
	return routed(ctx, r, r.sandboxSide, req.GetPodSandboxId(), req, (*unikernel.Service).PortForward, runtimeapi.RuntimeServiceClient.PortForward, nil)
}

// ContainerStats routes by ID.
func (r *Router) ContainerStats(ctx context.Context, req *runtimeapi.ContainerStatsRequest) (*runtimeapi.ContainerStatsResponse, error) {
	return routed(ctx, r, r.containerSide, req.GetContainerId(), req, (*unikernel.Service).ContainerStats, runtimeapi.RuntimeServiceClient.ContainerStats, nil)
}

// ListContainerStats merges both sides.
func (r *Router) ListContainerStats(ctx context.Context, req *runtimeapi.ListContainerStatsRequest) (*runtimeapi.ListContainerStatsResponse, error) {
	f := req.GetFilter()
	return mergedRT(ctx, r, "ListContainerStats", req, (*unikernel.Service).ListContainerStats, runtimeapi.RuntimeServiceClient.ListContainerStats, (f.GetId() != "" && r.vmExactContainer(f.GetId())) || (f.GetPodSandboxId() != "" && r.vmExactSandbox(f.GetPodSandboxId())),
		func(into, from *runtimeapi.ListContainerStatsResponse) *runtimeapi.ListContainerStatsResponse {
			into.Stats = append(into.Stats, from.GetStats()...)
			return into
		})
}

// PodSandboxStats routes by ID.
func (r *Router) PodSandboxStats(ctx context.Context, req *runtimeapi.PodSandboxStatsRequest) (*runtimeapi.PodSandboxStatsResponse, error) {
	return routed(ctx, r, r.sandboxSide, req.GetPodSandboxId(), req, (*unikernel.Service).PodSandboxStats, runtimeapi.RuntimeServiceClient.PodSandboxStats, nil)
}

// ListPodSandboxStats merges both sides.
func (r *Router) ListPodSandboxStats(ctx context.Context, req *runtimeapi.ListPodSandboxStatsRequest) (*runtimeapi.ListPodSandboxStatsResponse, error) {
	id := req.GetFilter().GetId()
	return mergedRT(ctx, r, "ListPodSandboxStats", req, (*unikernel.Service).ListPodSandboxStats, runtimeapi.RuntimeServiceClient.ListPodSandboxStats, id != "" && r.vmExactSandbox(id),
		func(into, from *runtimeapi.ListPodSandboxStatsResponse) *runtimeapi.ListPodSandboxStatsResponse {
			into.Stats = append(into.Stats, from.GetStats()...)
			return into
		})
}

// ListMetricDescriptors: the upstream's descriptors, plus those of unikernel pods'
// metrics it does not describe itself (same names: containerd 2.x's).
func (r *Router) ListMetricDescriptors(ctx context.Context, req *runtimeapi.ListMetricDescriptorsRequest) (*runtimeapi.ListMetricDescriptorsResponse, error) {
	return mergedRT(ctx, r, "ListMetricDescriptors", req, (*unikernel.Service).ListMetricDescriptors, runtimeapi.RuntimeServiceClient.ListMetricDescriptors, false,
		func(into, from *runtimeapi.ListMetricDescriptorsResponse) *runtimeapi.ListMetricDescriptorsResponse {
			have := map[string]bool{}
			for _, d := range from.GetDescriptors() {
				have[d.GetName()] = true
			}
			out := from.GetDescriptors()
			for _, d := range into.GetDescriptors() {
				if !have[d.GetName()] {
					out = append(out, d)
				}
			}
			return &runtimeapi.ListMetricDescriptorsResponse{Descriptors: out}
		})
}

// ListPodSandboxMetrics merges unikernel pods' metrics with the upstream's.
func (r *Router) ListPodSandboxMetrics(ctx context.Context, req *runtimeapi.ListPodSandboxMetricsRequest) (*runtimeapi.ListPodSandboxMetricsResponse, error) {
	return mergedRT(ctx, r, "ListPodSandboxMetrics", req, (*unikernel.Service).ListPodSandboxMetrics, runtimeapi.RuntimeServiceClient.ListPodSandboxMetrics, false,
		func(into, from *runtimeapi.ListPodSandboxMetricsResponse) *runtimeapi.ListPodSandboxMetricsResponse {
			into.PodMetrics = append(into.PodMetrics, from.GetPodMetrics()...)
			return into
		})
}
