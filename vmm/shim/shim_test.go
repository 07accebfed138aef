package shim

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/unilet-dev/unilet/internal/testutil"
	"github.com/unilet-dev/unilet/vmm"
	"github.com/unilet-dev/unilet/vmm/shim/api"
)

// These tests run the real unilet-shim binary with real QEMU and the test kernel.

func build(t *testing.T) (shimBin, kernel string) {
	t.Helper()
	testutil.NeedQEMU(t, testutil.LaneUnit)
	dir := t.TempDir()
	shimBin = filepath.Join(dir, "unilet-shim")
	out, err := exec.Command("go", "build", "-o", shimBin, "../../cmd/unilet-shim").CombinedOutput()
	require.NoError(t, err, string(out))
	kernel = filepath.Join(dir, "kernel.elf")
	out, err = exec.Command("../../e2e/guest/testkernel/build.sh", kernel).CombinedOutput()
	require.NoError(t, err, string(out))
	return shimBin, kernel
}

func spec(t *testing.T, kernel, vmDir string, args ...string) vmm.VMSpec {
	// Whatever a failing test leaves behind is ended.
	t.Cleanup(func() {
		killTestShims(filepath.Join(filepath.Dir(kernel), "unilet-shim"), "--dir "+vmDir)
		// A pooled shim's command line does not name the VM: end its QEMU by
		// the VM directory in its environment.
		for _, q := range testutil.QEMUsUnder(filepath.Dir(vmDir)) {
			if q.VMDir == vmDir {
				_ = syscall.Kill(q.Pid, syscall.SIGKILL)
			}
		}
	})
	qemu := testutil.NeedQEMU(t, testutil.LaneUnit)
	line, _, err := vmm.BuildCmdline(vmm.GuestConfig{KernelName: kernel, Args: args})
	require.NoError(t, err)
	return vmm.VMSpec{QEMU: qemu, StateDir: vmDir, LogPath: filepath.Join(filepath.Dir(vmDir), "logs", "0.log"),
		Machine: vmm.MachineConfig{Name: "shimtest", Accel: vmm.AccelTCG, Machine: vmm.MachinePC, MemoryMiB: 32, VCPUs: 1,
			Kernel: kernel, Cmdline: line}}
}

func TestShimRunsVMDetachedAndReconnects(t *testing.T) {
	shimBin, kernel := build(t)
	vmDir := filepath.Join(t.TempDir(), "vm")
	sp := spec(t, kernel, vmDir, "tick=50")
	ctx := context.Background()
	c, err := Launch(ctx, shimBin, vmDir, sp, nil)
	require.NoError(t, err)
	st, err := c.State(ctx, &api.StateRequest{})
	require.NoError(t, err)
	require.True(t, st.Running)
	require.NotZero(t, st.Pid)
	t.Cleanup(func() { _ = syscall.Kill(int(st.Pid), syscall.SIGKILL) })

	// QEMU's parent is the shim, in a session of its own (it survives the daemon).
	shimPid := parentOf(t, int(st.Pid))
	shimSid, err := unix.Getsid(shimPid)
	require.NoError(t, err)
	mySid, _ := unix.Getsid(0)
	require.NotEqual(t, mySid, shimSid)
	require.Equal(t, shimPid, shimSid, "the shim leads its own session")

	// The "daemon" goes away and comes back: a new connection sees the same VM.
	require.NoError(t, c.Close())
	c, err = Connect(vmDir)
	require.NoError(t, err)
	defer c.Close()
	st2, err := c.State(ctx, &api.StateRequest{})
	require.NoError(t, err)
	require.Equal(t, st.Pid, st2.Pid)
	require.True(t, st2.Running)
	require.Eventually(t, func() bool {
		s, err := c.Stats(ctx, &api.StatsRequest{})
		return err == nil && s.CpuNanos > 0 && s.RssBytes > 10<<20
	}, 10*time.Second, 100*time.Millisecond)

	// Log rotation through the shim.
	require.NoError(t, os.Rename(sp.LogPath, sp.LogPath+".1"))
	_, err = c.ReopenLog(ctx, &api.ReopenLogRequest{})
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		b, _ := os.ReadFile(sp.LogPath)
		return strings.Contains(string(b), "stdout F tick")
	}, 10*time.Second, 20*time.Millisecond)

	// Shutdown is refused while the VM runs; a graceful kill ends it cleanly.
	_, err = c.Shutdown(ctx, &api.ShutdownRequest{})
	require.ErrorContains(t, err, "still running")
	end, err := c.Kill(ctx, &api.KillRequest{TimeoutMs: 10000})
	require.NoError(t, err)
	require.False(t, end.Running)
	require.Equal(t, int32(0), end.ExitCode, end.Message)
	require.Equal(t, vmm.ReasonCompleted, end.Reason)
	rec, ok := ReadExit(vmDir)
	require.True(t, ok, "the exit is recorded on disk")
	require.Equal(t, vmm.ReasonCompleted, rec.Reason)
	_, err = c.Shutdown(ctx, &api.ShutdownRequest{})
	require.NoError(t, err)
	require.Eventually(t, func() bool { return syscall.Kill(shimPid, 0) != nil || isZombie(shimPid) }, 10*time.Second, 20*time.Millisecond,
		"the shim exits after Shutdown")
}

