// Package shim is the per-VM supervisor process (cmd/unilet-shim) and its
// client. The shim runs detached from the daemon (own session), owns QEMU,
// the serial console and the CRI log through vmm.VM, records the exit in
// exit.json, and serves the ttrpc API of package shim/api on shim.sock in the
// VM's directory, so a VM can outlive the daemon that started it.
package shim

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containerd/ttrpc"

	"github.com/unilet-dev/unilet/vmm"
	"github.com/unilet-dev/unilet/vmm/shim/api"
)

// Files in a VM directory.
const (
	SpecFile   = "spec.json"
	SocketFile = "shim.sock"
	ExitFile   = "exit.json"
	LogFile    = "shim.log"
)

// Serve runs the shim for the VM directory dir until Shutdown (the daemon
// asks once it has recorded the VM's exit) or ctx ends. It returns after
// QEMU is gone.
func Serve(ctx context.Context, dir string) error {
	spec, err := ReadSpec(dir)
	if err != nil {
		return err
	}
	s := &service{spec: spec, dir: dir, shutdown: make(chan struct{}), exited: make(chan struct{})}
	return s.run(ctx, dir)
}

// ServePool runs an idle, pre-forked shim serving on poolDir/shim.sock until
// Adopt gives it a VM directory (then it is that VM's shim) or Shutdown.
func ServePool(ctx context.Context, poolDir string) error {
	s := &service{pool: true, shutdown: make(chan struct{}), exited: make(chan struct{})}
	return s.run(ctx, poolDir)
}

// ReadSpec is the VM spec in dir (SpecFile).
func ReadSpec(dir string) (vmm.VMSpec, error) {
	var spec vmm.VMSpec
	b, err := os.ReadFile(filepath.Join(dir, SpecFile))
	if err != nil {
		return spec, fmt.Errorf("read VM spec: %w", err)
	}
	if err := json.Unmarshal(b, &spec); err != nil {
		return spec, fmt.Errorf("parse VM spec: %w", err)
	}
	return spec, nil
}

func (s *service) run(ctx context.Context, sockDir string) error {
	sock := filepath.Join(sockDir, SocketFile)
	_ = os.Remove(sock)
	l, err := net.Listen("unix", sock)
	if err != nil {
		return err
	}
	defer os.Remove(sock)
	srv, err := ttrpc.NewServer()
	if err != nil {
		return err
	}
	s.srv, s.listener = srv, l
	api.RegisterShimService(srv, s)
	go func() { _ = srv.Serve(ctx, l) }()
	select {
	case <-s.shutdown:
	case <-ctx.Done():
		if vm := s.getVM(); vm != nil {
			vm.Kill()
		}
	}
	if s.getVM() != nil {
		<-s.exited
	}
	if d := s.vmDir(); d != "" && d != sockDir {
		defer os.Remove(filepath.Join(d, SocketFile))
	}
	// Let the last reply reach the client before the server goes.
	sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		_ = srv.Close()
	}
	return nil
}

// Adopt makes an idle pool shim the shim of the VM directory r.Dir.
func (s *service) Adopt(ctx context.Context, r *api.AdoptRequest) (*api.AdoptResponse, error) {
	s.vmMu.Lock()
	defer s.vmMu.Unlock()
	if !s.pool || s.dir != "" {
		return nil, errors.New("this shim already serves a VM")
	}
	spec, err := ReadSpec(r.GetDir())
	if err != nil {
		return nil, err
	}
	sock := filepath.Join(r.GetDir(), SocketFile)
	_ = os.Remove(sock)
	l, err := net.Listen("unix", sock)
	if err != nil {
		return nil, err
	}
	s.spec, s.dir = spec, r.GetDir()
	go func() { _ = s.srv.Serve(context.Background(), l) }()
	// From now on this shim's own log is the VM directory's.
	if f, err := os.OpenFile(filepath.Join(r.GetDir(), LogFile), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600); err == nil {
		_ = syscall.Dup2(int(f.Fd()), 1)
		_ = syscall.Dup2(int(f.Fd()), 2)
		f.Close()
	}
	// The pool socket goes once this reply is out.
	pool := s.listener
	time.AfterFunc(100*time.Millisecond, func() {
		_ = os.Remove(pool.Addr().String())
		_ = pool.Close()
	})
	return &api.AdoptResponse{Pid: int32(os.Getpid())}, nil
}

func (s *service) vmDir() string {
	s.vmMu.Lock()
	defer s.vmMu.Unlock()
	return s.dir
}

func (s *service) vmSpec() vmm.VMSpec {
	s.vmMu.Lock()
	defer s.vmMu.Unlock()
	return s.spec
}

func writeExit(dir string, st vmm.ExitStatus) error {
	b, _ := json.Marshal(st)
	tmp := filepath.Join(dir, ExitFile+".tmp")
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(dir, ExitFile))
}

// ReadExit returns the exit recorded in dir, if any.
func ReadExit(dir string) (vmm.ExitStatus, bool) {
	var st vmm.ExitStatus
	b, err := os.ReadFile(filepath.Join(dir, ExitFile))
	if err != nil || json.Unmarshal(b, &st) != nil {
		return st, false
	}
	return st, true
}

