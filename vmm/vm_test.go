package vmm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/unilet-dev/unilet/internal/testutil"
)

// These tests boot the repository's test kernel under real QEMU.

func qemuBin(t *testing.T) string {
	t.Helper()
	return testutil.NeedQEMU(t, testutil.LaneUnit)
}

func testKernel(t *testing.T) string {
	t.Helper()
	testutil.NeedQEMU(t, testutil.LaneUnit)
	out := filepath.Join(t.TempDir(), "testkernel.elf")
	b, err := exec.Command("../e2e/guest/testkernel/build.sh", out).CombinedOutput()
	require.NoError(t, err, string(b))
	return out
}

func bootSpec(t *testing.T, kernel string, args ...string) VMSpec {
	dir := t.TempDir()
	line, _, err := BuildCmdline(GuestConfig{KernelName: kernel, Env: []string{"GREETING=hello world"}, Args: args})
	require.NoError(t, err)
	return VMSpec{
		QEMU: qemuBin(t),
		Machine: MachineConfig{Name: "test", Accel: AccelTCG, Machine: MachinePC, MemoryMiB: 32, VCPUs: 1,
			Kernel: kernel, Cmdline: line},
		StateDir: filepath.Join(dir, "state"),
		LogPath:  filepath.Join(dir, "log", "0.log"),
	}
}

// waitLog waits (up to 20 s) until the log at path holds want.
func waitLog(t *testing.T, path, want string, msgAndArgs ...any) {
	t.Helper()
	require.Eventually(t, func() bool {
		b, _ := os.ReadFile(path)
		return strings.Contains(string(b), want)
	}, 20*time.Second, 20*time.Millisecond, msgAndArgs...)
}

func TestVMBootsAndLogsConsole(t *testing.T) {
	k := testKernel(t)
	spec := bootSpec(t, k, "hello", "big world")
	vm, err := StartVM(spec)
	require.NoError(t, err)
	select {
	case <-vm.Done():
	case <-time.After(30 * time.Second):
		vm.Kill()
		t.Fatal("guest did not exit")
	}
	st := vm.Exit()
	require.Equal(t, int32(0), st.Code, st.Message)
	require.Equal(t, ReasonCompleted, st.Reason)
	b, err := os.ReadFile(spec.LogPath)
	require.NoError(t, err)
	log := string(b)
	for _, want := range []string{" stdout F unilet-testkernel: booted\n", " stdout F argv[1]: hello\n",
		" stdout F argv[2]: big world\n", " stdout F env: GREETING=hello world\n", " stdout F unilet-testkernel: exit 0\n"} {
		require.Contains(t, log, want)
	}
	require.NotContains(t, log, "SeaBIOS", "firmware output must stay off the console")
}

func TestVMStopKillsAfterTimeout(t *testing.T) {
	k := testKernel(t)
	spec := bootSpec(t, k, "tick=20", "ignore-acpi")
	vm, err := StartVM(spec)
	require.NoError(t, err)
	waitLog(t, spec.LogPath, "tick 3\n")
	start := time.Now()
	st := vm.Stop(300 * time.Millisecond)
	require.Less(t, time.Since(start), 5*time.Second)
	require.Equal(t, int32(137), st.Code)
	require.Equal(t, ReasonKilled, st.Reason)
	require.Error(t, exec.Command("kill", "-0", itoa(vm.Pid())).Run(), "QEMU must be gone")
}

func TestVMQEMUCrashIsReported(t *testing.T) {
	k := testKernel(t)
	spec := bootSpec(t, k, "tick=20")
	vm, err := StartVM(spec)
	require.NoError(t, err)
	require.NoError(t, exec.Command("kill", "-SEGV", itoa(vm.Pid())).Run())
	select {
	case <-vm.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("crash not noticed")
	}
	st := vm.Exit()
	require.Equal(t, int32(139), st.Code)
	require.Equal(t, ReasonError, st.Reason)
	require.Contains(t, st.Message, "signal")
}

func TestVMStartFailureIsClear(t *testing.T) {
	spec := bootSpec(t, "/nonexistent/kernel")
	start := time.Now()
	_, err := StartVM(spec)
	require.ErrorContains(t, err, "VM did not start")
	require.ErrorContains(t, err, "kernel")
	require.ErrorContains(t, err, "QEMU exited during start-up")
	require.Less(t, time.Since(start), 10*time.Second, "a QEMU that exits before connecting its monitor ends the wait at once")
}

