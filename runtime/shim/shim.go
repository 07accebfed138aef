// Package shim is the per-VM supervisor process (cmd/unilet-shim) and its
// client. The shim runs detached from the daemon (own session), owns QEMU,
// the serial console and the CRI log through runtime.VM, records the exit in
// exit.json, and serves the ttrpc API of package shim/api on shim.sock in the
// VM's directory, so a VM can outlive the daemon that started it.
package shim

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/ttrpc"

	"github.com/unilet-dev/unilet/runtime"
	"github.com/unilet-dev/unilet/runtime/shim/api"
)

// Files in a VM directory.
const (
	SpecFile   = "spec.json"
	SocketFile = "shim.sock"
	// ConsoleFile is a unix socket: each connection is one attach session
	// (console output out, input in; Ctrl-] ends the session).
	ConsoleFile = "console.sock"
	ExitFile    = "exit.json"
	LogFile     = "shim.log"
)

// Serve runs the shim for the VM directory dir until Shutdown (or the VM
// ended and nobody asked for a minute). It returns after QEMU is gone.
func Serve(ctx context.Context, dir string) error {
	b, err := os.ReadFile(filepath.Join(dir, SpecFile))
	if err != nil {
		return fmt.Errorf("read VM spec: %w", err)
	}
	var spec runtime.VMSpec
	if err := json.Unmarshal(b, &spec); err != nil {
		return fmt.Errorf("parse VM spec: %w", err)
	}
	sock := filepath.Join(dir, SocketFile)
	_ = os.Remove(sock)
	l, err := net.Listen("unix", sock)
	if err != nil {
		return err
	}
	defer os.Remove(sock)
	vm, err := runtime.StartVM(spec)
	if err != nil {
		st := runtime.ExitStatus{Code: 128, Reason: runtime.ReasonStartFailed, Message: err.Error(), FinishedAt: time.Now()}
		_ = writeExit(dir, st)
		l.Close()
		return err
	}
	srv, err := ttrpc.NewServer()
	if err != nil {
		vm.Kill()
		return err
	}
	csock := filepath.Join(dir, ConsoleFile)
	_ = os.Remove(csock)
	cl, err := net.Listen("unix", csock)
	if err != nil {
		vm.Kill()
		return err
	}
	defer os.Remove(csock)
	defer cl.Close()
	go serveConsole(cl, vm)
	s := &service{vm: vm, dir: dir, shutdown: make(chan struct{}), exited: make(chan struct{})}
	// Clients see the VM as ended only once its exit is on disk.
	go func() {
		<-vm.Done()
		_ = writeExit(dir, vm.Exit())
		close(s.exited)
	}()
	api.RegisterShimService(srv, s)
	go func() { _ = srv.Serve(ctx, l) }()
	select {
	case <-s.shutdown:
	case <-ctx.Done():
		vm.Kill()
	}
	<-s.exited
	// Let the Shutdown reply reach the client before the server goes.
	sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		_ = srv.Close()
	}
	return nil
}

func writeExit(dir string, st runtime.ExitStatus) error {
	b, _ := json.Marshal(st)
	tmp := filepath.Join(dir, ExitFile+".tmp")
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(dir, ExitFile))
}

// ReadExit returns the exit recorded in dir, if any.
func ReadExit(dir string) (runtime.ExitStatus, bool) {
	var st runtime.ExitStatus
	b, err := os.ReadFile(filepath.Join(dir, ExitFile))
	if err != nil || json.Unmarshal(b, &st) != nil {
		return st, false
	}
	return st, true
}

type service struct {
	vm       *runtime.VM
	dir      string
	once     sync.Once
	shutdown chan struct{}
	exited   chan struct{} // closed after the exit is recorded
}

func (s *service) state() *api.StateResponse {
	r := &api.StateResponse{Pid: int32(s.vm.Pid()), StartedAt: s.vm.StartedAt().UnixNano(), Running: true}
	select {
	case <-s.exited:
		st := s.vm.Exit()
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
	if sig := r.GetSignal(); sig != 0 {
		if sig < 1 || sig > 64 {
			return nil, fmt.Errorf("invalid signal %d", sig)
		}
		if err := s.vm.Signal(syscall.Signal(sig)); err != nil {
			return nil, err
		}
		select {
		case <-s.exited:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		return s.state(), nil
	}
	s.vm.Stop(time.Duration(r.GetTimeoutMs()) * time.Millisecond)
	select {
	case <-s.exited:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return s.state(), nil
}

func (s *service) Wait(ctx context.Context, _ *api.WaitRequest) (*api.StateResponse, error) {
	select {
	case <-s.exited:
		return s.state(), nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (s *service) ReopenLog(ctx context.Context, _ *api.ReopenLogRequest) (*api.ReopenLogResponse, error) {
	return &api.ReopenLogResponse{}, s.vm.ReopenLog()
}

func (s *service) Stats(ctx context.Context, _ *api.StatsRequest) (*api.StatsResponse, error) {
	st, err := s.vm.Stats()
	if err != nil {
		return nil, err
	}
	return &api.StatsResponse{Timestamp: st.Timestamp.UnixNano(), CpuNanos: st.CPUNanos, RssBytes: st.RSSBytes}, nil
}

func (s *service) Shutdown(ctx context.Context, _ *api.ShutdownRequest) (*api.ShutdownResponse, error) {
	select {
	case <-s.exited:
	default:
		return nil, errors.New("the VM is still running; kill it first")
	}
	// End the server only after this reply has been written: ttrpc closes idle
	// connections at once, which could swallow it.
	time.AfterFunc(100*time.Millisecond, func() { s.once.Do(func() { close(s.shutdown) }) })
	return &api.ShutdownResponse{}, nil
}

func serveConsole(l net.Listener, vm *runtime.VM) {
	for {
		conn, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			defer conn.Close()
			_ = vm.Attach(context.Background(), conn, conn)
		}()
	}
}
