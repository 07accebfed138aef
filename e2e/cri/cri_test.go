// Package cri_test drives the real unilet daemon with a real crictl (built
// from sigs.k8s.io/cri-tools) and real QEMU: images are packed with our own
// uniletctl, served by an in-process registry on loopback, and booted as
// unikernel pods.
package cri_test

import (
	"encoding/json"
	"fmt"
	"io"
	"log"
	"maps"
	"net"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/stretchr/testify/require"

	"github.com/unilet-dev/unilet/internal/testimages"
	"github.com/unilet-dev/unilet/internal/testutil"
	"github.com/unilet-dev/unilet/pkg/cgroups"
)

var (
	repoRoot string
	binDir   string
	crictl   string
	kernel   string
	regHost  string
)

func TestMain(m *testing.M) {
	testutil.MainNeedsRoot("e2e/cri", testutil.LaneE2E)
	testutil.MainWith("e2e", func() (int, error) { return setup(m) })
}

// run is testutil.Run.
var run = testutil.Run

func setup(m *testing.M) (int, error) {
	wd, _ := os.Getwd()
	repoRoot = filepath.Join(wd, "..", "..")
	tmp, err := os.MkdirTemp("", "unilet-e2e-")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(tmp)
	binDir = filepath.Join(tmp, "bin")
	build := []string{"build", "-o", binDir + "/"}
	if raceBuild {
		build = append(build, "-race")
	}
	if err := run(repoRoot, nil, "go", append(build, "./cmd/unilet", "./cmd/uniletctl", "./cmd/unilet-shim", "./cmd/unilet-jail")...); err != nil {
		return 0, err
	}
	crictl = os.Getenv("CRICTL")
	if crictl == "" {
		crictl = filepath.Join(repoRoot, "_output", "bin", "crictl")
		if err := run(filepath.Join(repoRoot, "hack", "tools"), []string{"GOSUMDB=off", "GOFLAGS=-mod=mod"},
			"go", "build", "-o", crictl, "sigs.k8s.io/cri-tools/cmd/crictl"); err != nil {
			return 0, err
		}
	}
	containerd2Bin = os.Getenv("CONTAINERD2_BIN")
	if containerd2Bin == "" {
		containerd2Bin = filepath.Join(repoRoot, "_output", "containerd2", "bin")
		if err := run(repoRoot, nil, "./hack/containerd2/build.sh", containerd2Bin); err != nil {
			return 0, err
		}
	}
	kernel = filepath.Join(tmp, "testkernel.elf")
	if err := run(repoRoot, nil, "./e2e/guest/testkernel/build.sh", kernel); err != nil {
		return 0, err
	}
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	defer srv.Close()
	u, _ := url.Parse(srv.URL)
	regHost = u.Host
	if err := run(repoRoot, nil, filepath.Join(binDir, "uniletctl"), "pack", "--kernel", kernel, "--arg", "default-arg",
		"--env", "IMAGE_ENV=from image", "--push", regHost+"/unikraft/testkernel:latest", "--insecure"); err != nil {
		return 0, err
	}
	if err := buildNetGuest(); err != nil {
		return 0, err
	}
	return m.Run(), nil
}

// buildNetGuest builds the Debian kernel + busybox guest (cached under
// _output/netguest) and pushes it as netguest:latest.
func buildNetGuest() error {
	out := filepath.Join(repoRoot, "_output", "netguest")
	if err := run(repoRoot, nil, "./e2e/guest/netguest/build.sh", out); err != nil {
		return err
	}
	kc := filepath.Join(out, "kconfig")
	if err := os.WriteFile(kc, []byte(testimages.NetGuestKConfig), 0o644); err != nil {
		return err
	}
	return run(repoRoot, nil, filepath.Join(binDir, "uniletctl"), "pack", "--kernel", filepath.Join(out, "vmlinuz"),
		"--initrd", filepath.Join(out, "initrd.gz"), "--kconfig", kc, "--label", "dev.unilet.min-memory=128",
		"--push", regHost+"/unikraft/netguest:latest", "--insecure")
}

// daemon is one running unilet.
type daemon struct {
	t        *testing.T
	dir      string
	sock     string
	stateDir string
	cmd      *exec.Cmd
	done     chan struct{}
	args     []string
	logFile  string
	// Per-daemon pod network and cgroup parent.
	cniConf, bridge, subnet, netnsDir, cgroupRoot string
}

// netSeq numbers the test networks: daemon N gets bridge ulbN and
// 198.18.N.0/24 (a benchmarking range that collides with nothing).
var netSeq = 0

// writeCNIConf writes a bridge + host-local network for one daemon and
// returns its directory, bridge name and subnet prefix ("198.18.N").
func writeCNIConf(t *testing.T, dir string) (confDir, bridge, prefix string) {
	netSeq++
	bridge = fmt.Sprintf("ulb%d", netSeq)
	prefix = fmt.Sprintf("198.18.%d", netSeq)
	confDir = filepath.Join(dir, "cni")
	require.NoError(t, os.MkdirAll(confDir, 0o755))
	conf := fmt.Sprintf(`{"cniVersion": "1.0.0", "name": "unilet-e2e-%d", "plugins": [{"type": "bridge", "bridge": %q,
  "isGateway": true, "ipMasq": false, "ipam": {"type": "host-local", "dataDir": %q,
  "ranges": [[{"subnet": "%s.0/24", "gateway": "%s.1"}]], "routes": [{"dst": "0.0.0.0/0"}]}}]}`,
		netSeq, bridge, filepath.Join(dir, "ipam"), prefix, prefix)
	require.NoError(t, os.WriteFile(filepath.Join(confDir, "10-unilet-e2e.conflist"), []byte(conf), 0o644))
	return confDir, bridge, prefix
}