func TestShimKillWithSignal(t *testing.T) {
	shimBin, kernel := build(t)
	vmDir := filepath.Join(t.TempDir(), "vm")
	ctx := context.Background()
	c, err := Launch(ctx, shimBin, vmDir, spec(t, kernel, vmDir, "tick=50"), nil)
	require.NoError(t, err)
	defer c.Close()
	_, err = c.Kill(ctx, &api.KillRequest{Signal: 99})
	require.ErrorContains(t, err, "invalid signal")
	st, err := c.Kill(ctx, &api.KillRequest{Signal: int32(syscall.SIGTERM)})
	require.NoError(t, err)
	require.False(t, st.Running)
	require.Equal(t, int32(128+15), st.ExitCode)
	require.Equal(t, vmm.ReasonKilled, st.Reason)
	_, err = c.Shutdown(ctx, &api.ShutdownRequest{})
	require.NoError(t, err)
}

func TestShimCreateThenStart(t *testing.T) {
	shimBin, kernel := build(t)
	vmDir := filepath.Join(t.TempDir(), "vm")
	sp := spec(t, kernel, vmDir, "tick=50")
	require.NoError(t, os.MkdirAll(vmDir, 0o700))
	b, _ := json.Marshal(sp)
	require.NoError(t, os.WriteFile(filepath.Join(vmDir, SpecFile), b, 0o600))
	cmd := exec.Command(shimBin, "--dir", vmDir)
	require.NoError(t, cmd.Start())
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	var c *Client
	require.Eventually(t, func() bool {
		var err error
		c, err = Connect(vmDir)
		return err == nil
	}, 10*time.Second, 10*time.Millisecond)
	defer c.Close()
	ctx := context.Background()
	st, err := c.State(ctx, &api.StateRequest{})
	require.NoError(t, err)
	require.Zero(t, st.Pid, "created: no QEMU yet")
	_, err = c.Stats(ctx, &api.StatsRequest{})
	require.ErrorContains(t, err, "not been started")
	st, err = c.Start(ctx, &api.StartRequest{})
	require.NoError(t, err)
	require.True(t, st.Running)
	_, err = c.Start(ctx, &api.StartRequest{})
	require.ErrorContains(t, err, "already started")
	require.Eventually(t, func() bool { // the guest must be up to hear the power button
		b, _ := os.ReadFile(sp.LogPath)
		return strings.Contains(string(b), "tick 2\n")
	}, 10*time.Second, 20*time.Millisecond)
	st, err = c.Kill(ctx, &api.KillRequest{TimeoutMs: 5000})
	require.NoError(t, err)
	require.Equal(t, vmm.ReasonCompleted, st.Reason)
	_, err = c.Shutdown(ctx, &api.ShutdownRequest{})
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("shim did not exit after Shutdown")
	}
}

func TestShimReportsStartFailure(t *testing.T) {
	shimBin, _ := build(t)
	vmDir := filepath.Join(t.TempDir(), "vm")
	sp := spec(t, "/nonexistent/kernel", vmDir)
	_, err := Launch(context.Background(), shimBin, vmDir, sp, nil)
	require.ErrorContains(t, err, "VM did not start")
	rec, ok := ReadExit(vmDir)
	require.True(t, ok)
	require.Equal(t, vmm.ReasonStartFailed, rec.Reason)
}

func parentOf(t *testing.T, pid int) int {
	b, err := os.ReadFile("/proc/" + itoa(pid) + "/stat")
	require.NoError(t, err)
	f := strings.Fields(string(b)[strings.LastIndexByte(string(b), ')')+1:])
	return atoi(f[1])
}

