package unikernel

import (
	"context"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/cri/store"
)

// Metrics of unikernel pods for kubelet's CRI metrics (ListPodSandboxMetrics): the
// names, label keys and units containerd 2.x and cAdvisor use, from the VM's
// cgroup (shim and QEMU together).
var metricLabelKeys = []string{"pod", "namespace", "container", "id", "image"}

var (
	metricCPUUsage      = &runtimeapi.MetricDescriptor{Name: "container_cpu_usage_seconds_total", Help: "Cumulative CPU time consumed in seconds.", LabelKeys: metricLabelKeys}
	metricMemUsage      = &runtimeapi.MetricDescriptor{Name: "container_memory_usage_bytes", Help: "Current memory usage in bytes, including all memory regardless of when it was accessed.", LabelKeys: metricLabelKeys}
	metricMemWorkSet    = &runtimeapi.MetricDescriptor{Name: "container_memory_working_set_bytes", Help: "Current working set in bytes.", LabelKeys: metricLabelKeys}
	metricMemRSS        = &runtimeapi.MetricDescriptor{Name: "container_memory_rss", Help: "Size of RSS in bytes.", LabelKeys: metricLabelKeys}
	metricStartTime     = &runtimeapi.MetricDescriptor{Name: "container_start_time_seconds", Help: "Start time of the container since unix epoch in seconds.", LabelKeys: metricLabelKeys}
	metricLastSeen      = &runtimeapi.MetricDescriptor{Name: "container_last_seen", Help: "Last time a container was seen by the exporter", LabelKeys: metricLabelKeys}
	vmMetricDescriptors = []*runtimeapi.MetricDescriptor{metricCPUUsage, metricMemUsage, metricMemWorkSet, metricMemRSS, metricStartTime, metricLastSeen}
)

// ListMetricDescriptors describes the metrics of unikernel pods.
func (s *Service) ListMetricDescriptors(ctx context.Context, r *runtimeapi.ListMetricDescriptorsRequest) (*runtimeapi.ListMetricDescriptorsResponse, error) {
	return &runtimeapi.ListMetricDescriptorsResponse{Descriptors: vmMetricDescriptors}, nil
}

// ListPodSandboxMetrics reports the metrics of ready unikernel pods' running VMs.
func (s *Service) ListPodSandboxMetrics(ctx context.Context, r *runtimeapi.ListPodSandboxMetricsRequest) (*runtimeapi.ListPodSandboxMetricsResponse, error) {
	var out []*runtimeapi.PodSandboxMetrics
	for _, sb := range s.sandboxes.List() {
		if sb.Status().State != store.SandboxReady {
			continue
		}
		md := sb.Meta().Config.GetMetadata()
		pm := &runtimeapi.PodSandboxMetrics{PodSandboxId: sb.ID()}
		for _, c := range s.containersOf(sb.ID()) {
			u, ok := s.usageOf(ctx, c)
			if !ok {
				continue
			}
			labels := []string{md.GetName(), md.GetNamespace(), c.Meta().Config.GetMetadata().GetName(), c.ID(), c.Meta().ImageRef}
			ts := u.ts.UnixNano()
			metric := func(d *runtimeapi.MetricDescriptor, typ runtimeapi.MetricType, v uint64) *runtimeapi.Metric {
				return &runtimeapi.Metric{Name: d.Name, Timestamp: ts, MetricType: typ, LabelValues: labels, Value: &runtimeapi.UInt64Value{Value: v}}
			}
			pm.ContainerMetrics = append(pm.ContainerMetrics, &runtimeapi.ContainerMetrics{ContainerId: c.ID(), Metrics: []*runtimeapi.Metric{
				metric(metricCPUUsage, runtimeapi.MetricType_COUNTER, u.cpu/uint64(time.Second)),
				metric(metricMemUsage, runtimeapi.MetricType_GAUGE, u.memUsage),
				metric(metricMemWorkSet, runtimeapi.MetricType_GAUGE, u.workingSet),
				metric(metricMemRSS, runtimeapi.MetricType_GAUGE, u.rss),
				metric(metricStartTime, runtimeapi.MetricType_GAUGE, uint64(c.Status().StartedAt.Unix())),
				metric(metricLastSeen, runtimeapi.MetricType_GAUGE, uint64(time.Now().Unix())),
			}})
		}
		out = append(out, pm)
	}
	return &runtimeapi.ListPodSandboxMetricsResponse{PodMetrics: out}, nil
}
