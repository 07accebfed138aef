package shim

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/unilet-dev/unilet/vmm"
	"github.com/unilet-dev/unilet/vmm/shim/api"
)

// Handle is the daemon's view of a VM run by a shim. Every call takes a
// context: the caller gives each one a deadline, so a stuck shim fails its
// own calls with DeadlineExceeded and holds up nothing else.
type Handle struct {
	pid       int
	startedAt time.Time
	dir       string
	done      chan struct{}
	mu        sync.Mutex
	c         *Client
	exit      vmm.ExitStatus
	closed    bool
}

// startPollInterval is how often NewHandle asks a shim whose Start is in
// flight whether the VM runs yet.
const startPollInterval = 50 * time.Millisecond

// NewHandle wraps a connected client and starts watching for the VM's end.
// A Start in flight (the daemon died during StartContainer) is waited for
// until ctx ends.
func NewHandle(ctx context.Context, c *Client) (*Handle, error) {
	st, err := c.State(ctx, &api.StateRequest{})
	for err == nil && st.Pid == 0 && st.Starting {
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("the shim in %s is still starting its VM: %w", c.Dir, ctx.Err())
		case <-time.After(startPollInterval):
		}
		st, err = c.State(ctx, &api.StateRequest{})
	}
	if err != nil {
		return nil, err
	}
	if st.Pid == 0 {
		return nil, fmt.Errorf("the shim in %s never started its VM: %w", c.Dir, ErrNeverStarted)
	}
	h := &Handle{c: c, dir: c.Dir, pid: int(st.Pid), startedAt: time.Unix(0, st.StartedAt), done: make(chan struct{})}
	go h.watch()
	return h, nil
}

// ErrNeverStarted marks a shim that is alive but never booted its VM.
var ErrNeverStarted = errors.New("VM never started")

func toExit(st *api.StateResponse) vmm.ExitStatus {
	return vmm.ExitStatus{Code: st.ExitCode, Reason: st.Reason, Message: st.Message, FinishedAt: time.Unix(0, st.FinishedAt)}
}

// Reconnection attempts after the Wait stream broke (a shim that closed
// its connection but lives on).
const maxReconnects = 3