func startDaemon(t *testing.T, extra ...string) *daemon {
	t.Helper()
	dir, err := os.MkdirTemp("", "unilet-d-")
	require.NoError(t, err)
	d := &daemon{t: t, dir: dir, sock: filepath.Join(dir, "unilet.sock"), stateDir: filepath.Join(dir, "run"), logFile: filepath.Join(dir, "unilet.log")}
	d.cniConf, d.bridge, d.subnet = writeCNIConf(t, dir)
	d.netnsDir = filepath.Join(dir, "netns")
	d.cgroupRoot = "/unilet-e2e/" + filepath.Base(dir)
	d.args = append([]string{"--listen", "unix://" + d.sock, "--root", filepath.Join(dir, "root"), "--state-dir", d.stateDir,
		"--insecure-registry", regHost, "--accel", "auto", "--log-level", "debug",
		"--cni-conf-dir", d.cniConf, "--cni-bin-dir", testutil.CNIBinDir(), "--netns-dir", d.netnsDir, "--cgroup-root", d.cgroupRoot,
		// No idle shims: these tests count shim processes exactly (TestShimPool covers the pool).
		"--shim-pool", "0"}, extra...)
	if !slices.Contains(extra, "--pod-log-root") { // the tests' pods log to their temp directories
		d.args = append(d.args, "--pod-log-root", os.TempDir())
	}
	t.Cleanup(func() {
		d.stop()
		// VMs outlive the daemon by design: end whatever a test left behind.
		testutil.KillProcsUnder("unilet-shim", dir)
		testutil.KillQEMUsUnder(dir)
		// Races the daemon or its shims reported (GORACE log_path).
		reports, _ := filepath.Glob(filepath.Join(dir, "race.*"))
		for _, r := range reports {
			b, _ := os.ReadFile(r)
			t.Errorf("the race detector reported (%s):\n%s", filepath.Base(r), b)
		}
		if t.Failed() {
			b, _ := os.ReadFile(d.logFile)
			t.Logf("unilet log:\n%s", b)
		}
		// Whatever a failed test left: namespaces, the bridge, cgroups.
		ents, _ := os.ReadDir(d.netnsDir)
		for _, e := range ents {
			_ = syscall.Unmount(filepath.Join(d.netnsDir, e.Name()), syscall.MNT_DETACH)
		}
		_ = exec.Command("ip", "link", "del", d.bridge).Run()
		cgroups.RemoveTree(d.cgroupRoot)
		cgroups.RemoveIfEmpty(path.Dir(d.cgroupRoot)) // /unilet-e2e once empty
		os.RemoveAll(dir)
	})
	d.start()
	return d
}

// start launches unilet (again) on the daemon's directories.
func (d *daemon) start() {
	t := d.t
	t.Helper()
	lf, err := os.OpenFile(d.logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	require.NoError(t, err)
	d.cmd = exec.Command(filepath.Join(binDir, "unilet"), d.args...)
	// Race reports of the daemon and its shims land beside its log (checked at cleanup).
	d.cmd.Env = append(os.Environ(), "GORACE=log_path="+filepath.Join(d.dir, "race"))
	d.cmd.Stdout, d.cmd.Stderr = lf, lf
	require.NoError(t, d.cmd.Start())
	d.done = make(chan struct{})
	go func(cmd *exec.Cmd, done chan struct{}) { _ = cmd.Wait(); lf.Close(); close(done) }(d.cmd, d.done)
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		conn, err := net.Dial("unix", d.sock)
		if err == nil {
			conn.Close()
			return
		}
		if time.Now().After(deadline) {
			// Leave a goroutine dump in the daemon's log (printed on failure).
			_ = d.cmd.Process.Signal(syscall.SIGQUIT)
			time.Sleep(time.Second)
			t.Fatal("unilet did not serve its socket within 15s")
		}
	}
}

// stop sends SIGTERM and waits (kills after 10 s).
func (d *daemon) stop() {
	if d.cmd == nil {
		return
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
	case <-time.After(10 * time.Second):
		_ = d.cmd.Process.Kill()
		<-d.done
	}
}

// crash kills unilet with SIGKILL.
func (d *daemon) crash() {
	_ = d.cmd.Process.Kill()
	<-d.done
}

