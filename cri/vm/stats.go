package vm

import (
	"context"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

func (s *Service) statsOf(c *container) *runtimeapi.ContainerStats {
	out := &runtimeapi.ContainerStats{Attributes: &runtimeapi.ContainerAttributes{Id: c.id, Metadata: c.config.GetMetadata(),
		Labels: c.config.GetLabels(), Annotations: c.config.GetAnnotations()}}
	if c.state != runtimeapi.ContainerState_CONTAINER_RUNNING || c.vm == nil {
		return out
	}
	st, err := c.vm.Stats()
	if err != nil {
		return out
	}
	ts := st.Timestamp.UnixNano()
	out.Cpu = &runtimeapi.CpuUsage{Timestamp: ts, UsageCoreNanoSeconds: &runtimeapi.UInt64Value{Value: st.CPUNanos}}
	out.Memory = &runtimeapi.MemoryUsage{Timestamp: ts, WorkingSetBytes: &runtimeapi.UInt64Value{Value: st.RSSBytes},
		RssBytes: &runtimeapi.UInt64Value{Value: st.RSSBytes}}
	return out
}

// ContainerStats reports the CPU time and resident memory of the VM's QEMU.
func (s *Service) ContainerStats(ctx context.Context, r *runtimeapi.ContainerStatsRequest) (*runtimeapi.ContainerStatsResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c, err := s.containerLocked(r.GetContainerId())
	if err != nil {
		return nil, err
	}
	s.refresh(c)
	return &runtimeapi.ContainerStatsResponse{Stats: s.statsOf(c)}, nil
}

// ListContainerStats reports stats of the unikernel containers matching the filter.
func (s *Service) ListContainerStats(ctx context.Context, r *runtimeapi.ListContainerStatsRequest) (*runtimeapi.ListContainerStatsResponse, error) {
	f := r.GetFilter()
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []*runtimeapi.ContainerStats
	for _, c := range s.containers {
		s.refresh(c)
		if !c.matches(f.GetId(), f.GetPodSandboxId(), f.GetLabelSelector()) {
			continue
		}
		out = append(out, s.statsOf(c))
	}
	return &runtimeapi.ListContainerStatsResponse{Stats: out}, nil
}
