package vmm

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/unilet-dev/unilet/pkg/crilog"
)

// Exit reasons reported to CRI.
const (
	ReasonCompleted     = "Completed"
	ReasonError         = "Error"
	ReasonKilled        = "Killed"
	ReasonGuestPanicked = "GuestPanicked"
	ReasonInternalError = "VMInternalError"
	ReasonStartFailed   = "StartError"
)

// ExitStatus is how a VM ended.
type ExitStatus struct {
	Code       int32
	Reason     string
	Message    string
	FinishedAt time.Time
}

// VMSpec is one VM to run: the machine, the QEMU binary and where its console goes.
type VMSpec struct {
	QEMU     string
	Machine  MachineConfig
	StateDir string // per-VM directory for sockets and QEMU's stderr
	LogPath  string // CRI log file ("" = discard)
	// StartTimeout bounds how long QEMU may take to answer on QMP
	// (default DefaultStartTimeout: a busy node starts many VMs at once).
	StartTimeout time.Duration `json:",omitempty"`
	// Jail confines QEMU (nil: QEMU runs as the shim does; see jail.go).
	Jail *JailSpec `json:",omitempty"`
	// Restore starts the VM from a template instead of booting it (with
	// Machine.Incoming and private Machine.RAM; nil: it boots).
	Restore *RestoreSpec `json:",omitempty"`
	// Idle is the VM's scale-to-zero and autostart (nil: always running).
	Idle *IdleSpec `json:",omitempty"`
}

// RestoreSpec is the template a clone starts from.
type RestoreSpec struct {
	RAM   string // the template's RAM: a sealed memfd (LoadRAMFile) bind-mounted at this path
	State string // the template's device state file
	// Hold leaves the restored guest paused, with no log and no pod yet:
	// a warm clone, made ahead of any pod, which a pod start then claims
	// (VM.Claim) so that only a `cont` is on its path.
	Hold bool `json:",omitempty"`
}

// DefaultStartTimeout is how long a VM may take to come up on QMP.
const DefaultStartTimeout = 30 * time.Second

// VM supervises one QEMU process: console → CRI log, exit status, stop.
type VM struct {
	spec        VMSpec
	cmd         *exec.Cmd
	log         atomic.Pointer[crilog.Writer] // nil until a held clone is claimed
	startedAt   time.Time
	done        chan struct{}
	killed      bool
	sentSig     syscall.Signal // signal unilet sent (QEMU exits 0 on SIGTERM/SIGINT)
	failure     *ExitStatus    // set when unilet ended a VM it found broken
	mu          sync.Mutex
	exit        ExitStatus
	stderr      *os.File
	mon         *monitor
	hub         consoleHub
	inMu        sync.Mutex
	stdin       *os.File                  // console input (write end of QEMU's stdin)
	idle        atomic.Pointer[idleState] // set before QEMU starts, or when a held clone is claimed
	watching    atomic.Bool               // StartWatching ran: its watcher closes idle
	claimed     atomic.Bool               // a held clone was claimed (Claim)
	firstOutput atomic.Int64              // unix ns of the console's first bytes (0: none yet)
	tail        consoleTail               // the console's last bytes, for the exit message
	oomBase     oomCount                  // the OOM kills in the shim's memory cgroup when QEMU started
}

// StartVM launches QEMU for spec and returns once the process runs and its
// QMP monitor answers (or fails with a reason). With spec.Jail, QEMU starts
// through the jail helper (package jail) and sees the kernel, initrd and
// volumes at the jail's paths.
func StartVM(spec VMSpec) (*VM, error) { return StartVMWith(spec, Files{}) }

// Files are open files a VM starts with, beside what its spec names.
type Files struct {
	// RAM is the guest RAM file for Machine.RAM (a memfd; for a clone, one
	// sealed against writes: CheckSealed).
	RAM *os.File
}

