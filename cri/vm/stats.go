package vm

import (
	"context"
	"time"

	"github.com/sirupsen/logrus"
	"google.golang.org/grpc/codes"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/pkg/cgroups"
	"github.com/unilet-dev/unilet/pkg/cni"
	"github.com/unilet-dev/unilet/pkg/vmnet"
)

// usage is a VM's CPU and memory, from its cgroup (shim and QEMU together)
// or, without cgroups, from QEMU's /proc entry via the shim.
type usage struct {
	ts                      time.Time
	cpu, workingSet, rss    uint64
	memUsage, availableHint uint64
}

func (s *Service) usageOf(c *container) (usage, bool) {
	if c.state != runtimeapi.ContainerState_CONTAINER_RUNNING || c.vm == nil {
		return usage{}, false
	}
	if c.cgroup != "" {
		if cg, err := cgroups.Load(c.cgroup); err == nil {
			if st, err := cg.Stats(); err == nil {
				u := usage{ts: st.Timestamp, cpu: st.CPUNanos, workingSet: st.WorkingSet, rss: st.RSS, memUsage: st.MemoryUsage}
				if st.MemoryLimit > 0 && st.MemoryLimit < 1<<62 && st.MemoryLimit > st.WorkingSet {
					u.availableHint = st.MemoryLimit - st.WorkingSet
				}
				return u, true
			}
		}
	}
	st, err := c.vm.Stats()
	if err != nil {
		return usage{}, false
	}
	return usage{ts: st.Timestamp, cpu: st.CPUNanos, workingSet: st.RSSBytes, rss: st.RSSBytes, memUsage: st.RSSBytes}, true
}

func (u usage) cpuAPI() *runtimeapi.CpuUsage {
	return &runtimeapi.CpuUsage{Timestamp: u.ts.UnixNano(), UsageCoreNanoSeconds: &runtimeapi.UInt64Value{Value: u.cpu}}
}

func (u usage) memAPI() *runtimeapi.MemoryUsage {
	m := &runtimeapi.MemoryUsage{Timestamp: u.ts.UnixNano(), WorkingSetBytes: &runtimeapi.UInt64Value{Value: u.workingSet},
		RssBytes: &runtimeapi.UInt64Value{Value: u.rss}, UsageBytes: &runtimeapi.UInt64Value{Value: u.memUsage}}
	if u.availableHint > 0 {
		m.AvailableBytes = &runtimeapi.UInt64Value{Value: u.availableHint}
	}
	return m
}

func (s *Service) statsOf(c *container) *runtimeapi.ContainerStats {
	out := &runtimeapi.ContainerStats{Attributes: &runtimeapi.ContainerAttributes{Id: c.id, Metadata: c.config.GetMetadata(),
		Labels: c.config.GetLabels(), Annotations: c.config.GetAnnotations()}}
	if u, ok := s.usageOf(c); ok {
		out.Cpu, out.Memory = u.cpuAPI(), u.memAPI()
	}
	return out
}