type service struct {
	pool     bool // started pre-forked, waiting for Adopt
	srv      *ttrpc.Server
	listener net.Listener
	spec     vmm.VMSpec
	startMu  sync.Mutex
	started  bool
	starting atomic.Bool
	vmMu     sync.Mutex
	vm       *vmm.VM
	ram      *os.File // the guest RAM file of a VM with file-backed RAM
	paused   atomic.Bool
	dir      string
	once     sync.Once
	shutdown chan struct{}
	exited   chan struct{} // closed after the exit is recorded
}

func (s *service) getVM() *vmm.VM {
	s.vmMu.Lock()
	defer s.vmMu.Unlock()
	return s.vm
}

var errNotStarted = errors.New("the VM has not been started")

// endSoon ends the shim shortly after the current reply has been written
// (ttrpc closes idle connections at once, which could swallow it).
func (s *service) endSoon() {
	time.AfterFunc(100*time.Millisecond, func() { s.once.Do(func() { close(s.shutdown) }) })
}

func (s *service) Start(ctx context.Context, _ *api.StartRequest) (*api.StateResponse, error) {
	s.startMu.Lock()
	defer s.startMu.Unlock()
	if s.started {
		return nil, errors.New("the VM was already started")
	}
	dir := s.vmDir()
	if dir == "" {
		return nil, errors.New("no VM directory: an idle pool shim must be adopted first")
	}
	s.started = true
	s.starting.Store(true)
	defer s.starting.Store(false)
	vm, err := s.startVM(s.vmSpec())
	if err != nil {
		_ = writeExit(dir, vmm.ExitStatus{Code: 128, Reason: vmm.ReasonStartFailed, Message: err.Error(), FinishedAt: time.Now()})
		s.endSoon()
		return nil, err
	}
	s.vmMu.Lock()
	s.vm = vm
	s.vmMu.Unlock()
	// Clients see the VM as ended only once its exit is on disk.
	go func() {
		<-vm.Done()
		_ = writeExit(dir, vm.Exit())
		close(s.exited)
	}()
	return s.state(), nil
}

// startVM boots the VM, or restores it from its template (spec.Restore).
func (s *service) startVM(spec vmm.VMSpec) (*vmm.VM, error) {
	var files vmm.Files
	if spec.Machine.RAM != nil {
		var err error
		switch {
		case spec.Machine.RAM.Shared:
			files.RAM, err = vmm.NewRAMFile("guest-ram", int64(spec.Machine.MemoryMiB)<<20)
		case spec.Restore != nil:
			files.RAM, err = FetchTemplateRAM(spec.Restore.RAM) // QEMU maps it private
		default:
			err = errors.New("a VM with private file-backed RAM needs a template to restore")
		}
		if err != nil {
			return nil, err
		}
		s.vmMu.Lock()
		s.ram = files.RAM
		s.vmMu.Unlock()
	}
	vm, err := vmm.StartVMWith(spec, files)
	if err != nil || spec.Restore == nil {
		return vm, err
	}
	state, err := os.Open(spec.Restore.State)
	if err == nil {
		err = vm.Restore(state, vmm.RestoreTimeout)
		state.Close()
	}
	if err != nil {
		vm.Kill()
		<-vm.Done()
		return nil, fmt.Errorf("restore the VM from its template: %w", err)
	}
	vm.StartWatching()
	return vm, nil
}

// Snapshot writes a template VM's device state and RAM to r.Dir.
func (s *service) Snapshot(ctx context.Context, r *api.SnapshotRequest) (*api.SnapshotResponse, error) {
	vm := s.getVM()
	if vm == nil {
		return nil, errNotStarted
	}
	s.vmMu.Lock()
	ram := s.ram
	s.vmMu.Unlock()
	if ram == nil || !s.vmSpec().Machine.RAM.Shared {
		return nil, errors.New("only a VM started to become a template can be snapshotted")
	}
	statePath, ramPath := filepath.Join(r.GetDir(), "state"), filepath.Join(r.GetDir(), "ram")
	f, err := os.OpenFile(statePath, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, err
	}
	err = vm.Snapshot(f, vmm.SnapshotTimeout)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	s.paused.Store(true)
	size := int64(s.vmSpec().Machine.MemoryMiB) << 20
	if err == nil {
		err = vmm.SaveRAMFile(ram, ramPath, size)
	}
	if err != nil {
		_ = os.Remove(statePath)
		return nil, err
	}
	st, err := os.Stat(statePath)
	if err != nil {
		return nil, err
	}
	return &api.SnapshotResponse{StateBytes: st.Size(), RamBytes: size}, nil
}

func (s *service) Pause(ctx context.Context, _ *api.PauseRequest) (*api.StateResponse, error) {
	vm := s.getVM()
	if vm == nil {
		return nil, errNotStarted
	}
	if err := vm.Pause(); err != nil {
		return nil, err
	}
	s.paused.Store(true)
	return s.state(), nil
}