// StartVMWith is StartVM with files passed to QEMU.
func StartVMWith(spec VMSpec, files Files) (*VM, error) {
	if spec.Machine.RAM != nil {
		if files.RAM == nil {
			return nil, errors.New("the VM's RAM is file-backed but no RAM file was given")
		}
		if !spec.Machine.RAM.Shared {
			if err := CheckSealed(files.RAM); err != nil {
				return nil, err
			}
		}
	}
	m := spec.Machine
	// Autostart off: the guest's vCPUs wait stopped for the first wake (a
	// clone arrives stopped anyway).
	m.Paused = m.Paused || (spec.Idle != nil && spec.Idle.Paused && !m.Incoming)
	if spec.Jail != nil {
		m = spec.Jail.machine(m)
	}
	argv, err := BuildArgv(m)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(spec.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("create VM state dir: %w", err)
	}
	v := &VM{spec: spec, done: make(chan struct{})}
	if spec.LogPath != "" {
		l, err := crilog.Open(spec.LogPath)
		if err != nil {
			return nil, err
		}
		v.log.Store(l)
	}
	v.stderr, err = os.Create(filepath.Join(spec.StateDir, "qemu.stderr"))
	if err != nil {
		v.closeLog()
		return nil, err
	}
	// theirs: QEMU's ends, closed here once it runs (it holds copies);
	// ours: the shim's ends, closed too if QEMU does not start.
	var theirs []*os.File
	var ours []io.Closer
	fail := func(err error) (*VM, error) {
		closeAll(theirs)
		for _, c := range ours {
			c.Close()
		}
		v.cleanupFiles()
		return nil, err
	}
	stdout, stdoutW, err := consolePipe()
	if err != nil {
		return fail(err)
	}
	theirs, ours = append(theirs, stdoutW), append(ours, stdout)
	// The console input stays open (and empty) so QEMU does not see EOF.
	stdinR, stdinW, err := os.Pipe()
	if err != nil {
		return fail(err)
	}
	theirs, ours = append(theirs, stdinR), append(ours, stdinW)
	taps, err := openTaps(spec.Machine.NICs)
	if err != nil {
		return fail(err)
	}
	theirs = append(theirs, taps...)
	idle, err := prepareIdle(spec)
	if err != nil {
		return fail(err)
	}
	if idle != nil {
		v.idle.Store(idle)
		ours = append(ours, closerFunc(idle.close))
	}
	// The QMP monitor: a connected socket pair, QEMU's end at m.QMPFD().
	qmpOurs, qmpTheirs, err := socketPair()
	if err != nil {
		return fail(err)
	}
	theirs, ours = append(theirs, qmpTheirs), append(ours, qmpOurs)
	var cmd *exec.Cmd
	if spec.Jail != nil {
		if cmd, err = spec.Jail.command(spec, argv); err != nil {
			return fail(err)
		}
	} else {
		cmd = exec.Command(spec.QEMU, argv...)
		cmd.Env = []string{MarkerEnv + "=" + spec.StateDir}
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = stdinR, stdoutW, v.stderr
	cmd.ExtraFiles = append(append([]*os.File{}, taps...), qmpTheirs)
	if spec.Machine.RAM != nil { // at Machine.RAMFD()
		cmd.ExtraFiles = append(cmd.ExtraFiles, files.RAM)
	}
	// QEMU never outlives its shim: a shim that dies (or is killed while a
	// start is cancelled) takes its VM with it, so no VM runs unsupervised.
	cmd.SysProcAttr.Setpgid, cmd.SysProcAttr.Pdeathsig = true, syscall.SIGKILL
	if err := cmd.Start(); err != nil {
		return fail(fmt.Errorf("start %s: %w", spec.QEMU, err))
	}
	closeAll(theirs)
	v.oomBase = readOOMCount()
	v.stdin = stdinW
	v.cmd = cmd
	v.mu.Lock()
	v.startedAt = time.Now()
	v.mu.Unlock()
	logrus.WithFields(logrus.Fields{"pid": cmd.Process.Pid, "vm": spec.Machine.Name, "jailed": spec.Jail != nil}).Debug("qemu started")

	copied := make(chan struct{})
	go func() {
		defer close(copied)
		copyConsole(teeWriter{log: &v.log, hub: &v.hub, tail: &v.tail, first: &v.firstOutput}, stdout)
		stdout.Close()
		v.hub.close()
	}()
	go func() {
		<-copied
		_ = cmd.Wait() // the exit is read from ProcessState
		v.inMu.Lock()
		stdinW.Close()
		v.stdin = nil
		v.inMu.Unlock()
		v.finish()
	}()

	timeout := spec.StartTimeout
	if timeout <= 0 {
		timeout = DefaultStartTimeout
	}
	if err := v.waitQMP(timeout, qmpOurs); err != nil {
		v.Kill()
		<-v.done
		st := v.Exit()
		return nil, fmt.Errorf("VM did not start: %v (%s)", err, st.Message)
	}
	if idle != nil && spec.Restore == nil { // a restore starts watching once restored (StartWatching)
		v.StartWatching()
	}
	return v, nil
}

// StartWatching starts scale-to-zero and autostart for a VM with an
// IdleSpec (StartVMWith does it, except for a VM being restored: after
// Restore).
func (v *VM) StartWatching() {
	if v.idle.Load() == nil || v.watching.Swap(true) {
		return
	}
	go v.watchIdle()
}

type closerFunc func()

func (f closerFunc) Close() error { f(); return nil }

// MarkerEnv names the environment variable QEMU is started with: the VM
// directory it serves, part of the proof that a PID is this VM's QEMU
// (shim.IsQEMUOf).
const MarkerEnv = "UNILET_VM_DIR"

// socketPair returns a connected unix stream socket pair: ours as a
// net.Conn, theirs as a file to hand to QEMU.
func socketPair() (net.Conn, *os.File, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("QMP socket pair: %w", err)
	}
	ours := os.NewFile(uintptr(fds[0]), "qmp")
	defer ours.Close() // FileConn dups it
	conn, err := net.FileConn(ours)
	if err != nil {
		unix.Close(fds[1])
		return nil, nil, err
	}
	return conn, os.NewFile(uintptr(fds[1]), "qmp-qemu"), nil
}

