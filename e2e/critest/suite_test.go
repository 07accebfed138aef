package critest_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/unilet-dev/unilet/internal/testimages"
	"github.com/unilet-dev/unilet/internal/testutil"
	"github.com/unilet-dev/unilet/pkg/cgroups"
)

// proc is a process the test started inside the namespace.
type proc struct {
	cmd  *exec.Cmd
	done chan struct{}
	log  string
}

// startIn starts bin inside the test's network namespace, its output in logFile.
func startIn(t *testing.T, env []string, logFile, bin string, args ...string) *proc {
	t.Helper()
	lf, err := os.Create(logFile)
	require.NoError(t, err)
	cmd := exec.Command("nsenter", append([]string{"--net=" + netns, "--", bin}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	require.NoError(t, cmd.Start())
	p := &proc{cmd: cmd, done: make(chan struct{}), log: logFile}
	go func() { _ = cmd.Wait(); lf.Close(); close(p.done) }()
	return p
}

// stop: SIGTERM (twice: containerd sometimes needs it), then SIGKILL.
func (p *proc) stop() {
	for i := 0; i < 2; i++ {
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
			return
		case <-time.After(5 * time.Second):
		}
	}
	_ = p.cmd.Process.Kill()
	<-p.done
}

// waitSocket waits until sock accepts connections.
func (p *proc) waitSocket(t *testing.T, what, sock string) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return
		}
		select {
		case <-p.done:
			t.Fatalf("%s exited:\n%s", what, tailFile(p.log, 30))
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not serve %s within 30s:\n%s", what, sock, tailFile(p.log, 30))
		}
	}
}

func tailFile(path string, n int) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// flavor is one containerd: Debian's 1.6 (on PATH) or 2.x from hack/containerd2.
type flavor struct {
	name string
	v2   bool
}

var flavors = []flavor{{name: "containerd-1.6"}, {name: "containerd-2.x", v2: true}}

// podNetwork is a bridge + host-local + portmap CNI network (inside the
// test's namespace) with its IPAM state under dir.
func podNetwork(bridge, subnet, dir string) string {
	return fmt.Sprintf(`{"cniVersion": "1.0.0", "name": "critest", "plugins": [
  {"type": "bridge", "bridge": %q, "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": %q, "ranges": [[{"subnet": %q}]], "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}`, bridge, filepath.Join(dir, "ipam"), subnet)
}

// startContainerd starts a fresh containerd of flavor f on private
// directories, with a bridge + portmap pod network on 198.18.64.0/24 inside
// the namespace and the registry mirror; pause imported. Returns its socket.
func startContainerd(t *testing.T, f flavor) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "unilet-critest-ctrd-")
	require.NoError(t, err)
	cniConf, hosts := filepath.Join(dir, "net.d"), filepath.Join(dir, "hosts")
	require.NoError(t, os.MkdirAll(cniConf, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(cniConf, "10-critest.conflist"), []byte(podNetwork("crit0", "198.18.64.0/24", dir)), 0o644))
	for _, reg := range mirroredRegistries {
		// Without the host table containerd would fall back to the registry itself.
		toml := fmt.Sprintf("server = \"http://%s\"\n\n[host.\"http://%s\"]\n  capabilities = [\"pull\", \"resolve\"]\n", mirrorHost, mirrorHost)
		require.NoError(t, os.MkdirAll(filepath.Join(hosts, reg), 0o755))
		require.NoError(t, os.WriteFile(filepath.Join(hosts, reg, "hosts.toml"), []byte(toml), 0o644))
	}
	sock := filepath.Join(dir, "containerd.sock")
	cfg := testimages.ContainerdDirs{Root: filepath.Join(dir, "root"), State: filepath.Join(dir, "state"), Sock: sock,
		CNIBin: testutil.CNIBinDir(), CNIConf: cniConf, RegistryHosts: hosts}.Config(f.v2)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "config.toml"), []byte(cfg), 0o644))
	bin, env := "containerd", []string(nil)
	if f.v2 { // its own shim first on PATH
		bin = filepath.Join(containerd2Bin, "containerd")
		env = []string{"PATH=" + containerd2Bin + ":" + os.Getenv("PATH")}
	}
	p := startIn(t, env, filepath.Join(dir, "containerd.log"), bin, "--config", filepath.Join(dir, "config.toml"))
	t.Cleanup(func() {
		p.stop()
		if t.Failed() {
			t.Logf("containerd log (tail):\n%s", tailFile(p.log, 40))
		}
		testutil.KillProcsUnder("containerd-shim-runc-v2", dir)
		testutil.UnmountUnder(dir)
		_ = exec.Command("nsenter", "--net="+netns, "ip", "link", "del", "crit0").Run() // the test's own namespace
		os.RemoveAll(dir)
	})
	p.waitSocket(t, "containerd", sock)
	require.NoError(t, testimages.ImportBase(repoRoot, dir, sock))
	return sock
}