func (s *service) Resume(ctx context.Context, _ *api.ResumeRequest) (*api.StateResponse, error) {
	vm := s.getVM()
	if vm == nil {
		return nil, errNotStarted
	}
	if err := vm.Resume(); err != nil {
		return nil, err
	}
	s.paused.Store(false)
	return s.state(), nil
}

// Claim runs a warm clone for the container whose spec is now in its
// directory; the machine must be the one the clone was started with.
func (s *service) Claim(ctx context.Context, _ *api.ClaimRequest) (*api.StateResponse, error) {
	s.startMu.Lock()
	defer s.startMu.Unlock()
	vm := s.getVM()
	if vm == nil {
		return nil, errNotStarted
	}
	spec, err := ReadSpec(s.vmDir())
	if err != nil {
		return nil, err
	}
	if err := vm.Claim(spec); err != nil {
		return nil, fmt.Errorf("claim the warm clone: %w", err)
	}
	s.vmMu.Lock()
	s.spec = spec
	s.vmMu.Unlock()
	return s.state(), nil
}

func (s *service) state() *api.StateResponse {
	vm := s.getVM()
	if vm == nil {
		return &api.StateResponse{Starting: s.starting.Load()}
	}
	suspended, since := vm.Suspended()
	r := &api.StateResponse{Pid: int32(vm.Pid()), StartedAt: vm.StartedAt().UnixNano(), Running: true,
		Paused: s.paused.Load(), Restored: s.vmSpec().Restore != nil, Suspended: suspended, Wakes: int64(vm.Wakes())}
	if suspended {
		r.SuspendedSince = since.UnixNano()
	}
	if t := vm.FirstOutput(); !t.IsZero() {
		r.FirstOutputAt = t.UnixNano()
	}
	select {
	case <-s.exited:
		st := vm.Exit()
		r.Running = false
		r.FinishedAt, r.ExitCode, r.Reason, r.Message = st.FinishedAt.UnixNano(), st.Code, st.Reason, st.Message
	default:
	}
	return r
}

func (s *service) State(ctx context.Context, _ *api.StateRequest) (*api.StateResponse, error) {
	return s.state(), nil
}

func (s *service) Kill(ctx context.Context, r *api.KillRequest) (*api.StateResponse, error) {
	if s.getVM() == nil {
		return nil, errNotStarted
	}
	if sig := r.GetSignal(); sig != 0 {
		if sig < 1 || sig > 64 {
			return nil, fmt.Errorf("invalid signal %d", sig)
		}
		if err := s.getVM().Signal(syscall.Signal(sig)); err != nil {
			return nil, err
		}
		select {
		case <-s.exited:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		return s.state(), nil
	}
	s.getVM().Stop(time.Duration(r.GetTimeoutMs()) * time.Millisecond)
	select {
	case <-s.exited:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return s.state(), nil
}

func (s *service) Wait(ctx context.Context, _ *api.WaitRequest) (*api.StateResponse, error) {
	if s.getVM() == nil {
		return nil, errNotStarted
	}
	select {
	case <-s.exited:
		return s.state(), nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (s *service) ReopenLog(ctx context.Context, _ *api.ReopenLogRequest) (*api.ReopenLogResponse, error) {
	if s.getVM() == nil {
		return nil, errNotStarted
	}
	return &api.ReopenLogResponse{}, s.getVM().ReopenLog()
}

func (s *service) Stats(ctx context.Context, _ *api.StatsRequest) (*api.StatsResponse, error) {
	if s.getVM() == nil {
		return nil, errNotStarted
	}
	st, err := s.getVM().Stats()
	if err != nil {
		return nil, err
	}
	return &api.StatsResponse{Timestamp: st.Timestamp.UnixNano(), CpuNanos: st.CPUNanos, RssBytes: st.RSSBytes}, nil
}

func (s *service) Shutdown(ctx context.Context, _ *api.ShutdownRequest) (*api.ShutdownResponse, error) {
	if s.getVM() != nil {
		select {
		case <-s.exited:
		default:
			return nil, errors.New("the VM is still running; kill it first")
		}
	}
	s.endSoon()
	return &api.ShutdownResponse{}, nil
}

// Attach serves one console session over a ttrpc stream: client messages
// are input for the serial line, console output goes back as messages. A
// Ctrl-] in the input ends the session (vmm.VM.Attach handles it).
func (s *service) Attach(ctx context.Context, stream api.Shim_AttachServer) error {
	vm := s.getVM()
	if vm == nil {
		return errNotStarted
	}
	pr, pw := io.Pipe()
	defer pr.Close()
	go func() {
		for {
			m, err := stream.Recv()
			if err != nil {
				pw.CloseWithError(err)
				return
			}
			if _, err := pw.Write(m.GetData()); err != nil {
				return
			}
		}
	}()
	out := writerFunc(func(p []byte) (int, error) {
		if err := stream.Send(&api.ConsoleData{Data: append([]byte(nil), p...)}); err != nil {
			return 0, err
		}
		return len(p), nil
	})
	return vm.Attach(ctx, pr, out)
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }
