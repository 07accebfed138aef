package runtime

import (
	"bytes"
	"context"
	"errors"
	"io"
	"sync"
)

// DetachByte (Ctrl-]) ends an attach session; the VM keeps running.
const DetachByte = 0x1d

// ErrNotRunning is returned when attaching to a VM that has exited.
var ErrNotRunning = errors.New("the VM is not running")

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
type teeWriter struct {
	log io.Writer
	hub *consoleHub
}

func (t teeWriter) Write(p []byte) (int, error) {
	n, err := t.log.Write(p)
	t.hub.publish(p)
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
	v.inMu.Lock()
	defer v.inMu.Unlock()
	if v.stdin == nil {
		return 0, ErrNotRunning
	}
	return v.stdin.Write(p)
}
