package vmm

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/unilet-dev/unilet/pkg/crilog"
)

// DetachByte (Ctrl-]) ends an attach session; the VM keeps running.
const DetachByte = 0x1d

// ErrNotRunning is returned when attaching to a VM that has exited.
var ErrNotRunning = errors.New("the VM is not running")

// Console reading. QEMU's emulated UART writes every guest byte with its own
// write(2). A reader that sleeps in epoll (Go's poller) is woken for each of
// them — a pipe registered with epoll wakes its waiters on every write — and
// both QEMU and the shim pay for it. So the console pipe stays blocking and
// out of the poller: a write into a pipe that already holds data wakes no
// one, and after a short read the reader waits consoleGather before reading
// again, letting a flood collect into large reads. A lone line reaches the log
// at most consoleGather later; a flood costs a read per consoleGather instead
// of a wake-up per byte.
const (
	consoleGather = 500 * time.Microsecond
	consoleBuf    = 64 << 10
)

// consolePipe returns a blocking pipe (close-on-exec), not registered with
// Go's poller, for QEMU's stdout.
func consolePipe() (r, w *os.File, err error) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		return nil, nil, err
	}
	return os.NewFile(uintptr(p[0]), "console-r"), os.NewFile(uintptr(p[1]), "console-w"), nil
}

// copyConsole copies the console pipe to dst until QEMU closes it (see above).
// It blocks its OS thread in read(2) and nanosleep(2), which is why it runs on
// a goroutine of its own.
func copyConsole(dst io.Writer, r *os.File) {
	buf := make([]byte, consoleBuf)
	failing := false
	for {
		n, err := r.Read(buf)
		if n > 0 {
			// A failed log write (a full disk) drops lines; the log says
			// so itself once writing works again (pkg/crilog), and the
			// shim's log says when it started and stopped.
			if _, werr := dst.Write(buf[:n]); werr != nil && !failing {
				failing = true
				logrus.WithError(werr).Warn("writing the VM console to its CRI log failed; console lines are dropped until it works again")
			} else if werr == nil && failing {
				failing = false
				logrus.Warn("writing the VM console to its CRI log works again; the log notes how many lines were dropped")
			}
		}
		if err != nil {
			return
		}
		if n < consoleBuf/2 {
			ts := unix.NsecToTimespec(int64(consoleGather))
			_ = unix.Nanosleep(&ts, nil)
		}
	}
}

// consoleHub fans console output out to attach sessions. The CRI log is
// written before any session sees a chunk and never waits for a session: a
// session that cannot keep up loses output, the log does not.
type consoleHub struct {
	mu     sync.Mutex
	subs   map[chan []byte]struct{}
	closed bool
}

func (h *consoleHub) publish(p []byte) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for ch := range h.subs {
		b := append([]byte(nil), p...)
		select {
		case ch <- b:
		default: // slow client: drop for it only
		}
	}
}

func (h *consoleHub) subscribe() (chan []byte, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return nil, false
	}
	if h.subs == nil {
		h.subs = map[chan []byte]struct{}{}
	}
	ch := make(chan []byte, 256)
	h.subs[ch] = struct{}{}
	return ch, true
}

func (h *consoleHub) unsubscribe(ch chan []byte) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if _, ok := h.subs[ch]; ok {
		delete(h.subs, ch)
		close(ch)
	}
}

func (h *consoleHub) close() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.closed = true
	for ch := range h.subs {
		close(ch)
	}
	h.subs = nil
}

// teeWriter writes to the log first, then publishes to attach sessions.
// The log is nil (output only published) until a held clone is claimed.
type teeWriter struct {
	log   *atomic.Pointer[crilog.Writer]
	hub   *consoleHub
	tail  *consoleTail
	first *atomic.Int64 // unix ns of the first bytes
}

func (t teeWriter) Write(p []byte) (int, error) {
	if len(p) > 0 && t.first.Load() == 0 {
		t.first.CompareAndSwap(0, time.Now().UnixNano())
	}
	n, err := len(p), error(nil)
	if l := t.log.Load(); l != nil {
		n, err = l.Write(p)
	}
	t.hub.publish(p)
	t.tail.Write(p)
	return n, err
}

// Attach connects one client to the serial console: console output goes to
// out, bytes from in go to the guest. A Ctrl-] (0x1d) in the input ends this
// session only. It returns when the client detaches, in ends, ctx is done or
// the VM exits.
func (v *VM) Attach(ctx context.Context, in io.Reader, out io.Writer) error {
	ch, ok := v.hub.subscribe()
	if !ok {
		return ErrNotRunning
	}
	defer v.hub.unsubscribe(ch)
	detached := make(chan struct{})
	if in != nil {
		go func() {
			defer close(detached)
			buf := make([]byte, 4096)
			for {
				n, err := in.Read(buf)
				if n > 0 {
					p := buf[:n]
					i := bytes.IndexByte(p, DetachByte)
					if i >= 0 {
						p = p[:i]
					}
					if len(p) > 0 {
						if _, werr := v.writeConsole(p); werr != nil {
							return
						}
					}
					if i >= 0 {
						return
					}
				}
				if err != nil {
					// End of input: keep watching the console until ctx or the VM ends.
					<-ctx.Done()
					return
				}
			}
		}()
	}
	for {
		select {
		case b, ok := <-ch:
			if !ok {
				return nil // VM exited
			}
			if out != nil {
				if _, err := out.Write(b); err != nil {
					return err
				}
			}
		case <-detached:
			return nil
		case <-ctx.Done():
			return nil
		}
	}
}

func (v *VM) writeConsole(p []byte) (int, error) {
	v.pokeIdle() // input wakes a suspended VM (and is activity)
	v.inMu.Lock()
	defer v.inMu.Unlock()
	if v.stdin == nil {
		return 0, ErrNotRunning
	}
	return v.stdin.Write(p)
}
