package unikernel

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/unilet-dev/unilet/cri/store"
	"github.com/unilet-dev/unilet/pkg/metrics"
)

// Prometheus metrics of the live state, read at each scrape (pkg/metrics
// serves them beside the counters the verbs record).
var (
	vmStateDesc = prometheus.NewDesc(metrics.Namespace+"_vms", "Containers' VMs by state (created, starting, running, suspended: "+
		"held by scale-to-zero, stopping, exited, removing).", []string{"state"}, nil)
	podStateDesc = prometheus.NewDesc(metrics.Namespace+"_pods", "Unikernel pod sandboxes by state (ready, notready, creating, removing).", []string{"state"}, nil)
	vmLabels     = []string{"namespace", "pod", "container"}
	vmCPUDesc    = prometheus.NewDesc(metrics.Namespace+"_vm_cpu_seconds_total", "CPU time used by a running VM (QEMU and its shim, from its cgroup or processes).", vmLabels, nil)
	vmWSDesc     = prometheus.NewDesc(metrics.Namespace+"_vm_memory_working_set_bytes", "Working set of a running VM (QEMU and its shim).", vmLabels, nil)
	vmRSSDesc    = prometheus.NewDesc(metrics.Namespace+"_vm_memory_rss_bytes", "Resident memory of a running VM (QEMU and its shim).", vmLabels, nil)
	vmGuestDesc  = prometheus.NewDesc(metrics.Namespace+"_vm_guest_memory_bytes", "Guest RAM a running VM was given.", vmLabels, nil)
	vmVCPUDesc   = prometheus.NewDesc(metrics.Namespace+"_vm_vcpus", "vCPUs a running VM was given.", vmLabels, nil)
)

// scrapeTimeout bounds the shim calls of one scrape.
const scrapeTimeout = 10 * time.Second

// Collector returns the Prometheus collector of the service's live state.
func (s *Service) Collector() prometheus.Collector { return collector{s} }

type collector struct{ s *Service }

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{vmStateDesc, podStateDesc, vmCPUDesc, vmWSDesc, vmRSSDesc, vmGuestDesc, vmVCPUDesc} {
		ch <- d
	}
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), scrapeTimeout)
	defer cancel()
	pods := map[string]float64{}
	for _, st := range []store.SandboxState{store.SandboxReady, store.SandboxNotReady} {
		pods[string(st)] = 0
	}
	for _, sb := range c.s.sandboxes.List() {
		pods[string(sb.Status().State)]++
	}
	for st, n := range pods {
		ch <- prometheus.MustNewConstMetric(podStateDesc, prometheus.GaugeValue, n, st)
	}
	vms := map[string]float64{"created": 0, "running": 0, "suspended": 0, "exited": 0}
	for _, ctr := range c.s.containers.List() {
		st := ctr.Status()
		state := string(st.State)
		if st.State == store.ContainerRunning && st.vm != nil {
			if suspended, _, _, err := st.vm.Idle(ctx); err == nil && suspended {
				state = "suspended"
			}
			c.collectVM(ctx, ch, ctr)
		}
		vms[state]++
	}
	for st, n := range vms {
		ch <- prometheus.MustNewConstMetric(vmStateDesc, prometheus.GaugeValue, n, st)
	}
}

// collectVM sends the usage of one running VM.
func (c collector) collectVM(ctx context.Context, ch chan<- prometheus.Metric, ctr *container) {
	m := ctr.Meta()
	sb, err := c.s.sandboxes.Get(m.SandboxID)
	if err != nil {
		return
	}
	md := sb.Meta().Config.GetMetadata()
	labels := []string{md.GetNamespace(), md.GetName(), m.Config.GetMetadata().GetName()}
	ch <- prometheus.MustNewConstMetric(vmGuestDesc, prometheus.GaugeValue, float64(int64(m.Machine.MemoryMiB)<<20), labels...)
	ch <- prometheus.MustNewConstMetric(vmVCPUDesc, prometheus.GaugeValue, float64(m.Machine.VCPUs), labels...)
	u, ok := c.s.usageOf(ctx, ctr)
	if !ok {
		return
	}
	ch <- prometheus.MustNewConstMetric(vmCPUDesc, prometheus.CounterValue, float64(u.cpu)/float64(time.Second), labels...)
	ch <- prometheus.MustNewConstMetric(vmWSDesc, prometheus.GaugeValue, float64(u.workingSet), labels...)
	ch <- prometheus.MustNewConstMetric(vmRSSDesc, prometheus.GaugeValue, float64(u.rss), labels...)
}