// crictl runs crictl against the daemon; returns stdout, stderr-included error.
func (d *daemon) crictl(args ...string) (string, error) {
	cmd := exec.Command(crictl, append([]string{"--runtime-endpoint", "unix://" + d.sock, "--image-endpoint", "unix://" + d.sock, "--timeout", "30s"}, args...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("crictl %s: %v: %s", strings.Join(args, " "), err, stderr.String())
	}
	return strings.TrimSpace(string(out)), nil
}

func (d *daemon) must(args ...string) string {
	d.t.Helper()
	out, err := d.crictl(args...)
	require.NoError(d.t, err)
	return out
}

func writeJSON(t *testing.T, v any) string {
	f, err := os.CreateTemp(t.TempDir(), "*.json")
	require.NoError(t, err)
	require.NoError(t, json.NewEncoder(f).Encode(v))
	f.Close()
	return f.Name()
}

func podConfig(t *testing.T, name string, annotated bool) (string, string) {
	logDir := filepath.Join(t.TempDir(), "pods", name)
	cfg := map[string]any{
		"metadata":      map[string]any{"name": name, "namespace": "e2e", "uid": name + "-uid", "attempt": 0},
		"log_directory": logDir,
	}
	if annotated {
		cfg["annotations"] = map[string]string{"kubernetes.io/target-runtime": "unikraft"}
	}
	return writeJSON(t, cfg), logDir
}

func containerConfig(t *testing.T, image string, args []string, env map[string]string) string {
	var envs []map[string]string
	for k, v := range env {
		envs = append(envs, map[string]string{"key": k, "value": v})
	}
	cfg := map[string]any{"metadata": map[string]any{"name": "app"}, "image": map[string]string{"image": image},
		"log_path": "app/0.log", "envs": envs}
	if args != nil {
		cfg["args"] = args
	}
	return writeJSON(t, cfg)
}

type inspect struct {
	Status struct {
		State      string `json:"state"`
		ExitCode   int32  `json:"exitCode"`
		Reason     string `json:"reason"`
		Message    string `json:"message"`
		CreatedAt  string `json:"createdAt"`
		StartedAt  string `json:"startedAt"`
		FinishedAt string `json:"finishedAt"`
		LogPath    string `json:"logPath"`
	} `json:"status"`
}

func (d *daemon) inspect(id string) inspect {
	d.t.Helper()
	var in inspect
	require.NoError(d.t, json.Unmarshal([]byte(d.must("inspect", "-o", "json", id)), &in))
	return in
}

func (d *daemon) waitState(id, state string, timeout time.Duration) inspect {
	d.t.Helper()
	var in inspect
	require.Eventually(d.t, func() bool {
		in = d.inspect(id)
		return in.Status.State == state
	}, timeout, 50*time.Millisecond, "container %s never reached %s", id, state)
	return in
}

func qemuProcesses(t *testing.T, stateDir string) []string {
	var found []string
	for _, q := range testutil.QEMUsUnder(stateDir) {
		found = append(found, strconv.Itoa(q.Pid)+" "+q.VMDir+" "+q.Cmdline)
	}
	return found
}

// runVM pulls the test image, runs an annotated pod and starts one container
// with args; it returns the pod and container IDs.
func (d *daemon) runVM(t *testing.T, podName string, args ...string) (pod, ctr string) {
	t.Helper()
	d.must("pull", image())
	podCfg, _ := podConfig(t, podName, true)
	pod = d.must("runp", podCfg)
	ctr = d.must("create", pod, containerConfig(t, image(), args, nil), podCfg)
	d.must("start", ctr)
	return pod, ctr
}

func image() string { return regHost + "/unikraft/testkernel:latest" }

func TestUnikernelPodLifecycle(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "")
	d.must("pull", image())
	imgs := d.must("images", "-o", "json")
	require.Contains(t, imgs, regHost+"/unikraft/testkernel:latest")
	require.Contains(t, imgs, regHost+"/unikraft/testkernel@sha256:")

	podCfg, logDir := podConfig(t, "vm-lifecycle", true)
	pod := d.must("runp", podCfg)
	require.Len(t, pod, 64)
	// Values that once smuggled library parameters into the guest (an env
	// value ending in "]" closed the env.vars list), and arguments the
	// guest's parser treats specially: all must arrive exactly as given.
	env := map[string]string{"GREETING": "hi there", "LIST": "[1,2]", "INJ": "x] netdev.ip=6.6.6.6/24 ukdebug.loglevel=9", "AFTER": "lost"}
	ctr := d.must("create", pod, containerConfig(t, image(), []string{"hello", "big world", `quote"d`, "--", "help", `back\slash`}, env), podCfg)
	require.Equal(t, "CONTAINER_CREATED", d.inspect(ctr).Status.State)
	d.must("start", ctr)
	in := d.waitState(ctr, "CONTAINER_EXITED", 30*time.Second)
	require.Equal(t, int32(0), in.Status.ExitCode, in.Status.Message)
	require.Equal(t, "Completed", in.Status.Reason)
	require.Equal(t, filepath.Join(logDir, "app/0.log"), in.Status.LogPath)
	created, started, finished := parseTime(t, in.Status.CreatedAt), parseTime(t, in.Status.StartedAt), parseTime(t, in.Status.FinishedAt)
	require.True(t, !created.After(started) && started.Before(finished), "created %v ≤ started %v < finished %v", created, started, finished)
	require.WithinDuration(t, time.Now(), finished, time.Minute)

	raw, err := os.ReadFile(in.Status.LogPath)
	require.NoError(t, err)
	for _, want := range []string{" stdout F unilet-testkernel: booted", " stdout F argv[1]: hello", " stdout F argv[2]: big world",
		` stdout F argv[3]: quote"d`, " stdout F argv[4]: --", " stdout F argv[5]: help", ` stdout F argv[6]: back\slash`, " stdout F argc: 7",
		" stdout F env: IMAGE_ENV=from image", " stdout F env: GREETING=hi there", " stdout F env: LIST=[1,2]\n",
		" stdout F env: INJ=x] netdev.ip=6.6.6.6/24 ukdebug.loglevel=9\n", " stdout F env: AFTER=lost\n", " stdout F envc: 5"} {
		require.Contains(t, string(raw), want)
	}
	require.NotContains(t, string(raw), "param: ukdebug")
	require.NotContains(t, string(raw), "6.6.6.6/24\n")
	logs := d.must("logs", ctr)
	require.Contains(t, logs, "argv[2]: big world", "crictl must parse the CRI log format")

	d.must("rm", ctr)
	d.must("stopp", pod)
	d.must("rmp", pod)
	require.Empty(t, d.must("pods", "-q"))
	require.Empty(t, d.must("ps", "-aq"))
	ents, _ := os.ReadDir(filepath.Join(d.stateDir, "vm"))
	require.Empty(t, ents, "no VM state may be left behind")
	require.Empty(t, qemuProcesses(t, d.stateDir))
	// Stopping what is gone is idempotent.
	d.must("stopp", pod)
}