// watch waits for the VM's end (a long poll without deadline: it holds no
// lock). If the shim itself dies, the exit recorded on disk is used, else
// the VM is reported failed with a reason.
func (h *Handle) watch() {
	var ex vmm.ExitStatus
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
		if attempt < maxReconnects {
			if c, cerr := Connect(h.dir); cerr == nil {
				h.mu.Lock()
				old := h.c
				h.c = c
				closedNow := h.closed
				h.mu.Unlock()
				_ = old.Close()
				if closedNow {
					_ = c.Close()
					return
				}
				continue
			}
		}
		if rec, ok := ReadExit(h.dir); ok {
			ex = rec
		} else {
			ex = vmm.ExitStatus{Code: 255, Reason: "ShimDied", FinishedAt: time.Now(),
				Message: "the VM's supervisor (unilet-shim) died: " + err.Error()}
			// QEMU dies with its shim (parent-death signal); make sure.
			KillQEMU(h.pid, h.dir)
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
func (h *Handle) Exit() vmm.ExitStatus {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.exit
}

// Pid is QEMU's pid.
func (h *Handle) Pid() int { return h.pid }

// StartedAt is when QEMU started.
func (h *Handle) StartedAt() time.Time {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.startedAt
}

// Stop powers the guest down, killing it after timeout, and returns its
// exit. ctx bounds the whole call (give it more than timeout).
func (h *Handle) Stop(ctx context.Context, timeout time.Duration) (vmm.ExitStatus, error) {
	select {
	case <-h.done:
		return h.Exit(), nil
	default:
	}
	if _, err := h.client().Kill(ctx, &api.KillRequest{TimeoutMs: timeout.Milliseconds()}); err != nil {
		select {
		case <-h.done: // the VM ended meanwhile (the shim may have gone with it)
			return h.Exit(), nil
		default:
		}
		return vmm.ExitStatus{}, fmt.Errorf("stop the VM: %w", err)
	}
	select {
	case <-h.done:
		return h.Exit(), nil
	case <-ctx.Done():
		return vmm.ExitStatus{}, fmt.Errorf("stop the VM: %w", ctx.Err())
	}
}

// ShimPid is the shim's process ID.
func (h *Handle) ShimPid() int { return h.client().ShimPid() }

// KillShim ends a shim that does not answer (SIGKILL to the process
// pinned when it was connected); its QEMU dies with it, and the handle
// reports the VM as ended once it notices.
func (h *Handle) KillShim() error { return h.client().KillShim() }

// ReopenLog asks the shim to reopen the CRI log.
func (h *Handle) ReopenLog(ctx context.Context) error {
	_, err := h.client().ReopenLog(ctx, &api.ReopenLogRequest{})
	return err
}

// Stats reports QEMU's usage.
func (h *Handle) Stats(ctx context.Context) (vmm.Stats, error) {
	s, err := h.client().Stats(ctx, &api.StatsRequest{})
	if err != nil {
		return vmm.Stats{}, err
	}
	return vmm.Stats{Timestamp: time.Unix(0, s.Timestamp), CPUNanos: s.CpuNanos, RSSBytes: s.RssBytes}, nil
}

// Attach runs one console session over the shim's ttrpc Attach stream
// until ctx ends, the client detaches or the VM ends.
func (h *Handle) Attach(ctx context.Context, in io.Reader, out io.Writer) error {
	select {
	case <-h.done:
		return vmm.ErrNotRunning
	default:
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := h.client().Attach(ctx)
	if err != nil {
		return vmm.ErrNotRunning
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

// Release ends the shim of an exited VM, waits for its process to be
// gone (so nothing of the VM is left when it returns) and closes the
// connection.
func (h *Handle) Release(ctx context.Context) error {
	c := h.client()
	_, err := c.Shutdown(ctx, &api.ShutdownRequest{})
	if err == nil {
		err = c.WaitExit(ctx)
	}
	_ = h.Close()
	return err
}

// Close drops the connection; the shim and VM go on.
func (h *Handle) Close() error {
	h.mu.Lock()
	h.closed = true
	c := h.c
	h.mu.Unlock()
	return c.Close()
}

// Snapshot writes a template VM's device state and RAM to dir (see the
// shim API); the VM stays paused.
func (h *Handle) Snapshot(ctx context.Context, dir string) (stateBytes, ramBytes int64, err error) {
	r, err := h.client().Snapshot(ctx, &api.SnapshotRequest{Dir: dir})
	if err != nil {
		return 0, 0, err
	}
	return r.StateBytes, r.RamBytes, nil
}

// Pause stops the guest's vCPUs; Resume runs them again.
func (h *Handle) Pause(ctx context.Context) error {
	_, err := h.client().Pause(ctx, &api.PauseRequest{})
	return err
}

// Resume runs a paused guest's vCPUs again.
func (h *Handle) Resume(ctx context.Context) error {
	_, err := h.client().Resume(ctx, &api.ResumeRequest{})
	return err
}

// Claim gives a warm clone to the container whose VM spec is spec: the
// spec is written to the VM directory, then the shim runs the guest.
func (h *Handle) Claim(ctx context.Context, spec vmm.VMSpec) error {
	if err := writeSpec(h.dir, spec); err != nil {
		return err
	}
	st, err := h.client().Claim(ctx, &api.ClaimRequest{})
	if err != nil {
		return err
	}
	h.mu.Lock()
	h.startedAt = time.Unix(0, st.StartedAt)
	h.mu.Unlock()
	return nil
}

// FirstOutput reports when the VM's console gave its first bytes (zero:
// not yet).
func (h *Handle) FirstOutput(ctx context.Context) (time.Time, error) {
	st, err := h.client().State(ctx, &api.StateRequest{})
	if err != nil || st.FirstOutputAt == 0 {
		return time.Time{}, err
	}
	return time.Unix(0, st.FirstOutputAt), nil
}

// Idle reports the VM's scale-to-zero state.
func (h *Handle) Idle(ctx context.Context) (bool, time.Time, int, error) {
	st, err := h.client().State(ctx, &api.StateRequest{})
	if err != nil {
		return false, time.Time{}, 0, err
	}
	var since time.Time
	if st.Suspended {
		since = time.Unix(0, st.SuspendedSince)
	}
	return st.Suspended, since, int(st.Wakes), nil
}