func TestResolveAccel(t *testing.T) {
	q := qemuBin(t)
	a, err := ResolveAccel(context.Background(), "tcg", q, "")
	require.NoError(t, err)
	require.Equal(t, AccelTCG, a)
	_, err = ResolveAccel(context.Background(), "hvf", q, "")
	require.ErrorContains(t, err, "unknown --accel")
	// auto always resolves; on machines whose KVM cannot run guests it must be TCG.
	a, err = ResolveAccel(context.Background(), "auto", q, "")
	require.NoError(t, err)
	if ProbeKVM(context.Background(), q) != nil {
		require.Equal(t, AccelTCG, a)
		_, err = ResolveAccel(context.Background(), "kvm", q, "")
		require.ErrorContains(t, err, "KVM cannot run guests")
	} else {
		require.Equal(t, AccelKVM, a)
	}
}

// The probe's verdict is kept for the host's boot and the QEMU binary: a
// second start does not probe again; another QEMU binary does.
func TestAccelProbeVerdictIsKept(t *testing.T) {
	dir := t.TempDir()
	q := filepath.Join(dir, "qemu")
	require.NoError(t, os.WriteFile(q, []byte("#!/bin/sh\n"), 0o755))
	probes := 0
	old := probe
	probe = func(context.Context, string) error { probes++; return errors.New("KVM probe guest failed") }
	t.Cleanup(func() { probe = old })
	for i := 0; i < 3; i++ {
		a, err := ResolveAccel(context.Background(), "auto", q, dir)
		require.NoError(t, err)
		require.Equal(t, AccelTCG, a)
	}
	require.Equal(t, 1, probes, "probed once in this boot")
	_, err := ResolveAccel(context.Background(), "kvm", q, dir)
	require.ErrorContains(t, err, "probed earlier in this boot")
	require.Equal(t, 1, probes)
	require.NoError(t, os.WriteFile(q, []byte("#!/bin/sh\n# upgraded\n"), 0o755))
	_, _ = ResolveAccel(context.Background(), "auto", q, dir)
	require.Equal(t, 2, probes, "another QEMU binary is probed anew")
	require.NoError(t, os.WriteFile(filepath.Join(dir, ProbeCacheFile), []byte("{not json"), 0o600))
	_, _ = ResolveAccel(context.Background(), "auto", q, dir)
	require.Equal(t, 3, probes, "an unreadable verdict is probed anew")
}

func itoa(i int) string { return fmt.Sprint(i) }

func TestVMGuestPanicIsReported(t *testing.T) {
	k := testKernel(t)
	spec := bootSpec(t, k, "panic")
	vm, err := StartVM(spec)
	require.NoError(t, err)
	select {
	case <-vm.Done():
	case <-time.After(20 * time.Second):
		vm.Kill()
		t.Fatal("a panicked guest must not leave QEMU paused")
	}
	st := vm.Exit()
	require.Equal(t, ReasonGuestPanicked, st.Reason)
	require.NotZero(t, st.Code)
	b, _ := os.ReadFile(spec.LogPath)
	require.Contains(t, string(b), "panic: requested")
}

// On a machine whose KVM cannot run unmodified guests (nested PVM), a guest
// under KVM with a plain CPU model ends in QMP state internal-error: that must
// become a failed container, not a hang. Where KVM works, the same guest
// simply completes.
func TestVMInternalErrorIsReported(t *testing.T) {
	k := testKernel(t)
	spec := bootSpec(t, k, "sse", "tick=10", "count=20")
	spec.Machine.Accel = AccelKVM
	spec.Machine.CPU = "qemu64"
	kvmWorks := ProbeKVM(context.Background(), spec.QEMU) == nil
	vm, err := StartVM(spec)
	if err != nil {
		// QEMU could not even start under KVM: a clear start error is the right outcome.
		t.Logf("start failed: %v", err)
		require.False(t, kvmWorks)
		require.ErrorContains(t, err, "VM did not start")
		return
	}
	select {
	case <-vm.Done():
	case <-time.After(20 * time.Second):
		vm.Kill()
		t.Fatal("VM neither finished nor was failed")
	}
	st := vm.Exit()
	if kvmWorks {
		require.Equal(t, ReasonCompleted, st.Reason)
		return
	}
	b, _ := os.ReadFile(spec.LogPath)
	require.NotContains(t, string(b), "sse: ok")
	t.Logf("exit: %+v", st)
	require.Equal(t, ReasonInternalError, st.Reason, st.Message)
	require.Contains(t, st.Message, "internal-error")
}