func isZombie(pid int) bool {
	b, err := os.ReadFile("/proc/" + itoa(pid) + "/stat")
	if err != nil {
		return true
	}
	f := strings.Fields(string(b)[strings.LastIndexByte(string(b), ')')+1:])
	return f[0] == "Z"
}

func itoa(i int) string { return strconv.Itoa(i) }
func atoi(s string) int { n, _ := strconv.Atoi(s); return n }

// TestPoolAdoptsIdleShims: a VM started through the pool runs under a
// pre-forked shim (the one that was idle), logs to its VM directory,
// survives as an ordinary shim (reconnect by directory), and the pool
// refills; a new pool ends idle shims an earlier one left.
func TestPoolAdoptsIdleShims(t *testing.T) {
	shimBin, kernel := build(t)
	root := t.TempDir()
	poolDir := filepath.Join(root, "pool")
	t.Cleanup(func() { killTestShims(shimBin, "--pool-dir "+poolDir) })
	p, err := NewPool(shimBin, poolDir, 2, RefillQuiet)
	require.NoError(t, err)
	require.Eventually(t, func() bool { return p.Idle() == 2 }, 15*time.Second, 10*time.Millisecond)
	idle := testShims(shimBin, "--pool-dir "+poolDir)
	require.Len(t, idle, 2)

	vmDir := filepath.Join(root, "vm")
	sp := spec(t, kernel, vmDir, "tick=50")
	var joined int
	c, err := p.Launch(context.Background(), vmDir, sp, func(pid int) error { joined = pid; return nil })
	require.NoError(t, err)
	t.Logf("pooled start: spawn/adopt %s, boot %s", c.Spawn, c.Boot)
	require.Contains(t, idle, joined, "the VM runs under a shim that was idle")
	st, err := c.State(context.Background(), &api.StateRequest{})
	require.NoError(t, err)
	require.True(t, st.Running)
	c.Close()
	// An ordinary shim now: found by its VM directory.
	c2, err := Connect(vmDir)
	require.NoError(t, err)
	h, err := NewHandle(context.Background(), c2)
	require.NoError(t, err)
	require.Eventually(t, func() bool { return p.Idle() == 2 }, 15*time.Second, 10*time.Millisecond, "the pool refills")
	// A second pool on the same directory (a restarted daemon) ends the idle ones.
	p.mu.Lock()
	p.closed = true // let the old pool go without closing its shims
	p.mu.Unlock()
	p2, err := NewPool(shimBin, poolDir, 1, RefillQuiet)
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		left := testShims(shimBin, "--pool-dir "+poolDir)
		return len(left) == 2 // the adopted VM shim and the new idle one
	}, 15*time.Second, 20*time.Millisecond)
	ex, err := h.Stop(context.Background(), 0)
	require.NoError(t, err)
	require.Equal(t, int32(137), ex.Code, "killed at once")
	require.NoError(t, h.Release(context.Background()))
	p2.Close()
	require.Eventually(t, func() bool { return len(testShims(shimBin, "--pool-dir "+poolDir)) == 0 }, 10*time.Second, 20*time.Millisecond)
	b, err := os.ReadFile(filepath.Join(vmDir, LogFile))
	if err == nil {
		require.NotContains(t, string(b), "panic")
	}
}

// testShims lists the processes of this test's own shim binary (built into
// its temporary directory, so started by it) whose command line holds arg.
func testShims(bin, arg string) []int {
	var out []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		exe, err := os.Readlink("/proc/" + e.Name() + "/exe")
		if err != nil || strings.TrimSuffix(exe, " (deleted)") != bin {
			continue
		}
		b, _ := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if strings.Contains(strings.ReplaceAll(string(b), "\x00", " "), arg) {
			out = append(out, pid)
		}
	}
	return out
}