func TestImageCmdAndLongRunningStop(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "")
	d.must("pull", image())
	podCfg, _ := podConfig(t, "vm-stop", true)
	pod := d.must("runp", podCfg)
	// No args: the image Cmd ("default-arg") applies.
	ctr := d.must("create", pod, containerConfig(t, image(), nil, nil), podCfg)
	d.must("start", ctr)
	in := d.waitState(ctr, "CONTAINER_EXITED", 30*time.Second)
	raw, err := os.ReadFile(in.Status.LogPath)
	require.NoError(t, err)
	require.Contains(t, string(raw), "argv[1]: default-arg")
	d.must("rm", ctr)

	// A guest that honours ACPI power-off stops gracefully: exit 0.
	ctr = d.must("create", pod, writeJSON(t, map[string]any{"metadata": map[string]any{"name": "graceful"},
		"image": map[string]string{"image": image()}, "args": []string{"tick=50"}, "log_path": "graceful/0.log"}), podCfg)
	d.must("start", ctr)
	in = d.waitState(ctr, "CONTAINER_RUNNING", 10*time.Second)
	waitLog(t, in.Status.LogPath, "tick 3\n")
	d.must("stop", "--timeout", "10", ctr)
	in = d.inspect(ctr)
	require.Equal(t, "CONTAINER_EXITED", in.Status.State)
	require.Equal(t, int32(0), in.Status.ExitCode, in.Status.Message)
	require.Equal(t, "Completed", in.Status.Reason)

	// A guest that ignores it is killed when the timeout expires: 137.
	ticker := containerConfig(t, image(), []string{"tick=50", "ignore-acpi"}, nil)
	ctr = d.must("create", pod, ticker, podCfg)
	d.must("start", ctr)
	in = d.waitState(ctr, "CONTAINER_RUNNING", 10*time.Second)
	require.Len(t, qemuProcesses(t, d.stateDir), 1)
	waitLog(t, in.Status.LogPath, "tick 5\n")
	start := time.Now()
	d.must("stop", "--timeout", "1", ctr)
	require.Less(t, time.Since(start), 6*time.Second, "stop must honour its timeout")
	require.GreaterOrEqual(t, time.Since(start), time.Second, "the guest gets its timeout before the kill")
	in = d.inspect(ctr)
	require.Equal(t, "CONTAINER_EXITED", in.Status.State)
	require.Equal(t, int32(137), in.Status.ExitCode)
	require.Equal(t, "Killed", in.Status.Reason)
	require.Empty(t, qemuProcesses(t, d.stateDir))
	d.must("rmp", "-f", pod)
}

func TestRuntimeHandlerRoute(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "")
	d.must("pull", image())
	podCfg, _ := podConfig(t, "vm-handler", false)
	pod := d.must("runp", "--runtime", "unikraft", podCfg)
	ctr := d.must("create", pod, containerConfig(t, image(), []string{"via-handler"}, nil), podCfg)
	d.must("start", ctr)
	in := d.waitState(ctr, "CONTAINER_EXITED", 30*time.Second)
	require.Equal(t, int32(0), in.Status.ExitCode)
	raw, _ := os.ReadFile(in.Status.LogPath)
	require.Contains(t, string(raw), "argv[1]: via-handler")
	d.must("rmp", "-f", pod)
}

func TestBadInputs(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "")
	d.must("pull", image())

	// A plain pod with no upstream configured.
	plainCfg, _ := podConfig(t, "plain", false)
	_, err := d.crictl("runp", plainCfg)
	require.ErrorContains(t, err, "FailedPrecondition")
	require.ErrorContains(t, err, "no upstream runtime configured")

	// An annotation with the wrong value is not a unikernel pod.
	wrong := writeJSON(t, map[string]any{"metadata": map[string]any{"name": "wrong", "namespace": "e2e", "uid": "w"},
		"annotations": map[string]string{"kubernetes.io/target-runtime": ""}})
	_, err = d.crictl("runp", wrong)
	require.ErrorContains(t, err, "FailedPrecondition")

	podCfg, _ := podConfig(t, "vm-bad", true)
	pod := d.must("runp", podCfg)
	_, err = d.crictl("create", pod, containerConfig(t, regHost+"/unikraft/nope:1", nil, nil), podCfg)
	require.ErrorContains(t, err, "NotFound")
	require.ErrorContains(t, err, "pull it first")

	_, err = d.crictl("create", pod, containerConfig(t, image(), []string{strings.Repeat("x", 5000)}, nil), podCfg)
	require.ErrorContains(t, err, "InvalidArgument")
	require.ErrorContains(t, err, "the guest accepts at most 4095")

	_, err = d.crictl("pull", regHost+"/unikraft/missing:1")
	require.ErrorContains(t, err, "pull unikernel image")

	// Request limits: a name CNI cannot carry, oversized annotations.
	for _, c := range []struct {
		md   map[string]any
		ann  map[string]string
		want string
	}{
		{map[string]any{"name": "a=b", "namespace": "e2e", "uid": "x"}, nil, "not allowed in a pod's name"},
		{map[string]any{"name": "big", "namespace": "e2e", "uid": "y"}, map[string]string{"big": strings.Repeat("x", 300<<10)}, "annotations take"},
	} {
		ann := map[string]string{"kubernetes.io/target-runtime": "unikraft"}
		maps.Copy(ann, c.ann)
		_, err = d.crictl("runp", writeJSON(t, map[string]any{"metadata": c.md, "annotations": ann}))
		require.ErrorContains(t, err, "InvalidArgument")
		require.ErrorContains(t, err, c.want)
	}
	_, err = d.crictl("start", "0123456789abcdef")
	require.ErrorContains(t, err, "NotFound")
	_, err = d.crictl("exec", "-s", "0123456789abcdef", "true")
	require.Error(t, err)
	require.Empty(t, d.must("ps", "-aq"), "failed creates must leave nothing")
	d.must("rmp", "-f", pod)
}

func TestExecIsUnsupported(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "")
	pod, ctr := d.runVM(t, "vm-exec", "tick=100")
	// Stats come from the VM's QEMU process.
	var stats struct {
		Stats []struct {
			CPU struct {
				UsageCoreNanoSeconds struct {
					Value string `json:"value"`
				} `json:"usageCoreNanoSeconds"`
			} `json:"cpu"`
			Memory struct {
				WorkingSetBytes struct {
					Value string `json:"value"`
				} `json:"workingSetBytes"`
			} `json:"memory"`
		} `json:"stats"`
	}
	require.Eventually(t, func() bool {
		require.NoError(t, json.Unmarshal([]byte(d.must("stats", "-o", "json", "--id", ctr)), &stats))
		return len(stats.Stats) == 1 && stats.Stats[0].CPU.UsageCoreNanoSeconds.Value != "" && stats.Stats[0].CPU.UsageCoreNanoSeconds.Value != "0"
	}, 10*time.Second, 200*time.Millisecond, "CPU time of a running VM")
	mem, err := strconv.ParseUint(stats.Stats[0].Memory.WorkingSetBytes.Value, 10, 64)
	require.NoError(t, err)
	require.Greater(t, mem, uint64(10<<20), "QEMU's resident memory")
	_, err = d.crictl("exec", "-s", ctr, "ls")
	require.ErrorContains(t, err, "Unimplemented")
	require.ErrorContains(t, err, "exec is not possible")
	d.must("stop", ctr)
	_, err = d.crictl("attach", ctr)
	require.ErrorContains(t, err, "FailedPrecondition")
	require.ErrorContains(t, err, "is not running")
	d.must("rmp", "-f", pod)
	require.Empty(t, qemuProcesses(t, d.stateDir))
}