func TestVMConsoleFloodLosesNothing(t *testing.T) {
	k := testKernel(t)
	spec := bootSpec(t, k, "flood=3000", "bigline=40000")
	vm, err := StartVM(spec)
	require.NoError(t, err)
	select {
	case <-vm.Done():
	case <-time.After(60 * time.Second):
		vm.Kill()
		t.Fatal("guest did not finish")
	}
	require.Equal(t, ReasonCompleted, vm.Exit().Reason)
	b, err := os.ReadFile(spec.LogPath)
	require.NoError(t, err)
	next := 1
	var partial strings.Builder
	bigSeen := false
	for _, l := range strings.Split(strings.TrimSuffix(string(b), "\n"), "\n") {
		f := strings.SplitN(l, " ", 4)
		require.Len(t, f, 4, "malformed CRI log line %q", l)
		if f[2] == "P" {
			partial.WriteString(f[3])
			continue
		}
		line := partial.String() + f[3]
		partial.Reset()
		if strings.HasPrefix(line, "abcdefghij") {
			require.Len(t, line, 40000, "the long line must be reassembled intact from its P parts")
			bigSeen = true
		}
		if strings.HasPrefix(line, "line ") {
			require.Equal(t, fmt.Sprintf("line %d", next), line, "lines must arrive once and in order")
			next++
		}
	}
	require.True(t, bigSeen)
	require.Equal(t, 3001, next, "every numbered line must reach the log")
}

func TestVMReopenLog(t *testing.T) {
	k := testKernel(t)
	spec := bootSpec(t, k, "tick=20")
	vm, err := StartVM(spec)
	require.NoError(t, err)
	defer vm.Kill()
	waitLog(t, spec.LogPath, "tick 3\n")
	require.NoError(t, os.Rename(spec.LogPath, spec.LogPath+".1"))
	require.NoError(t, vm.ReopenLog())
	waitLog(t, spec.LogPath, "stdout F tick", "new console lines must go to the reopened file")
	vm.Stop(0)
	old, _ := os.ReadFile(spec.LogPath + ".1")
	cur, _ := os.ReadFile(spec.LogPath)
	// Together the two files hold every tick exactly once, in order.
	n := 1
	for _, l := range strings.Split(string(old)+string(cur), "\n") {
		if i := strings.Index(l, " stdout F tick "); i >= 0 {
			require.Equal(t, fmt.Sprintf("tick %d", n), l[i+len(" stdout F "):])
			n++
		}
	}
	require.Greater(t, n, 4)
}

func TestVMAttachEchoAndDetach(t *testing.T) {
	k := testKernel(t)
	spec := bootSpec(t, k, "echo")
	vm, err := StartVM(spec)
	require.NoError(t, err)
	defer vm.Kill()
	waitLog(t, spec.LogPath, "echo: ready", "the guest must be reading its console before we type")

	// Two sessions watch; the first types, then detaches with Ctrl-].
	inR, inW := io.Pipe()
	var out1, out2 syncBuffer
	ctx2, cancel2 := context.WithCancel(context.Background())
	done1 := make(chan error, 1)
	done2 := make(chan error, 1)
	go func() { done1 <- vm.Attach(context.Background(), inR, &out1) }()
	go func() { done2 <- vm.Attach(ctx2, nil, &out2) }()
	waitSessions(t, vm, 2)
	_, err = inW.Write([]byte("ping-123\n"))
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		return strings.Contains(out1.String(), "ping-123") && strings.Contains(out2.String(), "ping-123")
	},
		10*time.Second, 20*time.Millisecond, "echo must reach every session")
	_, err = inW.Write([]byte{DetachByte})
	require.NoError(t, err)
	select {
	case err := <-done1:
		require.NoError(t, err)
	case <-time.After(5 * time.Second):
		t.Fatal("Ctrl-] did not end the session")
	}
	select {
	case <-vm.Done():
		t.Fatal("detaching must not stop the VM")
	case <-done2:
		t.Fatal("detaching one session must not end another")
	case <-time.After(300 * time.Millisecond):
	}
	cancel2()
	require.NoError(t, <-done2)
	b, _ := os.ReadFile(spec.LogPath)
	require.Contains(t, string(b), "stdout F ping-123", "echoed input is console output and reaches the log")
	vm.Stop(0)
	require.ErrorIs(t, vm.Attach(context.Background(), nil, io.Discard), ErrNotRunning)
}

