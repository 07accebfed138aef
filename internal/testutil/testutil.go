// Package testutil holds helpers shared by the end-to-end tests, the e2e
// cluster and the benchmarks: a goroutine-safe output buffer, a free loopback
// port, a port-forward client, an HTTP GET that waits for a guest to come up, unmounting a test's
// directory tree, and where the CNI plugins live.
package testutil

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// SyncBuf is a bytes buffer safe for concurrent writers and readers.
type SyncBuf struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *SyncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *SyncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// PortForward runs a port-forward client — command(mapping) with mapping
// "LOCAL:REMOTE", LOCAL a free loopback port — until the test ends; it
// returns LOCAL and the client's output (for failure messages).
func PortForward(t *testing.T, remote int, command func(mapping string) *exec.Cmd) (int, *SyncBuf) {
	t.Helper()
	local := MustFreePort(t)
	cmd := command(fmt.Sprintf("%d:%d", local, remote))
	out := &SyncBuf{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", cmd.Path, err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	return local, out
}

// FreePort returns a loopback TCP port nobody listens on (now).
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// HTTPGet fetches url until it answers 200 or timeout passes (a guest may still be booting).
func HTTPGet(url string, timeout time.Duration) (string, error) {
	c := http.Client{Timeout: 2 * time.Second}
	var last error
	for deadline := time.Now().Add(timeout); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		resp, err := c.Get(url)
		if err != nil {
			last = err
			continue
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err == nil && resp.StatusCode == 200 {
			return string(b), nil
		}
		last = fmt.Errorf("status %d, %v", resp.StatusCode, err)
	}
	return "", fmt.Errorf("GET %s: %v", url, last)
}

// UnmountUnder unmounts every mount below dir, deepest first.
func UnmountUnder(dir string) {
	b, err := os.ReadFile("/proc/mounts")
	if err != nil {
		return
	}
	var mps []string
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) > 1 && strings.HasPrefix(f[1], dir+"/") {
			mps = append(mps, f[1])
		}
	}
	for i := len(mps) - 1; i >= 0; i-- {
		_ = syscall.Unmount(mps[i], syscall.MNT_DETACH)
	}
}

// CNIBinDir is where the CNI plugins are: Debian's containernetworking-plugins
// (/usr/lib/cni) or the usual /opt/cni/bin.
func CNIBinDir() string {
	for _, d := range []string{"/usr/lib/cni", "/opt/cni/bin"} {
		if _, err := os.Stat(filepath.Join(d, "bridge")); err == nil {
			return d
		}
	}
	return "/opt/cni/bin"
}

// MustHTTPGet is HTTPGet failing the test on error.
func MustHTTPGet(t testing.TB, url string, timeout time.Duration) string {
	t.Helper()
	body, err := HTTPGet(url, timeout)
	if err != nil {
		t.Fatal(err)
	}
	return body
}

// MustFreePort is FreePort failing the test on error.
func MustFreePort(t testing.TB) int {
	t.Helper()
	p, err := FreePort()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// Run runs name in dir with env added to the environment; a failure
// carries the command's output.
func Run(dir string, env []string, name string, args ...string) error {
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return nil
}

// MainWith is a TestMain body: setup (which runs the tests) or a setup
// error naming what, exit code 1.
func MainWith(what string, setup func() (int, error)) {
	code, err := setup()
	if err != nil {
		fmt.Fprintln(os.Stderr, what+" setup:", err)
		os.Exit(1)
	}
	os.Exit(code)
}

// QEMUProc is a running QEMU started by unilet.
type QEMUProc struct {
	Pid     int
	VMDir   string // the VM directory it serves (its UNILET_VM_DIR)
	Cmdline string // its arguments, joined by spaces
}

// QEMUsUnder lists the QEMUs whose VM directory lies under dir, found by
// the UNILET_VM_DIR variable unilet starts every QEMU with (a jailed QEMU's
// command line names no host path).
func QEMUsUnder(dir string) []QEMUProc {
	var out []QEMUProc
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
		if !strings.HasPrefix(filepath.Base(strings.TrimSuffix(exe, " (deleted)")), "qemu-system-") {
			continue
		}
		env, _ := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
		for _, kv := range strings.Split(string(env), "\x00") {
			if v, ok := strings.CutPrefix(kv, "UNILET_VM_DIR="); ok && strings.HasPrefix(v, dir+"/") {
				cmd, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
				out = append(out, QEMUProc{Pid: pid, VMDir: v, Cmdline: strings.ReplaceAll(strings.TrimRight(string(cmd), "\x00"), "\x00", " ")})
			}
		}
	}
	return out
}

// ShimsUnder lists the PIDs of the unilet-shims serving a VM directory
// (their --dir) that is dir or lies under it: only the test's own, found
// through /proc, never by a machine-wide pattern. Idle pool shims and
// template RAM holders are not listed (ProcsUnder lists them).
func ShimsUnder(dir string) []int { return procsUnder("unilet-shim", dir, "--dir") }

// ShimsServing lists the PIDs of the unilet-shims serving the VM directory
// vmDir: started for it (--dir) or taken from the shim pool for it (an open
// file under it: the shim's log).
func ShimsServing(vmDir string) []int {
	return procsOf("unilet-shim", func(pid int, args []string) bool {
		if underAfter(args, vmDir, "--dir") {
			return true
		}
		fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
		for _, fd := range fds {
			if t, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name())); strings.HasPrefix(t, vmDir+"/") {
				return true
			}
		}
		return false
	})
}

// ProcsUnder lists the PIDs of processes of the executable named exe with
// an argument naming dir or a path under it.
func ProcsUnder(exe, dir string) []int { return procsUnder(exe, dir, "") }

// procsUnder: ProcsUnder, counting only the argument after flag if flag
// is not empty.
func procsUnder(exe, dir, flag string) []int {
	return procsOf(exe, func(_ int, args []string) bool { return underAfter(args, dir, flag) })
}

// underAfter reports whether an argument (the one after flag, if flag is
// not empty) is dir or a path under it.
func underAfter(args []string, dir, flag string) bool {
	for i := 1; i < len(args); i++ {
		if flag != "" && args[i-1] != flag {
			continue
		}
		if a := args[i]; a == dir || strings.HasPrefix(a, dir+"/") {
			return true
		}
	}
	return false
}

// procsOf lists the PIDs of processes of the executable named exe that
// match (given their PID and arguments).
func procsOf(exe string, match func(pid int, args []string) bool) []int {
	var out []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		path, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
		if filepath.Base(strings.TrimSuffix(path, " (deleted)")) != exe {
			continue
		}
		cmd, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if match(pid, strings.Split(string(cmd), "\x00")) {
			out = append(out, pid)
		}
	}
	return out
}

// KillProcsUnder ends the processes of ProcsUnder(exe, dir).
func KillProcsUnder(exe, dir string) {
	for _, pid := range ProcsUnder(exe, dir) {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}

// KillQEMUsUnder ends the QEMUs of VM directories under dir (test cleanup:
// only what the test's own daemon started).
func KillQEMUsUnder(dir string) {
	for _, q := range QEMUsUnder(dir) {
		_ = syscall.Kill(q.Pid, syscall.SIGKILL)
	}
}