func TestDeadUpstream(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "unix:///nonexistent/containerd.sock", "--unikernel-registry", "unikraft.org")
	podCfg, _ := podConfig(t, "vm-dead-up", true)
	// Routed by the pod's annotation, not the registry.
	d.must("pull", "--pod-config", podCfg, image())
	// Lists degrade to the unikernel side.
	pod := d.must("runp", podCfg)
	require.Equal(t, pod, d.must("pods", "-q"))
	// A plain pod gets a clear Unavailable error.
	plainCfg, _ := podConfig(t, "plain", false)
	_, err := d.crictl("runp", plainCfg)
	require.ErrorContains(t, err, "Unavailable")
	require.ErrorContains(t, err, "upstream runtime unreachable")
	info := d.must("info")
	require.Contains(t, info, "UpstreamUnreachable")
	require.Contains(t, d.must("images"), "unikraft/testkernel")
	d.must("rmp", "-f", pod)
}

func TestDaemonBasics(t *testing.T) {
	out, err := exec.Command(filepath.Join(binDir, "unilet"), "--version").CombinedOutput()
	require.NoError(t, err)
	require.True(t, strings.HasPrefix(string(out), "unilet "), string(out))

	d := startDaemon(t, "--upstream-endpoint", "")
	fi, err := os.Stat(d.sock)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), fi.Mode().Perm(), "the CRI socket must be private")
	require.Contains(t, d.must("version"), "RuntimeName:  unilet")
	require.Contains(t, d.must("info"), `"accel": "tcg"`)

	// SIGTERM with a VM running: clean exit, socket removed, the VM keeps running
	// under its shim (it is not the daemon's to kill).
	pod, ctr := d.runVM(t, "vm-sigterm", "tick=100")
	require.Len(t, qemuProcesses(t, d.stateDir), 1)
	require.NoError(t, d.cmd.Process.Signal(syscall.SIGTERM))
	<-d.done
	require.Equal(t, 0, d.cmd.ProcessState.ExitCode(), "unilet must exit 0 on SIGTERM")
	_, err = os.Stat(d.sock)
	require.True(t, os.IsNotExist(err), "socket must be removed on shutdown")
	require.Len(t, qemuProcesses(t, d.stateDir), 1, "VMs outlive the daemon")
	d.start()
	require.Equal(t, "CONTAINER_RUNNING", d.inspect(ctr).Status.State)
	d.must("rmp", "-f", pod)
	require.Empty(t, qemuProcesses(t, d.stateDir))
}

func TestStateSurvivesDaemonRestart(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "")
	d.must("pull", image())
	podCfg, _ := podConfig(t, "vm-restart", true)
	pod := d.must("runp", podCfg)
	done := d.must("create", pod, containerConfig(t, image(), []string{"quick"}, nil), podCfg)
	d.must("start", done)
	d.waitState(done, "CONTAINER_EXITED", 30*time.Second)
	running := d.must("create", pod, writeJSON(t, map[string]any{"metadata": map[string]any{"name": "ticker"},
		"image": map[string]string{"image": image()}, "args": []string{"tick=20"}, "log_path": "ticker/0.log"}), podCfg)
	d.must("start", running)
	in := d.waitState(running, "CONTAINER_RUNNING", 10*time.Second)
	pids := qemuProcesses(t, d.stateDir)
	require.Len(t, pids, 1)

	// kill -9 of the daemon stops no VM; a new daemon serves it; the console
	// keeps flowing into the log with no gap and no duplicate.
	d.crash()
	waitLogGrows(t, in.Status.LogPath) // the console goes on with no daemon
	require.Equal(t, pids, qemuProcesses(t, d.stateDir), "the VM must survive the daemon")
	d.start()
	require.Equal(t, pod, d.must("pods", "-q"))
	require.Equal(t, "CONTAINER_RUNNING", d.inspect(running).Status.State)
	in2 := d.inspect(done)
	require.Equal(t, "CONTAINER_EXITED", in2.Status.State)
	require.Equal(t, int32(0), in2.Status.ExitCode)
	require.Equal(t, "Completed", in2.Status.Reason)
	d.crash() // twice in a row
	d.start()
	waitLog(t, in.Status.LogPath, "tick 60\n")
	d.must("stop", "--timeout", "10", running)
	st := d.inspect(running)
	require.Equal(t, int32(0), st.Status.ExitCode, st.Status.Message)
	b, err := os.ReadFile(in.Status.LogPath)
	require.NoError(t, err)
	n := 1
	for _, l := range strings.Split(string(b), "\n") {
		if i := strings.Index(l, " stdout F tick "); i >= 0 {
			require.Equal(t, fmt.Sprintf("tick %d", n), l[i+len(" stdout F "):], "console lines across restarts: no gap, no duplicate")
			n++
		}
	}
	require.Greater(t, n, 60)

	// A VM that ends while the daemon is away reports its recorded exit.
	late := d.must("create", pod, writeJSON(t, map[string]any{"metadata": map[string]any{"name": "late"},
		"image": map[string]string{"image": image()}, "args": []string{"tick=100", "count=10"}, "log_path": "late/0.log"}), podCfg)
	d.must("start", late)
	d.crash()
	// Its shim records the exit with no daemon to tell.
	waitFile(t, filepath.Join(d.stateDir, "vm", late[:16], "exit.json"), 30*time.Second)
	d.start()
	st = d.waitState(late, "CONTAINER_EXITED", 10*time.Second)
	require.Equal(t, int32(0), st.Status.ExitCode)
	require.Equal(t, "Completed", st.Status.Reason)

	d.must("rmp", "-f", pod)
	d.stop()
	d.start()
	require.Empty(t, d.must("pods", "-q"))
	require.Empty(t, d.must("ps", "-aq"))
	require.Empty(t, qemuProcesses(t, d.stateDir))
	ents, _ := os.ReadDir(filepath.Join(d.stateDir, "vm"))
	require.Empty(t, ents)
}

