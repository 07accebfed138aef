package cri_test

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/stretchr/testify/require"

	"github.com/unilet-dev/unilet/internal/testutil"
)

// scrape fetches and parses the daemon's /metrics.
func scrape(t *testing.T, addr string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(resp.Body)
	require.NoError(t, err)
	return mfs
}

// value is the value of the sample of family name whose labels include
// want (counter, gauge, or a histogram's count); -1 when there is none.
func value(mfs map[string]*dto.MetricFamily, name string, want map[string]string) float64 {
	mf := mfs[name]
	if mf == nil {
		return -1
	}
next:
	for _, m := range mf.GetMetric() {
		have := map[string]string{}
		for _, l := range m.GetLabel() {
			have[l.GetName()] = l.GetValue()
		}
		for k, v := range want {
			if have[k] != v {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.GetCounter().GetValue()
		case m.Gauge != nil:
			return m.GetGauge().GetValue()
		case m.Histogram != nil:
			return float64(m.GetHistogram().GetSampleCount())
		}
	}
	return -1
}

// The metrics endpoint serves what the daemon did and what runs: VMs and
// pods by state, start phases, pulls, CRI calls by method and code, per-VM
// usage labelled with the pod, exits by reason.
func TestMetricsEndpoint(t *testing.T) {
	port, err := testutil.FreePort()
	require.NoError(t, err)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	d := startDaemon(t, "--upstream-endpoint", "", "--metrics-address", addr)
	mfs := scrape(t, addr)
	require.Equal(t, 0.0, value(mfs, "unilet_vms", map[string]string{"state": "running"}))
	require.Greater(t, value(mfs, "process_resident_memory_bytes", nil), 0.0, "the daemon's own process metrics")

	_, err = d.crictl("pull", regHost+"/unikraft/no-such-image:latest")
	require.Error(t, err)
	pod, ctr := d.runVM(t, "vm-metrics", "tick=100")
	_, err = d.crictl("inspect", strings.Repeat("f", 64))
	require.Error(t, err)

	vm := map[string]string{"namespace": "e2e", "pod": "vm-metrics", "container": "app"}
	require.Eventually(t, func() bool {
		mfs = scrape(t, addr)
		return value(mfs, "unilet_start_phase_seconds", map[string]string{"phase": "first_console_line"}) == 1 &&
			value(mfs, "unilet_vm_cpu_seconds_total", vm) > 0
	}, 30*time.Second, 200*time.Millisecond, "first console line and VM CPU time never reported")
	require.Equal(t, 1.0, value(mfs, "unilet_vms", map[string]string{"state": "running"}))
	require.Equal(t, 1.0, value(mfs, "unilet_pods", map[string]string{"state": "ready"}))
	for _, phase := range []string{"netns", "cni", "tap", "sandbox", "cgroup", "shim", "qemu_to_qmp", "container_start"} {
		require.Equal(t, 1.0, value(mfs, "unilet_start_phase_seconds", map[string]string{"phase": phase}), phase)
	}
	require.Equal(t, 1.0, value(mfs, "unilet_image_pulls_total", map[string]string{"result": "success"}))
	require.Equal(t, 1.0, value(mfs, "unilet_image_pulls_total", map[string]string{"result": "failure"}))
	require.Greater(t, value(mfs, "unilet_image_pull_bytes_total", nil), 1000.0)
	require.Equal(t, 2.0, value(mfs, "unilet_image_pull_duration_seconds", nil))
	rt := "runtime.v1.RuntimeService"
	require.Equal(t, 1.0, value(mfs, "unilet_cri_requests_total", map[string]string{"service": rt, "method": "RunPodSandbox", "code": "OK"}))
	require.Equal(t, 1.0, value(mfs, "unilet_cri_requests_total", map[string]string{"service": rt, "method": "StartContainer", "code": "OK"}))
	require.Equal(t, 1.0, value(mfs, "unilet_cri_requests_total", map[string]string{"service": rt, "method": "ContainerStatus", "code": "NotFound"}))
	require.Equal(t, 1.0, value(mfs, "unilet_cri_requests_total", map[string]string{"service": "runtime.v1.ImageService", "method": "PullImage", "code": "NotFound"}))
	require.Greater(t, value(mfs, "unilet_vm_memory_working_set_bytes", vm), 1e6)
	require.Greater(t, value(mfs, "unilet_vm_memory_rss_bytes", vm), 1e6)
	require.Equal(t, float64(64<<20), value(mfs, "unilet_vm_guest_memory_bytes", vm))
	require.Equal(t, 1.0, value(mfs, "unilet_vm_vcpus", vm))
	// Every series the Grafana dashboard plots is served.
	dash, err := os.ReadFile(filepath.Join(repoRoot, "deploy", "grafana", "unilet-dashboard.json"))
	require.NoError(t, err)
	names := regexp.MustCompile(`unilet_[a-z_]+`).FindAllString(string(dash), -1)
	require.NotEmpty(t, names)
	for _, n := range names {
		if n == "unilet_vm_exits_total" || n == "unilet_shim_reconnects_total" {
			continue // none yet: a counter vector has series once something happened
		}
		n = strings.TrimSuffix(n, "_bucket")
		require.Contains(t, mfs, n, "the dashboard plots %s", n)
	}

	d.must("stop", ctr)
	mfs = scrape(t, addr)
	require.Equal(t, 1.0, value(mfs, "unilet_vms", map[string]string{"state": "exited"}))
	require.Equal(t, 0.0, value(mfs, "unilet_vms", map[string]string{"state": "running"}))
	require.Equal(t, -1.0, value(mfs, "unilet_vm_cpu_seconds_total", vm), "no usage series for a VM that ended")
	var exits float64
	for _, m := range mfs["unilet_vm_exits_total"].GetMetric() {
		exits += m.GetCounter().GetValue()
	}
	require.Equal(t, 1.0, exits)
	d.must("rmp", "-f", pod)
	mfs = scrape(t, addr)
	require.Equal(t, 0.0, value(mfs, "unilet_pods", map[string]string{"state": "ready"}))
	require.Equal(t, 0.0, value(mfs, "unilet_vms", map[string]string{"state": "exited"}))
}