// startUnilet starts unilet in front of the containerd at upstream, with a
// unikernel pod network on 198.18.65.0/24 inside the namespace; unikernel images
// come from the VM mirror. Returns its socket.
func startUnilet(t *testing.T, upstream string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "unilet-critest-d-")
	require.NoError(t, err)
	cniConf := filepath.Join(dir, "net.d")
	require.NoError(t, os.MkdirAll(cniConf, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(cniConf, "10-critest.conflist"), []byte(podNetwork("ulcrit0", "198.18.65.0/24", dir)), 0o644))
	sock, netnsDir, cgroupRoot := filepath.Join(dir, "unilet.sock"), filepath.Join(dir, "netns"), "/unilet-critest/"+filepath.Base(dir)
	args := []string{"--listen", "unix://" + sock, "--root", filepath.Join(dir, "root"), "--state-dir", filepath.Join(dir, "run"),
		"--upstream-endpoint", "unix://" + upstream, "--accel", "auto", "--cni-conf-dir", cniConf,
		"--cni-bin-dir", testutil.CNIBinDir(), "--netns-dir", netnsDir, "--cgroup-root", cgroupRoot,
		// critest makes its pods' log directories in the temp directory.
		"--pod-log-root", os.TempDir()}
	for _, reg := range mirroredRegistries {
		args = append(args, "--registry-mirror", reg+"=http://"+vmMirrorHost)
	}
	p := startIn(t, nil, filepath.Join(dir, "unilet.log"), filepath.Join(binDir, "unilet"), args...)
	t.Cleanup(func() {
		p.stop()
		if t.Failed() {
			t.Logf("unilet log (tail):\n%s", tailFile(p.log, 60))
		}
		// VMs outlive the daemon by design: end whatever the suite left.
		testutil.KillProcsUnder("unilet-shim", dir)
		testutil.KillQEMUsUnder(dir)
		ents, _ := os.ReadDir(netnsDir)
		for _, e := range ents {
			_ = syscall.Unmount(filepath.Join(netnsDir, e.Name()), syscall.MNT_DETACH)
		}
		testutil.UnmountUnder(dir)
		_ = exec.Command("nsenter", "--net="+netns, "ip", "link", "del", "ulcrit0").Run() // the test's own namespace
		cgroups.RemoveTree(cgroupRoot)
		cgroups.RemoveIfEmpty(filepath.Dir(cgroupRoot)) // shared by runs: only when empty
		os.RemoveAll(dir)
	})
	p.waitSocket(t, "unilet", sock)
	return sock
}

// result is one suite run: spec name → ginkgo state ("passed", "failed", ...).
type result map[string]string

func (r result) count(state string) int {
	n := 0
	for _, s := range r {
		if s == state {
			n++
		}
	}
	return n
}

// failed: specs that ran and did not pass.
func (r result) failed() []string {
	var out []string
	for spec, s := range r {
		if s != "passed" && s != "skipped" && s != "pending" {
			out = append(out, spec)
		}
	}
	sort.Strings(out)
	return out
}

