package shim

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// launchVM runs the test kernel under a real shim and returns its handle.
func launchVM(t *testing.T) (h *Handle, vmDir string) {
	t.Helper()
	shimBin, kernel := build(t)
	vmDir = filepath.Join(t.TempDir(), "vm")
	c, err := Launch(context.Background(), shimBin, vmDir, spec(t, kernel, vmDir, "tick=50"), nil)
	require.NoError(t, err)
	h, err = NewHandle(context.Background(), c)
	require.NoError(t, err)
	return h, vmDir
}

// A stopped (SIGSTOP) shim fails every call with DeadlineExceeded within
// the caller's deadline instead of hanging it, and serves again after SIGCONT.
func TestStuckShimCallsHitTheirDeadline(t *testing.T) {
	h, _ := launchVM(t)
	shimPid := parentOf(t, h.Pid())
	pidfd, err := unix.PidfdOpen(shimPid, 0) // signal only this very shim
	require.NoError(t, err)
	signal := func(sig unix.Signal) error { return unix.PidfdSendSignal(pidfd, sig, nil, 0) }
	require.NoError(t, signal(unix.SIGSTOP))
	require.Eventually(t, func() bool { // the signal is asynchronous: wait until it has stopped
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", shimPid))
		return strings.Contains(string(b), ") T ")
	}, 5*time.Second, 5*time.Millisecond)
	t.Cleanup(func() { _ = signal(unix.SIGCONT); _ = unix.Close(pidfd) })

	calls := map[string]func(ctx context.Context) error{
		"stop":   func(ctx context.Context) error { _, err := h.Stop(ctx, time.Second); return err },
		"stats":  func(ctx context.Context) error { _, err := h.Stats(ctx); return err },
		"reopen": func(ctx context.Context) error { return h.ReopenLog(ctx) },
	}
	for name, call := range calls {
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		t0 := time.Now()
		err := call(ctx)
		cancel()
		require.ErrorIs(t, err, context.DeadlineExceeded, name)
		require.Less(t, time.Since(t0), 5*time.Second, "%s returned long after its deadline", name)
	}
	select {
	case <-h.Done():
		t.Fatal("a stuck shim is not an ended VM")
	default:
	}
	require.NoError(t, signal(unix.SIGCONT))
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ex, err := h.Stop(ctx, 0)
	require.NoError(t, err)
	require.Equal(t, int32(137), ex.Code)
	require.NoError(t, h.Release(ctx))
}

// QEMU never outlives its shim: a killed shim takes its VM along, and the
// handle reports the supervisor's death.
func TestKilledShimTakesItsQEMU(t *testing.T) {
	h, vmDir := launchVM(t)
	defer h.Close()
	qemu := h.Pid()
	require.True(t, IsQEMUOf(qemu, vmDir))
	require.NoError(t, syscall.Kill(parentOf(t, qemu), syscall.SIGKILL))
	select {
	case <-h.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the handle did not notice its shim's death")
	}
	require.Equal(t, "ShimDied", h.Exit().Reason)
	require.Eventually(t, func() bool { return syscall.Kill(qemu, 0) != nil || isZombie(qemu) }, 5*time.Second, 20*time.Millisecond,
		"QEMU kept running without its shim")
}

func TestIsQEMUOfNeedsProof(t *testing.T) {
	h, vmDir := launchVM(t)
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, _ = h.Stop(ctx, 0)
		_ = h.Release(ctx)
	}()
	pid := h.Pid()
	require.True(t, IsQEMUOf(pid, vmDir))
	for _, dir := range []string{"", "/", "relative/vm", vmDir + "/..", vmDir[:len(vmDir)-1], filepath.Dir(vmDir) + "/other"} {
		require.False(t, IsQEMUOf(pid, dir), "dir %q proved nothing", dir)
	}
	require.False(t, IsQEMUOf(1, "/"), "PID 1 is never ours")
	require.False(t, IsQEMUOf(os.Getpid(), vmDir), "not a QEMU")
	require.False(t, KillQEMU(parentOf(t, pid), vmDir), "the shim is not a QEMU")
	require.False(t, KillQEMU(1, ""), "PID 1 is never signalled")
}

// A broken connection to a live shim is replaced, and the old client (its
// socket and its pidfd) is closed, not leaked.
func TestReconnectClosesTheOldClient(t *testing.T) {
	h, _ := launchVM(t)
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, _ = h.Stop(ctx, 0)
		_ = h.Release(ctx)
	}()
	fds := func() int { ents, _ := os.ReadDir("/proc/self/fd"); return len(ents) }
	before := fds()
	for i := 0; i < maxReconnects; i++ {
		old := h.client()
		_ = old.conn.Close() // the Wait stream breaks; the shim lives on
		require.Eventually(t, func() bool { return h.client() != old }, 5*time.Second, 10*time.Millisecond, "no reconnect")
	}
	require.Eventually(t, func() bool { return fds() <= before+1 }, 5*time.Second, 10*time.Millisecond,
		"replaced clients left file descriptors open")
	select {
	case <-h.Done():
		t.Fatal("a reconnect is not the VM's end")
	default:
	}
}