// killTestShims ends what testShims lists.
func killTestShims(bin, arg string) {
	for _, pid := range testShims(bin, arg) {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}

// TestPoolRefillWaitsForQuiet: a take does not spawn a replacement while
// starts keep coming (it would compete with the VM just started), but a
// pool that ran empty spawns one at once.
func TestPoolRefillWaitsForQuiet(t *testing.T) {
	shimBin, _ := build(t)
	poolDir := filepath.Join(t.TempDir(), "pool")
	t.Cleanup(func() { killTestShims(shimBin, "--pool-dir "+poolDir) })
	p, err := NewPool(shimBin, poolDir, 2, RefillQuiet)
	require.NoError(t, err)
	defer p.Close()
	require.Eventually(t, func() bool { return p.Idle() == 2 }, 15*time.Second, 10*time.Millisecond)
	p.mu.Lock()
	p.quiet = time.Hour // never quiet for this test
	p.mu.Unlock()

	a := p.Take()
	require.NotNil(t, a)
	defer a.Discard()
	time.Sleep(500 * time.Millisecond) // a spawn takes ~10 ms
	require.Equal(t, 1, p.Idle(), "no refill before the node is quiet")

	b := p.Take()
	require.NotNil(t, b)
	defer b.Discard()
	require.Eventually(t, func() bool { return p.Idle() == 1 }, 15*time.Second, 10*time.Millisecond, "an empty pool refills at once")
	time.Sleep(300 * time.Millisecond)
	require.Equal(t, 1, p.Idle(), "and only to one while starts keep coming")

	p.mu.Lock()
	p.quiet = 50 * time.Millisecond
	p.mu.Unlock()
	p.kick()
	require.Eventually(t, func() bool { return p.Idle() == 2 }, 15*time.Second, 10*time.Millisecond, "quiet: full again")
}

// TestStuckIdleShimFallsBack: an idle shim that does not answer (here
// SIGSTOPped) costs a start only the adoption's own short deadline; the
// fresh shim started instead gets what is left of the start's deadline
// (before, adoption used all of it and the fallback failed at once).
func TestStuckIdleShimFallsBack(t *testing.T) {
	shimBin, kernel := build(t)
	root := t.TempDir()
	poolDir := filepath.Join(root, "pool")
	t.Cleanup(func() {
		killTestShims(shimBin, "--pool-dir "+poolDir)
		killTestShims(shimBin, "--dir "+root)
	})
	p, err := NewPool(shimBin, poolDir, 1, time.Hour)
	require.NoError(t, err)
	defer p.Close()
	require.Eventually(t, func() bool { return p.Idle() == 1 }, 15*time.Second, 10*time.Millisecond)
	p.mu.Lock()
	stuck := p.idle[0].pid
	p.mu.Unlock()
	require.NoError(t, syscall.Kill(stuck, syscall.SIGSTOP))

	vmDir := filepath.Join(root, "vm")
	ctx, cancel := context.WithTimeout(context.Background(), 10*AdoptTimeout)
	defer cancel()
	t0 := time.Now()
	c, err := p.Launch(ctx, vmDir, spec(t, kernel, vmDir, "tick=50"), nil)
	t.Logf("launch took %s", time.Since(t0))
	require.NoError(t, err, "the start falls back to a fresh shim within its deadline")
	defer c.Close()
	require.NotEqual(t, stuck, c.ShimPid())
	_, err = os.Stat(fmt.Sprintf("/proc/%d", stuck))
	require.True(t, os.IsNotExist(err), "the stuck idle shim was ended")
	_, err = c.Kill(context.Background(), &api.KillRequest{})
	require.NoError(t, err)
	_, _ = c.Shutdown(context.Background(), &api.ShutdownRequest{})
}

// KillShimsOf ends only shims of the binary serving exactly the directory
// (a shim left waiting for a Start by a daemon that died); a shim of
// another directory and a process of another binary are left.
func TestKillShimsOf(t *testing.T) {
	shimBin, kernel := build(t)
	root := t.TempDir()
	start := func(dir string) *exec.Cmd {
		require.NoError(t, writeSpec(dir, spec(t, kernel, dir, "tick=50")))
		cmd := exec.Command(shimBin, "--dir", dir)
		require.NoError(t, cmd.Start())
		t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
		require.Eventually(t, func() bool {
			c, err := Connect(dir)
			if err == nil {
				c.Close()
			}
			return err == nil
		}, 15*time.Second, 10*time.Millisecond)
		return cmd
	}
	a, b := filepath.Join(root, "vm", "a"), filepath.Join(root, "vm", "b")
	stray, other := start(a), start(b)
	decoy := exec.Command("sh", "-c", "sleep 120", "unilet-shim", "--dir", a) // same arguments, another binary
	require.NoError(t, decoy.Start())
	t.Cleanup(func() { _ = decoy.Process.Kill(); _ = decoy.Wait() })

	require.Equal(t, 0, KillShimsOf(shimBin, filepath.Join(root, "vm")), "only an exact directory")
	require.Equal(t, 1, KillShimsOf(shimBin, a))
	err := stray.Wait()
	require.Error(t, err, "killed")
	require.NoError(t, syscall.Kill(other.Process.Pid, 0), "another directory's shim is left")
	require.NoError(t, syscall.Kill(decoy.Process.Pid, 0), "another binary is left")
}