// waitQMP reads QEMU's greeting on its monitor connection, negotiates QMP
// and checks the VM actually runs.
func (v *VM) waitQMP(timeout time.Duration, conn net.Conn) error {
	deadline := time.Now().Add(timeout)
	mon, err := newMonitor(conn, deadline, v.onEvent)
	if err != nil {
		select { // a closed connection is usually QEMU exiting: give its exit a moment to show
		case <-v.done:
			return errors.New("QEMU exited during start-up")
		case <-time.After(time.Second):
		}
		return fmt.Errorf("no QMP greeting within %s: %w", timeout, err)
	}
	v.mu.Lock()
	v.mon = mon
	v.mu.Unlock()
	st, err := mon.status()
	if err != nil {
		return err
	}
	if st == "internal-error" || st == "guest-panicked" {
		return fmt.Errorf("VM is in state %s right after start", st)
	}
	return nil
}

// onEvent turns QMP events about a broken guest into a failed container:
// a guest panic (pvpanic, with -action panic=pause) or a VM stopped in
// internal-error (e.g. KVM could not emulate an instruction) would otherwise
// leave QEMU paused forever.
func (v *VM) onEvent(name string) {
	switch name {
	case "GUEST_PANICKED":
		v.fail(ExitStatus{Code: 1, Reason: ReasonGuestPanicked, Message: "the guest kernel panicked (pvpanic)"})
	case "STOP":
		v.mu.Lock()
		mon := v.mon
		v.mu.Unlock()
		if mon == nil {
			return
		}
		st, err := mon.status()
		if err != nil {
			return
		}
		switch st {
		case "internal-error":
			v.fail(ExitStatus{Code: 1, Reason: ReasonInternalError,
				Message: "QEMU stopped the VM in internal-error (the accelerator could not run the guest; on nested or PVM KVM use --accel=tcg)"})
		case "guest-panicked":
			v.fail(ExitStatus{Code: 1, Reason: ReasonGuestPanicked, Message: "the guest kernel panicked (pvpanic)"})
		}
	}
}

// fail records why unilet ends the VM and kills QEMU.
func (v *VM) fail(st ExitStatus) {
	v.mu.Lock()
	if v.failure == nil {
		v.failure = &st
	}
	v.mu.Unlock()
	_ = v.cmd.Process.Signal(syscall.SIGKILL)
}

func (v *VM) finish() {
	if idle := v.idle.Load(); idle != nil && !v.watching.Swap(true) { // never watched (a restore that failed)
		idle.close()
	}
	st := ExitStatus{FinishedAt: time.Now()}
	code := v.cmd.ProcessState.ExitCode()
	ws, _ := v.cmd.ProcessState.Sys().(syscall.WaitStatus)
	v.mu.Lock()
	killed, failure, sentSig := v.killed, v.failure, v.sentSig
	if v.mon != nil {
		v.mon.close()
	}
	v.mu.Unlock()
	switch {
	case failure != nil:
		st.Code, st.Reason, st.Message = failure.Code, failure.Reason, failure.Message
	case killed && sentSig != 0 && !ws.Signaled():
		// QEMU catches SIGTERM/SIGINT and exits 0: still unilet's kill.
		st.Code, st.Reason = 128+int32(sentSig), ReasonKilled
		st.Message = fmt.Sprintf("QEMU terminated on %s sent by unilet", sentSig)
	case ws.Signaled():
		st.Code = 128 + int32(ws.Signal())
		st.Reason = ReasonKilled
		if !killed {
			st.Reason = ReasonError
		}
		st.Message = fmt.Sprintf("QEMU was killed by signal %s", ws.Signal())
		if !killed && ws.Signal() == syscall.SIGKILL && v.oomBase.killedSince() {
			st.Reason = ReasonOOMKilled
			st.Message = fmt.Sprintf("the host's OOM killer ended QEMU: the container's memory cgroup reached its limit "+
				"(%d MiB of guest RAM plus QEMU's own memory did not fit); leave QEMU more room with a smaller "+
				"unilet.dev/memory or a larger --vmm-overhead", v.spec.Machine.MemoryMiB)
		}
	case code == 0 || (v.spec.Machine.Machine == MachineMicroVM && code == 83):
		st.Reason = ReasonCompleted
	default:
		st.Code = int32(code)
		st.Reason = ReasonError
		st.Message = fmt.Sprintf("QEMU exited with status %d", code)
		if v.spec.Machine.Machine == MachineMicroVM && code == 85 {
			st.Reason = ReasonGuestPanicked
			st.Message = "the guest crashed (isa-debug-exit status 85)"
		}
	}
	if st.Reason == ReasonGuestPanicked {
		st = GuestCrashStatus(st, v.tail.Bytes())
	}
	if tail := v.stderrTail(); tail != "" && st.Reason != ReasonCompleted && failure == nil {
		st.Message += ": " + tail
	}
	v.closeLog()
	if v.stderr != nil {
		v.stderr.Close()
	}
	v.mu.Lock()
	v.exit = st
	v.mu.Unlock()
	close(v.done)
}

func (v *VM) stderrTail() string {
	b, err := os.ReadFile(filepath.Join(v.spec.StateDir, "qemu.stderr"))
	if err != nil {
		return ""
	}
	var keep []string
	for _, l := range strings.Split(string(bytes.TrimSpace(b)), "\n") {
		// Our own fw_cfg knob makes QEMU warn; it is not news to the operator.
		if strings.Contains(l, "sercon-port") || strings.TrimSpace(l) == "" {
			continue
		}
		keep = append(keep, strings.TrimSpace(l))
	}
	if len(keep) > 3 {
		keep = keep[len(keep)-3:]
	}
	return strings.Join(keep, "; ")
}

func (v *VM) closeLog() {
	if l := v.log.Swap(nil); l != nil {
		_ = l.Close()
	}
}

func (v *VM) cleanupFiles() {
	v.closeLog()
	if v.stderr != nil {
		v.stderr.Close()
	}
}

// Pid returns QEMU's process ID.
func (v *VM) Pid() int { return v.cmd.Process.Pid }

// StartedAt is when QEMU was spawned.
func (v *VM) StartedAt() time.Time {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.startedAt
}

// Done is closed when QEMU has exited and the log is complete.
func (v *VM) Done() <-chan struct{} { return v.done }

// FirstOutput is when the console's first bytes came (zero: none yet).
func (v *VM) FirstOutput() time.Time {
	if ns := v.firstOutput.Load(); ns != 0 {
		return time.Unix(0, ns)
	}
	return time.Time{}
}

// Exit returns the exit status (zero until Done).
func (v *VM) Exit() ExitStatus {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.exit
}

// Kill ends QEMU at once (exit 137, reason Killed).
func (v *VM) Kill() {
	v.mu.Lock()
	v.killed = true
	v.mu.Unlock()
	_ = v.cmd.Process.Signal(syscall.SIGKILL)
}

// Signal sends sig to QEMU; the exit is reported as unilet's own kill
// (reason Killed) because unilet sent it.
func (v *VM) Signal(sig syscall.Signal) error {
	v.mu.Lock()
	v.killed, v.sentSig = true, sig
	v.mu.Unlock()
	return v.cmd.Process.Signal(sig)
}

// ReopenLog reopens the CRI log file after rotation.
func (v *VM) ReopenLog() error {
	if l := v.log.Load(); l != nil {
		return l.Reopen()
	}
	return nil
}

// PowerButtonRepeat: while a stop waits for the guest, the ACPI power button
// is pressed again this often, so a guest that was still booting (its ACPI
// not yet listening) when the first press came still shuts down cleanly.
const PowerButtonRepeat = 2 * time.Second

// Stop asks the guest to power down (ACPI via QMP system_powerdown, pressed
// again every PowerButtonRepeat) and kills QEMU if it has not exited within
// timeout.
func (v *VM) Stop(timeout time.Duration) ExitStatus {
	select {
	case <-v.done:
		return v.Exit()
	default:
	}
	v.mu.Lock()
	mon := v.mon
	v.mu.Unlock()
	if timeout > 0 && mon != nil {
		if _, err := mon.execute("system_powerdown", qmpPowerdownTimeout); err != nil {
			logrus.WithError(err).WithField("vm", v.spec.Machine.Name).Debug("graceful power-down failed; killing")
		} else if v.waitPoweroff(mon, timeout) {
			return v.Exit()
		}
	}
	v.Kill()
	<-v.done
	return v.Exit()
}

// waitPoweroff waits up to timeout for QEMU to exit, pressing the power
// button again every PowerButtonRepeat; reports whether it exited.
func (v *VM) waitPoweroff(mon *monitor, timeout time.Duration) bool {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	again := time.NewTicker(PowerButtonRepeat)
	defer again.Stop()
	for {
		select {
		case <-v.done:
			return true
		case <-deadline.C:
			return false
		case <-again.C:
			_, _ = mon.execute("system_powerdown", qmpPowerdownTimeout)
		}
	}
}
