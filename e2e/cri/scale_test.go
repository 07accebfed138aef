package cri_test

// Scale-to-zero and autostart (Kraftlet's annotations) end to end, with the
// network guest serving HTTP on its pod IP through real CNI.

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/unilet-dev/unilet/internal/testutil"
)

// webPod runs the network guest serving /w over HTTP on port 8080, in a pod
// with the annotations ann; /w/value holds a number the guest drew at its
// start (kept in its RAM: /w is in its initramfs).
func (d *daemon) webPod(t *testing.T, name string, ann map[string]string) (pod, ctr, ip, logPath string) {
	t.Helper()
	annotations := map[string]string{"kubernetes.io/target-runtime": "unikraft"}
	for k, v := range ann {
		annotations[k] = v
	}
	logDir := filepath.Join(t.TempDir(), "pods")
	pod = d.must("runp", writeJSON(t, map[string]any{
		"metadata": map[string]any{"name": name, "namespace": "e2e", "uid": name + "-uid"}, "log_directory": logDir,
		"annotations": annotations,
	}))
	ctr = d.must("create", pod, writeJSON(t, map[string]any{"metadata": map[string]any{"name": "web"},
		"image": map[string]string{"image": netImage()}, "log_path": "web/0.log",
		"command": []string{"/bin/sh", "-c", "mkdir -p /w && echo $$$(date +%s%N) > /w/value && echo SERVING && exec httpd -f -p 8080 -h /w"},
	}), "")
	d.must("start", ctr)
	return pod, ctr, d.podIP(pod), filepath.Join(logDir, "web/0.log")
}

// qemuCPU is the CPU time (ticks) of the one QEMU of the daemon's VM dir prefix.
func qemuCPU(t *testing.T, d *daemon, ctr string) uint64 {
	t.Helper()
	for _, q := range testutil.QEMUsUnder(d.stateDir) {
		if filepath.Base(q.VMDir) != ctr[:16] {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", q.Pid))
		require.NoError(t, err)
		f := strings.Fields(string(b)[strings.LastIndexByte(string(b), ')')+2:])
		u, _ := strconv.ParseUint(f[11], 10, 64)
		s, _ := strconv.ParseUint(f[12], 10, 64)
		return u + s
	}
	t.Fatalf("no QEMU for container %s", ctr)
	return 0
}

func (d *daemon) waitReason(t *testing.T, ctr, reason string) {
	t.Helper()
	require.Eventually(t, func() bool { return d.inspect(ctr).Status.Reason == reason }, 30*time.Second, 50*time.Millisecond,
		"container %s never showed reason %q", ctr, reason)
}

// A pod with scale_to_zero on is suspended after its cooldown without
// traffic: it stays RUNNING (reason ScaledToZero) and its QEMU uses no
// CPU; an HTTP request wakes it and is answered, by the same guest (its
// value in RAM is kept); a daemon killed while it is suspended loses
// nothing.
func TestScaleToZeroWakesOnARequest(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "")
	d.must("pull", netImage())
	_, ctr, ip, _ := d.webPod(t, "sleepy", map[string]string{
		"cloud.unikraft.v1.instances/scale_to_zero.policy":           "on",
		"cloud.unikraft.v1.instances/scale_to_zero.stateful":         "true",
		"cloud.unikraft.v1.instances/scale_to_zero.cooldown_time_ms": "1500",
	})
	url := "http://" + net.JoinHostPort(ip, "8080") + "/value"
	value := testutil.MustHTTPGet(t, url, 60*time.Second)
	d.waitReason(t, ctr, "ScaledToZero")
	in := d.inspect(ctr)
	require.Equal(t, "CONTAINER_RUNNING", in.Status.State)
	require.Contains(t, in.Status.Message, "scale-to-zero")
	cpu := qemuCPU(t, d, ctr)
	time.Sleep(2 * time.Second)
	used := qemuCPU(t, d, ctr) - cpu
	t.Logf("a suspended VM's QEMU used %d ticks (10 ms each) in 2 s", used)
	// Stopped vCPUs: what is left is QEMU's main loop on host-clock timers
	// (the guest's RTC) — at most 3 % of a core, where a running guest's
	// emulation takes a share of one for itself.
	require.LessOrEqual(t, used, uint64(6), "a suspended VM's QEMU uses (next to) no CPU")
	require.Equal(t, "ScaledToZero", d.inspect(ctr).Status.Reason, "it stayed suspended while measured")

	t0 := time.Now()
	require.Equal(t, value, testutil.MustHTTPGet(t, url, 10*time.Second), "the same guest answers: its RAM was kept")
	t.Logf("woke and answered in %s", time.Since(t0))
	require.Empty(t, d.inspect(ctr).Status.Reason)

	// Suspended again, then the daemon dies: the VM stays suspended, and
	// wakes for the next request to the restarted daemon's pod.
	d.waitReason(t, ctr, "ScaledToZero")
	d.crash()
	d.start()
	d.waitReason(t, ctr, "ScaledToZero")
	require.Equal(t, value, testutil.MustHTTPGet(t, url, 10*time.Second))
	d.must("rmp", "-f", "-a")
}

// autostart false: the VM is prepared but its guest does not run until the
// first request for the pod, which is answered.
func TestAutostartOffBootsOnTheFirstRequest(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "")
	d.must("pull", netImage())
	_, ctr, ip, logPath := d.webPod(t, "lazy", map[string]string{"cloud.unikraft.v1.instances/autostart": "false"})
	in := d.inspect(ctr)
	require.Equal(t, "CONTAINER_RUNNING", in.Status.State)
	require.Equal(t, "AwaitingFirstRequest", in.Status.Reason, in.Status.Message)
	time.Sleep(time.Second)
	b, _ := os.ReadFile(logPath)
	require.NotContains(t, string(b), "SERVING", "the guest ran before the first request")
	require.NotEmpty(t, testutil.MustHTTPGet(t, "http://"+net.JoinHostPort(ip, "8080")+"/value", 60*time.Second))
	waitLog(t, logPath, "SERVING")
	require.Empty(t, d.inspect(ctr).Status.Reason)
	d.must("rmp", "-f", "-a")
}
