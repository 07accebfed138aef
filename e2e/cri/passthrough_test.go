package cri_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/unilet-dev/unilet/internal/testimages"
	"github.com/unilet-dev/unilet/internal/testutil"
)

const (
	pauseImage   = testimages.Pause
	busyboxImage = testimages.Busybox
)

// containerd is a real containerd on private directories.
type containerd struct {
	sock string
	cmd  *exec.Cmd
	dir  string
}

// containerdFlavor is one containerd the passthrough tests run against:
// Debian's 1.6 (on PATH) or a current 2.x built from Go modules
// (hack/containerd2) into binDir.
type containerdFlavor struct {
	name   string
	binDir string // "" = Debian's, on PATH
}

// containerd2Bin is where TestMain put the containerd 2.x binaries.
var containerd2Bin string

func containerdFlavors() []containerdFlavor {
	return []containerdFlavor{{name: "containerd-1.6"}, {name: "containerd-2.x", binDir: containerd2Bin}}
}

// startContainerd starts Debian's containerd 1.6.
func startContainerd(t *testing.T) *containerd {
	return startContainerdFlavor(t, containerdFlavor{name: "containerd-1.6"})
}

func startContainerdFlavor(t *testing.T, f containerdFlavor) *containerd {
	t.Helper()
	bin := "containerd"
	if f.binDir != "" {
		bin = filepath.Join(f.binDir, "containerd")
	}
	if _, err := exec.LookPath(bin); err != nil {
		t.Fatalf("%s is required (make deps installs Debian's; hack/containerd2/build.sh builds 2.x): %v", bin, err)
	}
	dir, err := os.MkdirTemp("", "unilet-ctrd-")
	require.NoError(t, err)
	c := &containerd{dir: dir, sock: filepath.Join(dir, "containerd.sock")}
	cniDir := filepath.Join(dir, "cni")
	require.NoError(t, os.MkdirAll(cniDir, 0o755))
	cfg := testimages.ContainerdDirs{Root: filepath.Join(dir, "root"), State: filepath.Join(dir, "state"), Sock: c.sock,
		CNIBin: testutil.CNIBinDir(), CNIConf: cniDir}.Config(f.binDir != "")
	cfgPath := filepath.Join(dir, "config.toml")
	require.NoError(t, os.WriteFile(cfgPath, []byte(cfg), 0o644))
	lf, err := os.Create(filepath.Join(dir, "containerd.log"))
	require.NoError(t, err)
	c.cmd = exec.Command(bin, "--config", cfgPath)
	if f.binDir != "" { // its own shim first
		c.cmd.Env = append(os.Environ(), "PATH="+f.binDir+":"+os.Getenv("PATH"))
	}
	c.cmd.Stdout, c.cmd.Stderr = lf, lf
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	require.NoError(t, c.cmd.Start())
	t.Cleanup(func() {
		// Whatever a failed test left: pods first, then containerd, shims, mounts.
		_ = exec.Command(crictl, "--runtime-endpoint", "unix://"+c.sock, "rmp", "-af").Run()
		done := make(chan struct{})
		go func() { _ = c.cmd.Wait(); close(done) }()
		for i := 0; i < 2; i++ {
			_ = c.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-done:
				i = 2
			case <-time.After(5 * time.Second):
			}
		}
		select {
		case <-done:
		default:
			_ = c.cmd.Process.Kill()
			<-done
		}
		lf.Close()
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(dir, "containerd.log"))
			t.Logf("containerd log (tail):\n%s", tail(string(b), 40))
		}
		testutil.KillProcsUnder("containerd-shim-runc-v2", dir)
		testutil.UnmountUnder(dir)
		os.RemoveAll(dir)
	})
	require.Eventually(t, func() bool {
		_, err := os.Stat(c.sock)
		return err == nil
	}, 20*time.Second, 50*time.Millisecond, "containerd did not start")

	// Offline images: a static pause and Debian's static busybox.
	require.NoError(t, testimages.ImportBase(repoRoot, dir, c.sock))
	return c
}

func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// direct runs crictl straight against containerd.
func (c *containerd) crictl(t *testing.T, args ...string) string {
	out, err := exec.Command(crictl, append([]string{"--runtime-endpoint", "unix://" + c.sock, "--image-endpoint", "unix://" + c.sock}, args...)...).Output()
	require.NoError(t, err)
	return strings.TrimSpace(string(out))
}

func TestPassthroughToContainerd(t *testing.T) {
	for _, f := range containerdFlavors() {
		t.Run(f.name, func(t *testing.T) { testPassthrough(t, f) })
	}
}

func testPassthrough(t *testing.T, f containerdFlavor) {
	ctrd := startContainerdFlavor(t, f)
	d := startDaemon(t, "--upstream-endpoint", "unix://"+ctrd.sock)

	logDir := filepath.Join(t.TempDir(), "pods", "plain")
	podCfg := writeJSON(t, map[string]any{
		"metadata":      map[string]any{"name": "plain", "namespace": "e2e", "uid": "plain-uid"},
		"log_directory": logDir,
		"linux":         map[string]any{"security_context": map[string]any{"namespace_options": map[string]any{"network": 2}}},
	})
	pod := d.must("runp", podCfg)
	require.Contains(t, ctrd.crictl(t, "pods", "-q"), pod, "the pod ID must be containerd's own")

	// A unikernel pod next to it: lists merge both sides.
	vmCfg, _ := podConfig(t, "vm-beside", true)
	d.must("pull", "--pod-config", vmCfg, image())
	vmPod := d.must("runp", vmCfg)
	pods := d.must("pods", "-q")
	require.Contains(t, pods, pod)
	require.Contains(t, pods, vmPod)
	require.NotContains(t, ctrd.crictl(t, "pods", "-q"), vmPod, "unikernel pods never reach containerd")

	ctrCfg := writeJSON(t, map[string]any{"metadata": map[string]any{"name": "sh"}, "image": map[string]string{"image": busyboxImage},
		"command": []string{"/bin/sh", "-c", "echo hi-from-runc; sleep 30"}, "log_path": "sh/0.log"})
	ctr := d.must("create", pod, ctrCfg, podCfg)
	require.Contains(t, ctrd.crictl(t, "ps", "-aq"), ctr, "the container ID must be containerd's own")
	d.must("start", ctr)
	d.waitState(ctr, "CONTAINER_RUNNING", 20*time.Second)
	require.Eventually(t, func() bool {
		out, _ := d.crictl("logs", ctr)
		return strings.Contains(out, "hi-from-runc")
	}, 20*time.Second, 100*time.Millisecond)
	require.Equal(t, "exec-works", d.must("exec", "-s", ctr, "echo", "exec-works"))
	d.must("stop", "--timeout", "1", ctr)
	d.must("rm", ctr)
	d.must("stopp", pod)
	d.must("rmp", pod)
	d.must("rmp", "-f", vmPod)
	require.NotContains(t, ctrd.crictl(t, "pods", "-q"), pod)
	require.Empty(t, d.must("pods", "-q"))
}
