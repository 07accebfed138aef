package shim

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"sync"
	"time"

	"github.com/unilet-dev/unilet/runtime"
	"github.com/unilet-dev/unilet/runtime/shim/api"
)

// Handle is the daemon's view of a VM run by a shim; it offers the same
// surface as runtime.VM so the CRI service does not care where QEMU lives.
type Handle struct {
	c         *Client
	pid       int
	startedAt time.Time
	done      chan struct{}
	mu        sync.Mutex
	exit      runtime.ExitStatus
	closed    bool
}

// NewHandle wraps a connected client and starts watching for the VM's end.
func NewHandle(c *Client) (*Handle, error) {
	st, err := c.State(context.Background(), &api.StateRequest{})
	if err != nil {
		return nil, err
	}
	// A Start may be in flight (the daemon died during StartContainer): let it finish.
	for deadline := time.Now().Add(20 * time.Second); st.Pid == 0 && st.Starting && time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
		if st, err = c.State(context.Background(), &api.StateRequest{}); err != nil {
			return nil, err
		}
	}
	if st.Pid == 0 {
		return nil, fmt.Errorf("the shim in %s never started its VM", c.Dir)
	}
	h := &Handle{c: c, pid: int(st.Pid), startedAt: time.Unix(0, st.StartedAt), done: make(chan struct{})}
	go h.watch()
	return h, nil
}

func toExit(st *api.StateResponse) runtime.ExitStatus {
	return runtime.ExitStatus{Code: st.ExitCode, Reason: st.Reason, Message: st.Message, FinishedAt: time.Unix(0, st.FinishedAt)}
}

// watch waits for the VM's end. If the shim itself dies, the exit recorded on
// disk is used, else the VM is reported failed with a reason.
func (h *Handle) watch() {
	var ex runtime.ExitStatus
	for attempt := 0; ; attempt++ {
		st, err := h.client().Wait(context.Background(), &api.WaitRequest{})
		if err == nil {
			ex = toExit(st)
			break
		}
		h.mu.Lock()
		closed := h.closed
		h.mu.Unlock()
		if closed {
			return // the daemon let go; the VM goes on
		}
		if c, cerr := Connect(h.c.Dir); cerr == nil && attempt < 3 {
			h.mu.Lock()
			h.c = c
			h.mu.Unlock()
			continue
		}
		if rec, ok := ReadExit(h.c.Dir); ok {
			ex = rec
		} else {
			ex = runtime.ExitStatus{Code: 255, Reason: "ShimDied", FinishedAt: time.Now(),
				Message: "the VM's supervisor (unilet-shim) died: " + err.Error()}
			// Never leave a VM running without its supervisor.
			KillIfQEMU(h.pid, filepath.Join(h.c.Dir, "qmp.sock"))
		}
		break
	}
	h.mu.Lock()
	h.exit = ex
	h.mu.Unlock()
	close(h.done)
}

func (h *Handle) client() *Client {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.c
}

// Done is closed when the VM has ended.
func (h *Handle) Done() <-chan struct{} { return h.done }

// Exit is the VM's exit (valid after Done).
func (h *Handle) Exit() runtime.ExitStatus {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.exit
}

// Pid is QEMU's pid.
func (h *Handle) Pid() int { return h.pid }

// StartedAt is when QEMU started.
func (h *Handle) StartedAt() time.Time { return h.startedAt }

// Stop powers the guest down, killing it after timeout.
func (h *Handle) Stop(timeout time.Duration) runtime.ExitStatus {
	_, _ = h.client().Kill(context.Background(), &api.KillRequest{TimeoutMs: timeout.Milliseconds()})
	<-h.done
	return h.Exit()
}

// Kill ends the VM at once.
func (h *Handle) Kill() { _, _ = h.client().Kill(context.Background(), &api.KillRequest{}) }

// ReopenLog asks the shim to reopen the CRI log.
func (h *Handle) ReopenLog() error {
	_, err := h.client().ReopenLog(context.Background(), &api.ReopenLogRequest{})
	return err
}

// Stats reports QEMU's usage.
func (h *Handle) Stats() (runtime.Stats, error) {
	s, err := h.client().Stats(context.Background(), &api.StatsRequest{})
	if err != nil {
		return runtime.Stats{}, err
	}
	return runtime.Stats{Timestamp: time.Unix(0, s.Timestamp), CPUNanos: s.CpuNanos, RSSBytes: s.RssBytes}, nil
}

// Attach runs one console session over the shim's ttrpc Attach stream.
func (h *Handle) Attach(ctx context.Context, in io.Reader, out io.Writer) error {
	select {
	case <-h.done:
		return runtime.ErrNotRunning
	default:
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := h.client().Attach(ctx)
	if err != nil {
		return runtime.ErrNotRunning
	}
	if in != nil {
		go func() {
			buf := make([]byte, 4096)
			for {
				n, err := in.Read(buf)
				if n > 0 {
					if stream.Send(&api.ConsoleData{Data: append([]byte(nil), buf[:n]...)}) != nil {
						return
					}
				}
				if err != nil {
					return
				}
			}
		}()
	}
	if out == nil {
		out = io.Discard
	}
	for {
		m, err := stream.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) || ctx.Err() != nil {
				return nil
			}
			select {
			case <-h.done:
				return nil
			default:
			}
			return err
		}
		if _, err := out.Write(m.GetData()); err != nil {
			return err
		}
	}
}

// Release ends the shim of an exited VM and closes the connection.
func (h *Handle) Release() {
	_, _ = h.client().Shutdown(context.Background(), &api.ShutdownRequest{})
	_ = h.Close()
}

// Close drops the connection; the shim and VM go on.
func (h *Handle) Close() error {
	h.mu.Lock()
	h.closed = true
	h.mu.Unlock()
	return h.client().Close()
}