func parseTime(t *testing.T, s string) time.Time {
	t.Helper()
	ts, err := time.Parse(time.RFC3339Nano, s)
	require.NoError(t, err, "timestamp %q", s)
	return ts
}

func TestPackOutputLayoutAndDigestRefs(t *testing.T) {
	out := filepath.Join(t.TempDir(), "layout")
	b, err := exec.Command(filepath.Join(binDir, "uniletctl"), "pack", "--kernel", kernel, "--output", out).CombinedOutput()
	require.NoError(t, err, string(b))
	idx, err := os.ReadFile(filepath.Join(out, "index.json"))
	require.NoError(t, err)
	require.Contains(t, string(idx), `"platform":{"architecture":"x86_64","os":"qemu"}`)
	require.Contains(t, string(idx), `"sh.kraftkit.version"`)

	// A pulled image runs by its repo digest too.
	d := startDaemon(t, "--upstream-endpoint", "")
	d.must("pull", image())
	var st struct {
		Status struct {
			RepoDigests []string `json:"repoDigests"`
		} `json:"status"`
	}
	require.NoError(t, json.Unmarshal([]byte(d.must("inspecti", "-o", "json", image())), &st))
	require.Len(t, st.Status.RepoDigests, 1)
	podCfg, _ := podConfig(t, "vm-digest", true)
	pod := d.must("runp", podCfg)
	ctr := d.must("create", pod, containerConfig(t, st.Status.RepoDigests[0], []string{"by-digest"}, nil), podCfg)
	d.must("start", ctr)
	in := d.waitState(ctr, "CONTAINER_EXITED", 30*time.Second)
	require.Equal(t, int32(0), in.Status.ExitCode)
	// An image in use cannot be removed; once unused it can.
	_, err = d.crictl("rmi", image())
	require.ErrorContains(t, err, "remove the container first")
	d.must("rmp", "-f", pod)
	d.must("rmi", image())
	require.NotContains(t, d.must("images", "-q"), "sha256")
}

func TestAttachEchoRoundTrip(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "")
	pod, ctr := d.runVM(t, "vm-attach", "echo")
	in := d.waitState(ctr, "CONTAINER_RUNNING", 10*time.Second)
	waitLog(t, in.Status.LogPath, "echo: ready")

	echoThenDetach(t, exec.Command(crictl, "--runtime-endpoint", "unix://"+d.sock, "attach", "-i", ctr), "hello-attach")
	require.Equal(t, "CONTAINER_RUNNING", d.inspect(ctr).Status.State, "detaching must not stop the VM")
	b, _ := os.ReadFile(in.Status.LogPath)
	require.Contains(t, string(b), "stdout F hello-attach")
	d.must("rmp", "-f", pod)
	require.Empty(t, qemuProcesses(t, d.stateDir))
}

func TestQEMUKilledIsReported(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "")
	pod, ctr := d.runVM(t, "vm-killed", "tick=100")
	d.waitState(ctr, "CONTAINER_RUNNING", 10*time.Second)
	procs := qemuProcesses(t, d.stateDir)
	require.Len(t, procs, 1)
	pid := strings.Fields(procs[0])[0]
	require.NoError(t, exec.Command("kill", "-9", pid).Run())
	killedAt := time.Now()
	in := d.waitState(ctr, "CONTAINER_EXITED", 5*time.Second)
	// Detection is event-driven (the shim's Wait returns at exit); the bound absorbs crictl polling.
	require.Less(t, time.Since(killedAt), 2*time.Second)
	require.Equal(t, int32(137), in.Status.ExitCode)
	require.Equal(t, "Error", in.Status.Reason, "a VM killed behind unilet's back is an error, not a stop")
	require.Contains(t, in.Status.Message, "killed by signal")
	d.must("rmp", "-f", pod)
	ents, _ := os.ReadDir(filepath.Join(d.stateDir, "vm"))
	require.Empty(t, ents)
}

func TestShimKilledIsReported(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "")
	pod, ctr := d.runVM(t, "vm-shim-killed", "tick=100")
	d.waitState(ctr, "CONTAINER_RUNNING", 10*time.Second)
	require.NotEmpty(t, testutil.ShimsUnder(d.stateDir))
	testutil.KillProcsUnder("unilet-shim", d.stateDir)
	in := d.waitState(ctr, "CONTAINER_EXITED", 5*time.Second)
	require.NotZero(t, in.Status.ExitCode)
	require.Equal(t, "ShimDied", in.Status.Reason)
	require.Contains(t, in.Status.Message, "unilet-shim")
	require.Eventually(t, func() bool { return len(qemuProcesses(t, d.stateDir)) == 0 }, 5*time.Second, 50*time.Millisecond,
		"a VM must not run on without its supervisor")
	d.must("rmp", "-f", pod)
	ents, _ := os.ReadDir(filepath.Join(d.stateDir, "vm"))
	require.Empty(t, ents)
}

func TestFailedStartLeavesNothing(t *testing.T) {
	// The operator bound lets a 16 TiB VM through CreateContainer; QEMU refuses it.
	d := startDaemon(t, "--upstream-endpoint", "", "--max-memory", "33554432")
	d.must("pull", image())
	podCfg, _ := podConfig(t, "vm-start-fail", true)
	pod := d.must("runp", podCfg)
	// 16 TiB of guest RAM: QEMU refuses to start.
	huge := writeJSON(t, map[string]any{"metadata": map[string]any{"name": "huge"}, "image": map[string]string{"image": image()},
		"log_path": "huge/0.log", "linux": map[string]any{"resources": map[string]any{"memory_limit_in_bytes": int64(16) << 40}}})
	ctr := d.must("create", pod, huge, podCfg)
	_, err := d.crictl("start", ctr)
	require.Error(t, err)
	in := d.inspect(ctr)
	require.Equal(t, "CONTAINER_EXITED", in.Status.State)
	require.Equal(t, "StartError", in.Status.Reason)
	require.NotEmpty(t, in.Status.Message)
	require.Empty(t, qemuProcesses(t, d.stateDir))
	require.Empty(t, testutil.ShimsUnder(d.stateDir), "no shim may be left")
	ents, _ := os.ReadDir(filepath.Join(d.stateDir, "vm"))
	require.Empty(t, ents, "no VM directory may be left")
	d.must("rmp", "-f", pod)
}

