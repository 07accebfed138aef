package unikernel

import (
	"context"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/cri/errdefs"
	"github.com/unilet-dev/unilet/cri/store"
	"github.com/unilet-dev/unilet/pkg/cni"
	"github.com/unilet-dev/unilet/pkg/vmnet"
	"github.com/unilet-dev/unilet/vmm/manager"
)

// usage is a VM's CPU and memory, from its cgroup (shim and QEMU together)
// or, without cgroups, from QEMU's /proc entry via the shim.
type usage struct {
	ts                      time.Time
	cpu, workingSet, rss    uint64
	memUsage, availableHint uint64
}

// usageOf reads c's usage: from its cgroup, else from its shim within
// manager.StatsTimeout (a stuck shim gives no numbers, not a stuck call).
func (s *Service) usageOf(ctx context.Context, c *container) (usage, bool) {
	st := c.Status()
	if st.State != store.ContainerRunning || st.vm == nil {
		return usage{}, false
	}
	u, err := s.vms.Usage(ctx, st.vm, c.Meta().Cgroup)
	if err != nil {
		return usage{}, false
	}
	out := usage{ts: u.Timestamp, cpu: u.CPUNanos, workingSet: u.WorkingSet, rss: u.RSS, memUsage: u.MemoryUsage}
	if u.MemoryLimit > 0 && u.MemoryLimit < 1<<62 && u.MemoryLimit > u.WorkingSet {
		out.availableHint = u.MemoryLimit - u.WorkingSet
	}
	return out, true
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

func (s *Service) statsOf(ctx context.Context, c *container) (*runtimeapi.ContainerStats, usage, bool) {
	cfg := c.Meta().Config
	out := &runtimeapi.ContainerStats{Attributes: &runtimeapi.ContainerAttributes{Id: c.ID(), Metadata: cfg.GetMetadata(),
		Labels: cfg.GetLabels(), Annotations: cfg.GetAnnotations()}}
	u, ok := s.usageOf(ctx, c)
	if ok {
		out.Cpu, out.Memory = u.cpuAPI(), u.memAPI()
	}
	return out, u, ok
}

// statsAll reads the stats of cs concurrently (one slow shim delays a list
// by at most manager.StatsTimeout).
func (s *Service) statsAll(ctx context.Context, cs []*container) ([]*runtimeapi.ContainerStats, []usage, []bool) {
	out, us, oks := make([]*runtimeapi.ContainerStats, len(cs)), make([]usage, len(cs)), make([]bool, len(cs))
	var wg sync.WaitGroup
	for i, c := range cs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out[i], us[i], oks[i] = s.statsOf(ctx, c)
		}()
	}
	wg.Wait()
	return out, us, oks
}

// ContainerStats reports the CPU time and memory of the VM (its cgroup).
func (s *Service) ContainerStats(ctx context.Context, r *runtimeapi.ContainerStatsRequest) (*runtimeapi.ContainerStatsResponse, error) {
	c, err := s.getContainer(r.GetContainerId())
	if err != nil {
		return nil, err
	}
	st, _, _ := s.statsOf(ctx, c)
	return &runtimeapi.ContainerStatsResponse{Stats: st}, nil
}

// ListContainerStats reports stats of the unikernel containers matching the filter.
func (s *Service) ListContainerStats(ctx context.Context, r *runtimeapi.ListContainerStatsRequest) (*runtimeapi.ListContainerStatsResponse, error) {
	f := r.GetFilter()
	var cs []*container
	for _, c := range s.containers.List() {
		if containerMatches(c, f.GetId(), f.GetPodSandboxId(), f.GetLabelSelector()) {
			cs = append(cs, c)
		}
	}
	out, _, _ := s.statsAll(ctx, cs)
	return &runtimeapi.ListContainerStatsResponse{Stats: out}, nil
}

// podStats sums the pod's VMs and reads its NIC counters.
func (s *Service) podStats(ctx context.Context, sb *sandbox) *runtimeapi.PodSandboxStats {
	now := time.Now()
	linux := &runtimeapi.LinuxPodSandboxStats{}
	var total usage
	any := false
	stats, us, oks := s.statsAll(ctx, s.containersOf(sb.ID()))
	for i, st := range stats {
		linux.Containers = append(linux.Containers, st)
		if oks[i] {
			any = true
			total.cpu += us[i].cpu
			total.workingSet += us[i].workingSet
			total.rss += us[i].rss
			total.memUsage += us[i].memUsage
		}
	}
	total.ts = now
	if any {
		linux.Cpu, linux.Memory = total.cpuAPI(), total.memAPI()
	}
	cfg, netnsPath := sb.Meta().Config, sb.Meta().NetNS
	if netnsPath != "" && sb.Status().State == store.SandboxReady {
		if ns, err := vmnet.InterfaceStats(netnsPath, cni.IfName); err == nil && ns != nil {
			linux.Network = &runtimeapi.NetworkUsage{Timestamp: now.UnixNano(), DefaultInterface: &runtimeapi.NetworkInterfaceUsage{
				Name: cni.IfName, RxBytes: &runtimeapi.UInt64Value{Value: ns.RxBytes}, RxErrors: &runtimeapi.UInt64Value{Value: ns.RxErrors},
				TxBytes: &runtimeapi.UInt64Value{Value: ns.TxBytes}, TxErrors: &runtimeapi.UInt64Value{Value: ns.TxErrors}}}
		} else if err != nil {
			logrus.WithError(err).WithField("sandbox", sb.ID()).Debug("read pod NIC counters")
		}
	}
	return &runtimeapi.PodSandboxStats{
		Attributes: &runtimeapi.PodSandboxAttributes{Id: sb.ID(), Metadata: cfg.GetMetadata(), Labels: cfg.GetLabels(), Annotations: cfg.GetAnnotations()},
		Linux:      linux,
	}
}

