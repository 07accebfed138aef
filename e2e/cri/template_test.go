package cri_test

// VM templates (Kraftlet's instance templates) end to end: uniletctl
// creates, lists and removes them through the daemon; pods annotated with
// cloud.unikraft.v1.instances/template start from one (restored, not
// booted) with their log continuing where the template stopped; clones of
// the network guest answer on their own pod IPs at once; a template that
// cannot be restored falls back to a cold boot with a warning.

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/internal/testutil"
)

// uniletctl runs uniletctl against the daemon.
func (d *daemon) uniletctl(args ...string) (string, error) {
	out, err := exec.Command(filepath.Join(binDir, "uniletctl"), append(args, "--endpoint", "unix://"+d.sock)...).CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

func templatedPod(t *testing.T, name, template string) *runtimeapi.PodSandboxConfig {
	cfg := vmPodConfig(t, name)
	cfg.Annotations["cloud.unikraft.v1.instances/template"] = template
	return cfg
}

// waitWarm waits until template name has a warm clone ready.
func waitWarm(t *testing.T, d *daemon, name string) {
	t.Helper()
	re := regexp.MustCompile(`(?m)^` + name + `\s.*\s[1-9]\d*$`)
	require.Eventually(t, func() bool {
		out, err := d.uniletctl("template", "ls")
		return err == nil && re.MatchString(out)
	}, 30*time.Second, 100*time.Millisecond, "a warm clone of %s", name)
}

// procAge is how long ago process pid started (10 ms resolution).
func procAge(t *testing.T, pid int) time.Duration {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	require.NoError(t, err)
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+2:]))
	start, err := strconv.ParseFloat(f[19], 64) // field 22: start time, in clock ticks after boot
	require.NoError(t, err)
	up, err := os.ReadFile("/proc/uptime")
	require.NoError(t, err)
	secs, err := strconv.ParseFloat(strings.Fields(string(up))[0], 64)
	require.NoError(t, err)
	return time.Duration((secs - start/100) * float64(time.Second))
}

func readLog(t *testing.T, cfg *runtimeapi.PodSandboxConfig) string {
	b, _ := os.ReadFile(filepath.Join(cfg.LogDirectory, "app/0.log"))
	return string(b)
}