func TestOrphanVMDirIsReaped(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "")
	pod, ctr := d.runVM(t, "vm-orphan", "tick=100")
	d.waitState(ctr, "CONTAINER_RUNNING", 10*time.Second)
	// Simulate a record lost in a crash: the daemon stops, its database is
	// replaced by an empty one, and a shim is left without a record.
	d.stop()
	require.NoError(t, os.Remove(filepath.Join(d.dir, "root", "meta.db")))
	d.start()
	require.Eventually(t, func() bool { return len(qemuProcesses(t, d.stateDir)) == 0 }, 10*time.Second, 50*time.Millisecond,
		"a VM without a record must not run on unnoticed")
	ents, _ := os.ReadDir(filepath.Join(d.stateDir, "vm"))
	require.Empty(t, ents)
	log, _ := os.ReadFile(d.logFile)
	require.Contains(t, string(log), "no container record")
	_ = pod
}

// TestGuestEndsAreToldApart: how a unikernel ended reaches CRI truthfully.
// A guest panic says so with its last console words; an application whose
// main returned 3 (Unikraft then halts as crashed) exits 3; a guest that
// runs out of its own RAM panics; and a VM whose container cgroup cannot
// hold guest RAM plus QEMU (no VMM overhead left, guest RAM touched) is
// OOMKilled by the host kernel.
func TestGuestEndsAreToldApart(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "", "--vmm-overhead", "0")
	d.must("pull", image())
	run := func(name string, limit int64, args ...string) (string, inspect) {
		podCfg, _ := podConfig(t, name, true)
		pod := d.must("runp", podCfg)
		cfg := map[string]any{"metadata": map[string]any{"name": "app"}, "image": map[string]string{"image": image()},
			"log_path": "app/0.log", "args": args}
		if limit > 0 {
			cfg["linux"] = map[string]any{"resources": map[string]any{"memory_limit_in_bytes": limit}}
		}
		ctr := d.must("create", pod, writeJSON(t, cfg), podCfg)
		d.must("start", ctr)
		return pod, d.waitState(ctr, "CONTAINER_EXITED", 60*time.Second)
	}
	pod, in := run("vm-panic", 0, "panic")
	require.Equal(t, int32(1), in.Status.ExitCode)
	require.Equal(t, "GuestPanicked", in.Status.Reason)
	require.Contains(t, in.Status.Message, "the guest kernel panicked (pvpanic); its console last said: ")
	require.True(t, strings.HasSuffix(in.Status.Message, "| panic: requested"), in.Status.Message)
	require.Empty(t, qemuProcesses(t, d.stateDir))
	d.must("rmp", "-f", pod)

	pod, in = run("vm-exit3", 0, "exit=3")
	require.Equal(t, int32(3), in.Status.ExitCode)
	require.Equal(t, "Error", in.Status.Reason)
	require.Contains(t, in.Status.Message, "the application exited with status 3")
	d.must("rmp", "-f", pod)

	pod, in = run("vm-guest-oom", 0, "oom")
	require.Equal(t, "GuestPanicked", in.Status.Reason)
	require.Contains(t, in.Status.Message, "oom: out of memory: no free page left")
	d.must("rmp", "-f", pod)

	pod, in = run("vm-host-oom", 64<<20, "oom")
	require.Equal(t, int32(137), in.Status.ExitCode, in.Status.Message)
	require.Equal(t, "OOMKilled", in.Status.Reason, in.Status.Message)
	require.Contains(t, in.Status.Message, "the host's OOM killer ended QEMU")
	require.Contains(t, in.Status.Message, "64 MiB of guest RAM")
	d.must("rmp", "-f", pod)
}

// The daemon dies while a StartContainer is booting the VM: the next daemon
// adopts the VM its shim finished starting (RUNNING, one QEMU), nothing leaks.
func TestRestartDuringStartContainer(t *testing.T) {
	qemu, err := exec.LookPath("qemu-system-x86_64")
	require.NoError(t, err)
	slow := filepath.Join(t.TempDir(), "slow-qemu")
	require.NoError(t, os.WriteFile(slow, []byte("#!/bin/sh\necho launched >&2\nsleep 2\nexec "+qemu+" \"$@\"\n"), 0o755))
	d := startDaemon(t, "--upstream-endpoint", "", "--qemu", slow, "--accel", "tcg")
	d.must("pull", image())
	podCfg, _ := podConfig(t, "vm-midstart", true)
	pod := d.must("runp", podCfg)
	ctr := d.must("create", pod, containerConfig(t, image(), []string{"tick=100"}, nil), podCfg)
	startCmd := exec.Command(crictl, "--runtime-endpoint", "unix://"+d.sock, "start", ctr)
	require.NoError(t, startCmd.Start())
	// Mid-start: the shim has launched QEMU, which is coming up (its stderr
	// goes to the VM's directory: the jail hides the test's).
	waitLog(t, filepath.Join(d.stateDir, "vm", ctr[:16], "qemu.stderr"), "launched")
	d.crash()
	require.Error(t, startCmd.Wait(), "the interrupted StartContainer fails for its client")
	d.start()
	in := d.waitState(ctr, "CONTAINER_RUNNING", 20*time.Second)
	require.Len(t, qemuProcesses(t, d.stateDir), 1)
	waitLog(t, in.Status.LogPath, "tick 3\n")
	d.must("rmp", "-f", pod)
	require.Empty(t, qemuProcesses(t, d.stateDir))
	ents, _ := os.ReadDir(filepath.Join(d.stateDir, "vm"))
	require.Empty(t, ents)
}