// critestParallel is how many ginkgo nodes run critest's specs at once:
// most specs wait on the runtime, so several overlap well on two cores.
const critestParallel = 3

// runSuite runs critest against sock (inside the namespace) and returns the
// state of every spec; a suite that does not finish within 15 minutes fails
// the test.
func runSuite(t *testing.T, label, sock string, extra ...string) result {
	t.Helper()
	work := t.TempDir()
	report := filepath.Join(work, "report.json")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	args := append([]string{"--net=" + netns, "--", critestBin, "-runtime-endpoint", "unix://" + sock,
		"-image-endpoint", "unix://" + sock, "-parallel", strconv.Itoa(critestParallel),
		"-ginkgo.json-report", report, "-ginkgo.no-color", "-ginkgo.v", "-ginkgo.timeout", "15m"}, extra...)
	cmd := exec.CommandContext(ctx, "nsenter", args...)
	cmd.Env = append(os.Environ(), "PATH="+ginkgoDir+":"+os.Getenv("PATH"))
	cmd.Dir = work // no crictl.yaml here: the flags decide
	logPath := filepath.Join(work, "critest.log")
	lf, err := os.Create(logPath)
	require.NoError(t, err)
	cmd.Stdout, cmd.Stderr = lf, lf
	start := time.Now()
	err = cmd.Run() // non-zero when a spec fails: the report decides
	lf.Close()
	b, rerr := os.ReadFile(report)
	require.NoError(t, rerr, "critest (%s) wrote no report (%v):\n%s", label, err, tailFile(logPath, 40))
	var reports []struct {
		SpecReports []struct {
			ContainerHierarchyTexts []string
			LeafNodeText            string
			LeafNodeType            string
			State                   string
			Failure                 struct{ Message string }
		}
	}
	require.NoError(t, json.Unmarshal(b, &reports))
	res := result{}
	for _, r := range reports {
		for _, s := range r.SpecReports {
			if s.LeafNodeType != "It" {
				continue
			}
			spec := strings.Join(append(append([]string(nil), s.ContainerHierarchyTexts...), s.LeafNodeText), " ")
			res[spec] = s.State
			if s.State != "passed" && s.State != "skipped" {
				t.Logf("%s: %s: %s: %s", label, s.State, spec, firstLine(s.Failure.Message))
			}
		}
	}
	t.Logf("%s: %d specs ran, %d passed, %d failed, %d skipped in %s", label, len(res)-res.count("skipped"),
		res.count("passed"), len(res.failed()), res.count("skipped"), time.Since(start).Round(time.Second))
	require.NotEmpty(t, res, "critest (%s) reported no specs:\n%s", label, tailFile(logPath, 40))
	return res
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(strings.TrimSpace(s), "\n")
	return s
}

// expected reads an expected-failure list: "## reason" lines start a group,
// every other non-blank line not starting with '#' is a spec name.
// Returns spec → reason.
func expected(t *testing.T, file string) map[string]string {
	t.Helper()
	f, err := os.Open(filepath.Join("expected", file))
	require.NoError(t, err)
	defer f.Close()
	out, reason := map[string]string{}, ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case strings.HasPrefix(line, "## "):
			reason = strings.TrimPrefix(line, "## ")
		case line == "" || strings.HasPrefix(line, "#"):
		default:
			require.NotEmpty(t, reason, "%s: %q has no reason (a \"## reason\" line above it)", file, line)
			out[line] = reason
		}
	}
	require.NoError(t, sc.Err())
	return out
}

// unexpected: failures of res outside list, and listed specs that passed.
func unexpected(res result, list map[string]string) (failed, passed []string) {
	for _, spec := range res.failed() {
		if _, ok := list[spec]; !ok {
			failed = append(failed, spec)
		}
	}
	for spec := range list {
		if res[spec] == "passed" {
			passed = append(passed, spec)
		}
	}
	sort.Strings(passed)
	return failed, passed
}