// ContainerStats reports the CPU time and memory of the VM (its cgroup).
func (s *Service) ContainerStats(ctx context.Context, r *runtimeapi.ContainerStatsRequest) (*runtimeapi.ContainerStatsResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c, err := s.currentLocked(r.GetContainerId())
	if err != nil {
		return nil, err
	}
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

// podStatsLocked sums the pod's VMs and reads its NIC counters. Caller holds s.mu.
func (s *Service) podStatsLocked(sb *sandbox) *runtimeapi.PodSandboxStats {
	now := time.Now()
	linux := &runtimeapi.LinuxPodSandboxStats{}
	var total usage
	any := false
	for _, c := range s.containers {
		if c.sandboxID != sb.id {
			continue
		}
		s.refresh(c)
		st := s.statsOf(c)
		linux.Containers = append(linux.Containers, st)
		if u, ok := s.usageOf(c); ok {
			any = true
			total.cpu += u.cpu
			total.workingSet += u.workingSet
			total.rss += u.rss
			total.memUsage += u.memUsage
		}
	}
	total.ts = now
	if any {
		linux.Cpu, linux.Memory = total.cpuAPI(), total.memAPI()
	}
	if sb.netns != "" && sb.state == runtimeapi.PodSandboxState_SANDBOX_READY {
		if ns, err := vmnet.InterfaceStats(sb.netns, cni.IfName); err == nil && ns != nil {
			linux.Network = &runtimeapi.NetworkUsage{Timestamp: now.UnixNano(), DefaultInterface: &runtimeapi.NetworkInterfaceUsage{
				Name: cni.IfName, RxBytes: &runtimeapi.UInt64Value{Value: ns.RxBytes}, RxErrors: &runtimeapi.UInt64Value{Value: ns.RxErrors},
				TxBytes: &runtimeapi.UInt64Value{Value: ns.TxBytes}, TxErrors: &runtimeapi.UInt64Value{Value: ns.TxErrors}}}
		} else if err != nil {
			logrus.WithError(err).WithField("sandbox", sb.id).Debug("read pod NIC counters")
		}
	}
	return &runtimeapi.PodSandboxStats{
		Attributes: &runtimeapi.PodSandboxAttributes{Id: sb.id, Metadata: sb.config.GetMetadata(), Labels: sb.config.GetLabels(), Annotations: sb.config.GetAnnotations()},
		Linux:      linux,
	}
}

// PodSandboxStats reports a unikernel pod's usage: the sum of its VMs' cgroups and its NIC.
func (s *Service) PodSandboxStats(ctx context.Context, r *runtimeapi.PodSandboxStatsRequest) (*runtimeapi.PodSandboxStatsResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sb, err := s.sandboxLocked(r.GetPodSandboxId())
	if err != nil {
		return nil, err
	}
	return &runtimeapi.PodSandboxStatsResponse{Stats: s.podStatsLocked(sb)}, nil
}

// ListPodSandboxStats reports stats of the unikernel pods matching the filter.
func (s *Service) ListPodSandboxStats(ctx context.Context, r *runtimeapi.ListPodSandboxStatsRequest) (*runtimeapi.ListPodSandboxStatsResponse, error) {
	f := r.GetFilter()
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []*runtimeapi.PodSandboxStats
	for _, sb := range s.sandboxes {
		if sb.matches(f.GetId(), f.GetLabelSelector()) {
			out = append(out, s.podStatsLocked(sb))
		}
	}
	return &runtimeapi.ListPodSandboxStatsResponse{Stats: out}, nil
}

// UpdateContainerResources applies new CPU and memory limits to the VM's
// cgroup. Guest RAM and the vCPU count are fixed when the VM boots: a memory
// limit that would no longer hold the guest is refused, and what cannot
// change live is said in the log and the container's verbose status.
func (s *Service) UpdateContainerResources(ctx context.Context, r *runtimeapi.UpdateContainerResourcesRequest) (*runtimeapi.UpdateContainerResourcesResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c, err := s.currentLocked(r.GetContainerId())
	if err != nil {
		return nil, err
	}
	res := r.GetLinux()
	if res == nil {
		return nil, errorf(codes.InvalidArgument, "only Linux resources can be updated")
	}
	if l := res.GetMemoryLimitInBytes(); l > 0 && int(l>>20) < c.machine.MemoryMiB+s.cfg.Limits.OverheadMiB {
		return nil, errorf(codes.FailedPrecondition,
			"memory limit %d MiB is below the VM's %d MiB of guest RAM plus %d MiB VMM overhead; guest RAM is fixed at boot, so the limit cannot go below %dMi",
			l>>20, c.machine.MemoryMiB, s.cfg.Limits.OverheadMiB, c.machine.MemoryMiB+s.cfg.Limits.OverheadMiB)
	}
	c.sizing.MemoryLimit, c.sizing.CPUQuota, c.sizing.CPUPeriod, c.sizing.CPUShares =
		res.GetMemoryLimitInBytes(), res.GetCpuQuota(), res.GetCpuPeriod(), res.GetCpuShares()
	if c.cgroup != "" && c.state == runtimeapi.ContainerState_CONTAINER_RUNNING {
		cg, err := cgroups.Load(c.cgroup)
		if err != nil {
			return nil, errorf(codes.Internal, "open the VM's cgroup %s: %v", c.cgroup, err)
		}
		if err := cg.Update(cgroups.Resources{MemoryLimit: c.sizing.MemoryLimit, CPUQuota: c.sizing.CPUQuota,
			CPUPeriod: uint64(max(c.sizing.CPUPeriod, 0)), CPUShares: uint64(max(c.sizing.CPUShares, 0))}); err != nil {
			return nil, errorf(codes.Internal, "update the VM's cgroup %s: %v", c.cgroup, err)
		}
	}
	note := "cgroup limits updated; the VM keeps its boot-time guest RAM and vCPUs (a restart applies new sizes)"
	c.warnings = appendOnce(c.warnings, note)
	s.saveContainer(c)
	logrus.WithFields(logrus.Fields{"sandbox": c.sandboxID, "container": c.id}).Info(note)
	return &runtimeapi.UpdateContainerResourcesResponse{}, nil
}

func appendOnce(list []string, s string) []string {
	for _, v := range list {
		if v == s {
			return list
		}
	}
	return append(list, s)
}