// With the daemon down, the shim dies and leaves QEMU behind: the next daemon
// finds neither a shim nor a recorded exit, stops that QEMU and reports VMLost.
func TestShimDiedWhileDaemonDown(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "")
	pod, ctr := d.runVM(t, "vm-shim-gone", "tick=100")
	d.waitState(ctr, "CONTAINER_RUNNING", 10*time.Second)
	d.crash()
	require.NotEmpty(t, testutil.ShimsUnder(d.stateDir))
	testutil.KillProcsUnder("unilet-shim", d.stateDir)
	require.Eventually(t, func() bool { return len(qemuProcesses(t, d.stateDir)) == 0 }, 5*time.Second, 20*time.Millisecond,
		"QEMU dies with its killed shim (parent-death signal): no VM runs unsupervised, even while the daemon is down")
	d.start()
	in := d.inspect(ctr)
	require.Equal(t, "CONTAINER_EXITED", in.Status.State)
	require.Equal(t, "VMLost", in.Status.Reason)
	require.Equal(t, int32(255), in.Status.ExitCode)
	require.Eventually(t, func() bool { return len(qemuProcesses(t, d.stateDir)) == 0 }, 5*time.Second, 50*time.Millisecond)
	d.must("rmp", "-f", pod)
}

// Attach in tty mode, through a real pseudo-terminal (script(1)).
func TestAttachTTY(t *testing.T) {
	if _, err := exec.LookPath("script"); err != nil {
		t.Fatalf("script(1) from util-linux is required: %v", err)
	}
	d := startDaemon(t, "--upstream-endpoint", "")
	pod, ctr := d.runVM(t, "vm-attach-tty", "echo")
	in := d.waitState(ctr, "CONTAINER_RUNNING", 10*time.Second)
	waitLog(t, in.Status.LogPath, "echo: ready")
	cmd := exec.Command("script", "-q", "-e", "-c", crictl+" --runtime-endpoint unix://"+d.sock+" attach -i -t "+ctr, "/dev/null")
	stdin, err := cmd.StdinPipe()
	require.NoError(t, err)
	var out syncBuf
	cmd.Stdout, cmd.Stderr = &out, &out
	require.NoError(t, cmd.Start())
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	require.Eventually(t, func() bool {
		_, _ = stdin.Write([]byte("tty-hello\r"))
		time.Sleep(150 * time.Millisecond)
		b, _ := os.ReadFile(in.Status.LogPath)
		return strings.Contains(string(b), "stdout F tty-hello")
	}, 15*time.Second, 50*time.Millisecond, "tty attach round trip; got %q", out.String())
	_, err = stdin.Write([]byte{0x1d})
	require.NoError(t, err)
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatalf("Ctrl-] did not end the tty session: %q", out.String())
	}
	require.Contains(t, out.String(), "tty-hello")
	require.Equal(t, "CONTAINER_RUNNING", d.inspect(ctr).Status.State)
	d.must("rmp", "-f", pod)
}

// waitLog waits until the file at path contains want (guest output reaching
// the CRI log).
func waitLog(t *testing.T, path, want string) {
	t.Helper()
	require.Eventually(t, func() bool {
		b, _ := os.ReadFile(path)
		return strings.Contains(string(b), want)
	}, 30*time.Second, 20*time.Millisecond, "%s never showed %q", path, want)
}

// The streaming server reaches into pods: off loopback it needs TLS, and
// unilet refuses to start (before touching anything) without it.
func TestStreamServerOffLoopbackNeedsTLS(t *testing.T) {
	dir := t.TempDir()
	out, err := exec.Command(filepath.Join(binDir, "unilet"), "--listen", "unix://"+filepath.Join(dir, "s.sock"),
		"--root", filepath.Join(dir, "root"), "--state-dir", filepath.Join(dir, "run"), "--upstream-endpoint", "",
		"--netns-dir", filepath.Join(dir, "netns"), "--cgroup-root", "", "--cni-conf-dir", filepath.Join(dir, "cni"),
		"--stream-address", "0.0.0.0:0").CombinedOutput()
	require.Error(t, err)
	require.Contains(t, string(out), "give --stream-tls-cert and --stream-tls-key")
	ents, _ := os.ReadDir(dir)
	require.Empty(t, ents, "nothing was created before the refusal")
}

// waitFile waits until path exists.
func waitFile(t *testing.T, path string, timeout time.Duration) {
	t.Helper()
	require.Eventually(t, func() bool { _, err := os.Stat(path); return err == nil }, timeout, 10*time.Millisecond, "%s never appeared", path)
}

// waitLogGrows waits until the file at path grows (a console still writing).
func waitLogGrows(t *testing.T, path string) {
	t.Helper()
	fi, err := os.Stat(path)
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		now, err := os.Stat(path)
		return err == nil && now.Size() > fi.Size()
	}, 10*time.Second, 10*time.Millisecond, "%s stopped growing", path)
}

// echoThenDetach runs a console client (crictl attach, uniletctl console)
// of a guest that echoes its input: it types word until the echo comes
// back (the session may take a moment to connect), then Ctrl-], which
// must end the client cleanly. It returns the client's output.
func echoThenDetach(t *testing.T, cmd *exec.Cmd, word string) string {
	t.Helper()
	stdin, err := cmd.StdinPipe()
	require.NoError(t, err)
	var out syncBuf
	cmd.Stdout, cmd.Stderr = &out, &out
	require.NoError(t, cmd.Start())
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	require.Eventually(t, func() bool {
		_, _ = stdin.Write([]byte(word + "\n"))
		time.Sleep(100 * time.Millisecond)
		return strings.Contains(out.String(), word)
	}, 15*time.Second, 50*time.Millisecond, "echo round trip through %s; got %q", cmd.Path, out.String())
	_, err = stdin.Write([]byte{0x1d})
	require.NoError(t, err)
	select {
	case err := <-done:
		require.NoError(t, err, out.String())
	case <-time.After(10 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatalf("Ctrl-] did not end the session of %s: %q", cmd.Path, out.String())
	}
	return out.String()
}