// PodSandboxStats reports a unikernel pod's usage: the sum of its VMs' cgroups and its NIC.
func (s *Service) PodSandboxStats(ctx context.Context, r *runtimeapi.PodSandboxStatsRequest) (*runtimeapi.PodSandboxStatsResponse, error) {
	sb, err := s.getSandbox(r.GetPodSandboxId())
	if err != nil {
		return nil, err
	}
	return &runtimeapi.PodSandboxStatsResponse{Stats: s.podStats(ctx, sb)}, nil
}

// ListPodSandboxStats reports stats of the unikernel pods matching the filter.
func (s *Service) ListPodSandboxStats(ctx context.Context, r *runtimeapi.ListPodSandboxStatsRequest) (*runtimeapi.ListPodSandboxStatsResponse, error) {
	f := r.GetFilter()
	var out []*runtimeapi.PodSandboxStats
	for _, sb := range s.sandboxes.List() {
		if sandboxMatches(sb, f.GetId(), f.GetLabelSelector()) {
			out = append(out, s.podStats(ctx, sb))
		}
	}
	return &runtimeapi.ListPodSandboxStatsResponse{Stats: out}, nil
}

// UpdateContainerResources applies new CPU and memory limits to the VM's
// cgroup. Guest RAM and the vCPU count are fixed when the VM boots: a memory
// limit that would no longer hold the guest is refused, and what cannot
// change live is said in the log and the container's verbose status.
func (s *Service) UpdateContainerResources(ctx context.Context, r *runtimeapi.UpdateContainerResourcesRequest) (*runtimeapi.UpdateContainerResourcesResponse, error) {
	c, err := s.getContainer(r.GetContainerId())
	if err != nil {
		return nil, err
	}
	res := r.GetLinux()
	if res == nil {
		return nil, errorf(errdefs.ErrInvalidArgument, "only Linux resources can be updated")
	}
	m := c.Meta()
	if l := res.GetMemoryLimitInBytes(); l > 0 && int(l>>20) < m.Machine.MemoryMiB+s.cfg.Limits.OverheadMiB {
		return nil, errorf(errdefs.ErrFailedPrecondition,
			"memory limit %d MiB is below the VM's %d MiB of guest RAM plus %d MiB VMM overhead; guest RAM is fixed at boot, so the limit cannot go below %dMi",
			l>>20, m.Machine.MemoryMiB, s.cfg.Limits.OverheadMiB, m.Machine.MemoryMiB+s.cfg.Limits.OverheadMiB)
	}
	c.Lifecycle.Lock()
	defer c.Lifecycle.Unlock()
	sz := Sizing{MemoryMiB: m.Machine.MemoryMiB, VCPUs: m.Machine.VCPUs, MemoryLimit: res.GetMemoryLimitInBytes(),
		CPUQuota: res.GetCpuQuota(), CPUPeriod: res.GetCpuPeriod(), CPUShares: res.GetCpuShares()}
	// The cgroup first: the recorded sizes are only ever ones that hold.
	if m.Cgroup != "" && c.Status().State == store.ContainerRunning {
		if err := s.vms.UpdateResources(m.Cgroup, manager.Resources{MemoryLimit: sz.MemoryLimit, CPUQuota: sz.CPUQuota,
			CPUPeriod: uint64(max(sz.CPUPeriod, 0)), CPUShares: uint64(max(sz.CPUShares, 0))}); err != nil {
			return nil, errorf(errdefs.ErrInternal, "%v", err)
		}
	}
	note := "cgroup limits updated; the VM keeps its boot-time guest RAM and vCPUs (a restart applies new sizes)"
	if err := c.Update(func(st containerStatus) (containerStatus, error) {
		st.Sizing.MemoryLimit, st.Sizing.CPUQuota, st.Sizing.CPUPeriod, st.Sizing.CPUShares = sz.MemoryLimit, sz.CPUQuota, sz.CPUPeriod, sz.CPUShares
		st.Warnings = appendOnce(st.Warnings, note)
		return st, nil
	}); err != nil {
		return nil, err
	}
	logrus.WithFields(logrus.Fields{"sandbox": m.SandboxID, "container": c.ID()}).Info(note)
	return &runtimeapi.UpdateContainerResourcesResponse{}, nil
}

// appendOnce returns list with s added unless present (a new slice: the
// old one may be shared by a status copy).
func appendOnce(list []string, s string) []string {
	for _, v := range list {
		if v == s {
			return list
		}
	}
	return append(append([]string(nil), list...), s)
}