func TestTemplatesThroughUniletctl(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "")
	d.must("pull", image())
	rt := d.rt(t)
	ctx := context.Background()

	out, err := d.uniletctl("template", "create", "ticker", "--image", image(), "--arg", "tick=100", "--ready-log", `tick 3\b`)
	require.NoError(t, err, out)
	require.Contains(t, out, "template ticker saved")
	out, err = d.uniletctl("template", "ls")
	require.NoError(t, err, out)
	require.Regexp(t, `(?m)^ticker\s+[0-9a-f]{13}\s+\S+\s+\S+\s+0\s+\d$`, out)
	out, err = d.uniletctl("template", "create", "ticker", "--image", image(), "--ready-after", "1s")
	require.Error(t, err)
	require.Contains(t, out, "exists")

	// A clone runs on from the template: its log continues the ticks, the
	// kernel never boots again. It is the warm clone the daemon made ahead
	// (restored, paused): its QEMU is older than the pod.
	waitWarm(t, d, "ticker")
	time.Sleep(300 * time.Millisecond)
	cfg := templatedPod(t, "clone-a", "ticker")
	t0 := time.Now()
	pod, ctr := startVM(t, rt, cfg)
	qpid := qemuPid(t, rt, ctr)
	require.Greater(t, procAge(t, qpid), time.Since(t0)+150*time.Millisecond, "the clone's QEMU was started before its pod")
	procs := strings.Fields(cgroupValue(t, "memory", d.cgroupRoot+"/"+ctr, "cgroup.procs"))
	require.Len(t, procs, 2, "the warm clone's shim and QEMU moved into the container's cgroup")
	require.Contains(t, procs, strconv.Itoa(qpid))
	require.Eventually(t, func() bool { return strings.Contains(readLog(t, cfg), "tick 6") }, 20*time.Second, 50*time.Millisecond, readLog(t, cfg))
	log := readLog(t, cfg)
	require.NotContains(t, log, "unilet-testkernel: booted", "a clone does not boot")
	require.NotContains(t, log, "tick 1\n", "the ticks before the snapshot are the template's")
	st, err := rt.ContainerStatus(ctx, &runtimeapi.ContainerStatusRequest{ContainerId: ctr, Verbose: true})
	require.NoError(t, err)
	require.Equal(t, runtimeapi.ContainerState_CONTAINER_RUNNING, st.Status.State)
	out, err = d.uniletctl("template", "ls")
	require.NoError(t, err)
	require.Regexp(t, `(?m)^ticker\s.*\s1\s+\d$`, out, "the clone counts as a use")
	_, err = rt.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: pod})
	require.NoError(t, err)

	// A daemon killed with a warm clone staged for a new pod (its tap in
	// the pod, its processes in the pod's cgroup) loses nothing: the next
	// daemon ends the clone, and the pod's container restores the template.
	waitWarm(t, d, "ticker")
	cfg = templatedPod(t, "clone-c", "ticker")
	p, err := rt.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{Config: cfg})
	require.NoError(t, err)
	d.crash()
	d.start()
	rt = d.rt(t)
	c, err := rt.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: p.PodSandboxId, Config: vmContainerConfig(), SandboxConfig: cfg})
	require.NoError(t, err)
	_, err = rt.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: c.ContainerId})
	require.NoError(t, err)
	require.Eventually(t, func() bool { return strings.Contains(readLog(t, cfg), "tick ") }, 20*time.Second, 50*time.Millisecond)
	require.NotContains(t, readLog(t, cfg), "unilet-testkernel: booted")
	_, err = rt.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: p.PodSandboxId})
	require.NoError(t, err)
	waitWarm(t, d, "ticker")
	vms, err := os.ReadDir(filepath.Join(d.stateDir, "vm"))
	require.NoError(t, err)
	require.Len(t, vms, 1, "the new warm clone's directory only: the earlier daemon's clones were swept")

	// Templates survive a daemon restart; the next clone restores as well.
	d.crash()
	d.start()
	rt = d.rt(t)
	cfg = templatedPod(t, "clone-b", "ticker")
	pod, _ = startVM(t, rt, cfg)
	require.Eventually(t, func() bool { return strings.Contains(readLog(t, cfg), "tick ") }, 20*time.Second, 50*time.Millisecond)
	require.NotContains(t, readLog(t, cfg), "unilet-testkernel: booted")
	_, err = rt.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: pod})
	require.NoError(t, err)

	// Refusals name what is wrong.
	for _, c := range []struct {
		template string
		args     []string
		want     string
	}{
		{"missing", nil, "cloud.unikraft.v1.instances/template"},
		{"ticker", []string{"tick=50"}, "differ from template"},
		{"Not_A_Name", nil, "cloud.unikraft.v1.instances/template"},
	} {
		cfg := templatedPod(t, "bad-"+strings.ToLower(strings.ReplaceAll(c.template, "_", "")), c.template)
		p, err := rt.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{Config: cfg})
		if err == nil {
			_, err = rt.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: p.PodSandboxId, Config: vmContainerConfig(c.args...), SandboxConfig: cfg})
			_, _ = rt.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: p.PodSandboxId})
		}
		require.Equal(t, codes.InvalidArgument, status.Code(err), "%s: %v", c.template, err)
		require.ErrorContains(t, err, c.want)
	}

	// A template whose state changed on disk is not used: the VM boots
	// cold, and its log says why.
	statePath := filepath.Join(d.dir, "root", "templates", "ticker", "state")
	f, err := os.OpenFile(statePath, os.O_WRONLY|os.O_APPEND, 0)
	require.NoError(t, err)
	_, _ = f.Write([]byte("tampered"))
	f.Close()
	cfg = templatedPod(t, "cold", "ticker")
	pod, _ = startVM(t, rt, cfg)
	require.Eventually(t, func() bool { return strings.Contains(readLog(t, cfg), "unilet-testkernel: booted") }, 20*time.Second, 50*time.Millisecond)
	require.Contains(t, readLog(t, cfg), `stderr F unilet: template "ticker" could not be restored`)
	_, err = rt.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: pod})
	require.NoError(t, err)

	out, err = d.uniletctl("template", "rm", "ticker")
	require.NoError(t, err, out)
	out, err = d.uniletctl("template", "ls")
	require.NoError(t, err)
	require.NotContains(t, out, "ticker")
	out, err = d.uniletctl("template", "rm", "ticker")
	require.Error(t, err)
	require.Contains(t, out, "NotFound")
}

// Two clones of the network guest at once, each answering HTTP on its own
// pod IP right after its start; removing the image removes its template.
func TestTemplateClonesAnswerOnTheirPodIPs(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "")
	d.must("pull", netImage())
	out, err := d.uniletctl("template", "create", "web", "--image", netImage(), "--arg", "/bin/sh", "--arg", "-c",
		"--arg", "mkdir -p /w && echo served-by-a-clone > /w/index.html && echo READY && exec httpd -f -p 8080 -h /w",
		"--ready-log", "READY", "--timeout", "120s")
	require.NoError(t, err, out)
	var ips, logs []string
	for _, name := range []string{"web-a", "web-b"} {
		logDir := filepath.Join(t.TempDir(), "pods")
		logs = append(logs, filepath.Join(logDir, "web/0.log"))
		pod := d.must("runp", writeJSON(t, map[string]any{
			"metadata":      map[string]any{"name": name, "namespace": "e2e", "uid": name + "-uid"},
			"log_directory": logDir,
			"annotations":   map[string]string{"kubernetes.io/target-runtime": "unikraft", "cloud.unikraft.v1.instances/template": "web"},
		}))
		ctr := d.must("create", pod, writeJSON(t, map[string]any{"metadata": map[string]any{"name": "web"},
			"image": map[string]string{"image": netImage()}, "log_path": "web/0.log"}), "")
		d.must("start", ctr)
		ips = append(ips, d.podIP(pod))
	}
	require.NotEqual(t, ips[0], ips[1])
	for i, ip := range ips {
		require.Equal(t, "served-by-a-clone\n", testutil.MustHTTPGet(t, "http://"+net.JoinHostPort(ip, "8080")+"/index.html", 30*time.Second))
		b, _ := os.ReadFile(logs[i])
		require.NotContains(t, string(b), "could not be restored", "clone %d was restored, not booted", i)
		require.NotContains(t, string(b), "net: eth0 up", "clone %d did not boot again", i)
	}
	d.must("rmp", "-f", "-a")
	d.must("rmi", netImage())
	out, err = d.uniletctl("template", "ls")
	require.NoError(t, err)
	require.NotContains(t, out, "web", "the template of a removed image is removed")
}
