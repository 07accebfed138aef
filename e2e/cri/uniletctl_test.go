package cri_test

import (
	"archive/tar"
	"compress/gzip"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.yaml.in/yaml/v3"
)

// ctl runs uniletctl against the daemon.
func (d *daemon) ctl(args ...string) (string, error) {
	cmd := exec.Command(filepath.Join(binDir, "uniletctl"), append([]string{"--endpoint", "unix://" + d.sock}, args...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), &ctlError{err: err, stderr: stderr.String()}
	}
	return string(out), nil
}

type ctlError struct {
	err    error
	stderr string
}

func (e *ctlError) Error() string { return e.err.Error() + ": " + e.stderr }

func (d *daemon) mustCtl(args ...string) string {
	d.t.Helper()
	out, err := d.ctl(args...)
	require.NoError(d.t, err)
	return out
}

// Every uniletctl command against a real daemon and VM: ps, inspect, logs
// (tail, previous, follow), console, images, diag, version, completion.
func TestUniletctl(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "")
	d.must("pull", image())
	podCfg, _ := podConfig(t, "vm-ctl", true)
	pod := d.must("runp", podCfg)
	// Attempt 0 says hello and ends; attempt 1 echoes its console.
	first := d.must("create", pod, containerConfig(t, image(), []string{"hello-first"}, nil), podCfg)
	d.must("start", first)
	d.waitState(first, "CONTAINER_EXITED", 30*time.Second)
	second := d.must("create", pod, writeJSON(t, map[string]any{"metadata": map[string]any{"name": "app", "attempt": 1},
		"image": map[string]string{"image": image()}, "log_path": "app/1.log", "args": []string{"echo"},
		"envs": []map[string]string{{"key": "SECRET", "value": "hunter2-secret"}}}), podCfg)
	d.must("start", second)
	in := d.waitState(second, "CONTAINER_RUNNING", 10*time.Second)
	waitLog(t, in.Status.LogPath, "echo: ready")

	// ps: a table, JSON and YAML.
	table := d.mustCtl("ps")
	require.Regexp(t, `(?m)^POD\s+CONTAINER\s+STATE\s+IP\s+IMAGE\s+UPTIME\s+MEMORY\s+VCPUS\s+ACCEL\s+TEMPLATE\s+JAIL UID\s+ID$`, table)
	require.Regexp(t, `(?m)^e2e/vm-ctl\s+app\s+running\s+\d+\.\S+\s+\S+testkernel:latest\s+\d+s\s+64Mi\s+1\s+tcg\s+-\s+\d+\s+`+second[:13]+`$`, table)
	require.Regexp(t, `(?m)^e2e/vm-ctl\s+app\s+exited \(Completed, 0\)`, table)
	var ps struct {
		Pods []struct {
			Namespace, Name, State, IP string
			Vms                        []struct {
				ContainerID string `json:"containerId"`
				State       string
				JailUID     string `json:"jailUid"`
				Pid         int
				Attempt     int
			}
		}
	}
	require.NoError(t, json.Unmarshal([]byte(d.mustCtl("ps", "-o", "json")), &ps))
	require.Len(t, ps.Pods, 1)
	require.Equal(t, "ready", ps.Pods[0].State)
	require.Len(t, ps.Pods[0].Vms, 2)
	require.Equal(t, second, ps.Pods[0].Vms[1].ContainerID)
	require.Equal(t, "running", ps.Pods[0].Vms[1].State)
	require.Equal(t, 1, ps.Pods[0].Vms[1].Attempt)
	require.NotEqual(t, "-1", ps.Pods[0].Vms[1].JailUID, "QEMU runs jailed")
	var y map[string]any
	require.NoError(t, yaml.Unmarshal([]byte(d.mustCtl("ps", "-o", "yaml")), &y))
	require.Len(t, y["pods"], 1)

	// inspect: the running QEMU's own command line, proven ours.
	var ins struct {
		ID, State, Pod string
		VM             struct {
			QEMUArgv   []string `json:"qemuArgv"`
			ArgvSource string   `json:"argvSource"`
			Cmdline    string   `json:"guestCmdline"`
			QEMUPid    int      `json:"qemuPid"`
			ShimPid    int      `json:"shimPid"`
			Jail       struct {
				UID int `json:"uid"`
			}
			Cgroup  string
			Files   map[string]int64
			LogPath string `json:"logPath"`
		} `json:"vm"`
	}
	raw := d.mustCtl("inspect", "e2e/vm-ctl/app")
	require.NoError(t, json.Unmarshal([]byte(raw), &ins))
	require.Equal(t, second, ins.ID, "NAMESPACE/POD/CONTAINER names the newest attempt")
	require.Equal(t, "e2e/vm-ctl", ins.Pod)
	require.Contains(t, ins.VM.QEMUArgv[0], "qemu-system-")
	require.Contains(t, ins.VM.QEMUArgv, "-append")
	require.Equal(t, ins.VM.ArgvSource, "/proc/"+strings.TrimSpace(strings.Fields(ins.VM.ArgvSource)[0][6:]))
	require.Positive(t, ins.VM.QEMUPid)
	require.Positive(t, ins.VM.ShimPid)
	require.Contains(t, ins.VM.Cmdline, "hunter2-secret")
	require.Positive(t, ins.VM.Jail.UID)
	require.Contains(t, ins.VM.Cgroup, d.cgroupRoot)
	require.Contains(t, ins.VM.Files, "spec.json")
	require.Equal(t, in.Status.LogPath, ins.VM.LogPath)
	require.NotContains(t, d.mustCtl("inspect", "--redact", second[:12]), "hunter2-secret")
	require.Contains(t, d.mustCtl("inspect", "-o", "yaml", "e2e/vm-ctl"), "kind: pod\n")
	_, err := d.ctl("inspect", "e2e/no-such-pod")
	require.ErrorContains(t, err, "no unikernel pod e2e/no-such-pod on this node (uniletctl ps lists them)")
	_, err = d.ctl("logs", "e2e/vm-ctl")
	require.NoError(t, err, "a pod whose containers share one name names it")

	// logs: all, tail, previous; follow until the VM ends.
	require.Contains(t, d.mustCtl("logs", "e2e/vm-ctl/app"), "echo: ready\n")
	require.NotContains(t, d.mustCtl("logs", "e2e/vm-ctl/app"), " stdout F ", "CRI framing is stripped")
	require.Contains(t, d.mustCtl("logs", "--raw", "e2e/vm-ctl/app"), " stdout F ")
	require.Equal(t, 1, strings.Count(d.mustCtl("logs", "--tail", "1", second), "\n"))
	prev := d.mustCtl("logs", "--previous", "e2e/vm-ctl/app")
	require.Contains(t, prev, "argv[1]: hello-first")
	require.NotContains(t, prev, "echo: ready")
	_, err = d.ctl("logs", "--previous", first)
	require.ErrorContains(t, err, "no previous attempt")

	// console: type, see the echo, Ctrl-] detaches, the VM runs on.
	out := echoThenDetach(t, exec.Command(filepath.Join(binDir, "uniletctl"), "--endpoint", "unix://"+d.sock, "console", "e2e/vm-ctl/app"), "hello-console")
	require.Contains(t, out, "Ctrl-] detaches")
	require.Contains(t, out, "detached")
	require.Equal(t, "CONTAINER_RUNNING", d.inspect(second).Status.State, "detaching must not stop the VM")
	_, err = d.ctl("console", first)
	require.ErrorContains(t, err, "is not running")

	// images and version.
	require.Regexp(t, `(?m)^\S+/unikraft/testkernel:latest\s+[0-9a-f]{13}\s+\S+\s+\d+\.\d(KiB|MiB)\s+-\s+`, d.mustCtl("images"))
	require.Contains(t, d.mustCtl("images", "-o", "json"), `"kernelBytes"`)
	require.Regexp(t, `(?m)^uniletctl \S+\ndaemon unilet \S+ \(CRI v1\)$`, d.mustCtl("version"))
	require.Contains(t, d.mustCtl("completion", "bash"), "__start_uniletctl")

	// diag: a bundle with everything, secrets redacted.
	bundle := filepath.Join(t.TempDir(), "diag.tar.gz")
	require.Contains(t, d.mustCtl("diag", "--output", bundle), "wrote "+bundle)
	files := readTarGz(t, bundle)
	for _, name := range []string{"versions.txt", "config.toml", "cri-status.json", "daemon.log", "pods.json", "images.json", "state.json"} {
		require.Contains(t, files, "unilet-diag/"+name)
	}
	require.Contains(t, files["unilet-diag/versions.txt"], "KVM probe: ")
	require.Contains(t, files["unilet-diag/config.toml"], "[metrics]")
	require.Contains(t, files["unilet-diag/daemon.log"], "unilet serving CRI")
	require.Contains(t, files["unilet-diag/state.json"], `"value": "<redacted>"`)
	var consoles, vms int
	for name, content := range files {
		require.NotContains(t, content, "hunter2-secret", "%s leaks an env value", name)
		if strings.HasSuffix(name, ".console.log") {
			consoles++
		}
		if strings.HasPrefix(name, "unilet-diag/pods/e2e_vm-ctl_") && strings.Contains(name, "/app_") && strings.HasSuffix(name, ".json") {
			vms++
		}
	}
	require.Equal(t, 2, consoles)
	require.Equal(t, 2, vms)

	// logs -f ends when the VM does.
	follow := exec.Command(filepath.Join(binDir, "uniletctl"), "--endpoint", "unix://"+d.sock, "logs", "-f", second)
	var fout syncBuf
	follow.Stdout, follow.Stderr = &fout, &fout
	require.NoError(t, follow.Start())
	fdone := make(chan error, 1)
	go func() { fdone <- follow.Wait() }()
	require.Eventually(t, func() bool { return strings.Contains(fout.String(), "hello-console") }, 10*time.Second, 50*time.Millisecond)
	d.must("stop", second)
	select {
	case err := <-fdone:
		require.NoError(t, err, fout.String())
	case <-time.After(15 * time.Second):
		_ = follow.Process.Kill()
		t.Fatalf("logs -f did not end with the VM: %q", fout.String())
	}
	d.must("rmp", "-f", pod)
	require.Contains(t, d.mustCtl("ps"), "POD")
	require.NotContains(t, d.mustCtl("ps"), "vm-ctl")
}

// readTarGz returns the regular files of a .tar.gz by name.
func readTarGz(t *testing.T, path string) map[string]string {
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	gz, err := gzip.NewReader(f)
	require.NoError(t, err)
	tr := tar.NewReader(gz)
	out := map[string]string{}
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return out
		}
		require.NoError(t, err)
		b, err := io.ReadAll(tr)
		require.NoError(t, err)
		out[h.Name] = string(b)
	}
}