type syncBuffer = testutil.SyncBuf

func TestVMGracefulStop(t *testing.T) {
	k := testKernel(t)
	spec := bootSpec(t, k, "tick=50")
	vm, err := StartVM(spec)
	require.NoError(t, err)
	waitLog(t, spec.LogPath, "tick 2\n")
	start := time.Now()
	st := vm.Stop(10 * time.Second)
	require.Less(t, time.Since(start), 5*time.Second, "a guest that honours ACPI power-off must not wait for the timeout")
	require.Equal(t, int32(0), st.Code, st.Message)
	require.Equal(t, ReasonCompleted, st.Reason)
	b, _ := os.ReadFile(spec.LogPath)
	require.Contains(t, string(b), "power button pressed")
}

// A QEMU that never answers on QMP (hung at start) must fail the start within
// a bounded time and be killed, not wait forever.
func TestVMWithoutQMPGreetingFails(t *testing.T) {
	dir := t.TempDir()
	fake := filepath.Join(dir, "hung-qemu")
	pidFile := filepath.Join(dir, "pid")
	require.NoError(t, os.WriteFile(fake, []byte("#!/bin/sh\necho $$ > "+pidFile+"\nexec sleep 120\n"), 0o755))
	spec := bootSpec(t, "/k")
	spec.QEMU = fake
	spec.StartTimeout = 3 * time.Second
	start := time.Now()
	_, err := StartVM(spec)
	require.ErrorContains(t, err, "no QMP greeting within 3s")
	require.Less(t, time.Since(start), 15*time.Second)
	// Only the process this test started is looked at (by the PID it wrote).
	b, err := os.ReadFile(pidFile)
	require.NoError(t, err)
	stat, err := os.ReadFile("/proc/" + strings.TrimSpace(string(b)) + "/stat")
	if err == nil {
		f := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:]))
		require.Equal(t, "Z", f[0], "the hung process must be killed")
	}
}

// TestVMMicrovmTimerAndConsoleInterrupts: on microvm the firmware leaves the
// local APIC's LINT0 masked; the guest must still get timer interrupts
// (tick=N … count=N returns and exits) and COM1 input (echo). Before the test
// kernel set LINT0 itself, both hung after their first line there.
func TestVMMicrovmTimerAndConsoleInterrupts(t *testing.T) {
	k := testKernel(t)
	spec := bootSpec(t, k, "tick=30", "count=3")
	spec.Machine.Machine = MachineMicroVM
	vm, err := StartVM(spec)
	require.NoError(t, err)
	defer vm.Kill()
	select {
	case <-vm.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("the microvm guest never woke from its first sleep")
	}
	b, _ := os.ReadFile(spec.LogPath)
	require.Contains(t, string(b), "stdout F tick 3\n")
	require.Contains(t, string(b), "stdout F unilet-testkernel: exit 0\n")

	spec = bootSpec(t, k, "echo")
	spec.Machine.Machine = MachineMicroVM
	vm2, err := StartVM(spec)
	require.NoError(t, err)
	defer vm2.Kill()
	waitLog(t, spec.LogPath, "echo: ready")
	var out syncBuffer
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	inR, inW := io.Pipe()
	go func() { _ = vm2.Attach(ctx, inR, &out) }()
	waitSessions(t, vm2, 1)
	_, err = inW.Write([]byte("pong-456\n"))
	require.NoError(t, err)
	require.Eventually(t, func() bool { return strings.Contains(out.String(), "pong-456") }, 10*time.Second, 20*time.Millisecond,
		"console input must wake the microvm guest")
}

// waitSessions waits until n attach sessions receive the VM's console.
func waitSessions(t *testing.T, v *VM, n int) {
	t.Helper()
	require.Eventually(t, func() bool {
		v.hub.mu.Lock()
		defer v.hub.mu.Unlock()
		return len(v.hub.subs) == n
	}, 10*time.Second, 5*time.Millisecond, "attach sessions never subscribed")
}
