package unikernel

import (
	"context"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	"k8s.io/cri-streaming/pkg/streaming"
	remotecommandserver "k8s.io/cri-streaming/pkg/streaming/remotecommand"

	"github.com/unilet-dev/unilet/cri/errdefs"
	"github.com/unilet-dev/unilet/pkg/netns"
)

// SetStreamServer installs the CRI streaming server that serves attach and
// port-forward URLs; wrap (if not nil) exchanges each URL it makes for the
// one handed out on behalf of a pod (pkg/streamtoken).
func (s *Service) SetStreamServer(srv streaming.Server, wrap func(pod, url string) (string, error)) {
	s.stream, s.wrapURL = srv, wrap
}

// streamURL hands out a streaming URL the server made for pod.
func (s *Service) streamURL(pod, u string) (string, error) {
	if s.wrapURL == nil {
		return u, nil
	}
	w, err := s.wrapURL(pod, u)
	if err != nil {
		return "", errorf(errdefs.ErrResourceExhausted, "%v", err)
	}
	return w, nil
}

// StreamRuntime adapts the service to the streaming server's Runtime.
func (s *Service) StreamRuntime() streaming.Runtime { return streamRuntime{s} }

// Attach returns a streaming URL for the VM's serial console.
func (s *Service) Attach(ctx context.Context, r *runtimeapi.AttachRequest) (*runtimeapi.AttachResponse, error) {
	c, err := s.getContainer(r.GetContainerId())
	if err != nil {
		return nil, err
	}
	if _, err := s.runningVM(c.ID()); err != nil {
		return nil, err
	}
	if s.stream == nil {
		return nil, errorf(errdefs.ErrUnavailable, "the streaming server is not running")
	}
	if !r.GetStdout() && !r.GetStderr() && !r.GetStdin() {
		return nil, errorf(errdefs.ErrInvalidArgument, "attach needs at least one of stdin, stdout or stderr")
	}
	resp, err := s.stream.GetAttach(r)
	if err != nil {
		return nil, err
	}
	if resp.Url, err = s.streamURL(c.Meta().SandboxID, resp.Url); err != nil {
		return nil, err
	}
	return resp, nil
}

type streamRuntime struct{ s *Service }

func (sr streamRuntime) Exec(ctx context.Context, id string, cmd []string, in io.Reader, out, errw io.WriteCloser, tty bool, resize <-chan remotecommandserver.TerminalSize) error {
	return fmt.Errorf(noExec, "exec")
}

// StdinOnceLinger: after the client's stdin of a stdin_once container ends,
// the session ends once the console has been quiet this long.
const StdinOnceLinger = time.Second

// Attach streams the console: output to out (stdout), input from in. A tty
// and a non-tty session see the same bytes: the serial line is the terminal.
// A guest cannot be shown the end of its stdin (a serial line has no EOF), so
// for a stdin_once container the end of the client's stdin ends the session
// instead, once the console has been quiet for StdinOnceLinger (a
// container's process would see EOF and, typically, exit); the VM runs on.
func (sr streamRuntime) Attach(ctx context.Context, id string, in io.Reader, out, errw io.WriteCloser, tty bool, resize <-chan remotecommandserver.TerminalSize) error {
	v, err := sr.s.runningVM(id)
	if err != nil {
		return err
	}
	c, err := sr.s.getContainer(id)
	if err != nil {
		return err
	}
	if resize != nil { // a serial console has no window size: drain
		go func() {
			for range resize {
			}
		}()
	}
	q := &quietWriter{w: io.Discard}
	if out != nil {
		q.w = out
	}
	q.touch()
	if in != nil && c.Meta().Config.GetStdinOnce() {
		var cancel context.CancelFunc
		ctx, cancel = context.WithCancel(ctx)
		defer cancel()
		in = &onEOF{r: in, f: func() { go q.cancelWhenQuiet(ctx, StdinOnceLinger, cancel) }}
	}
	return v.Attach(ctx, in, q)
}

// quietWriter remembers when it was last written to.
type quietWriter struct {
	w    io.Writer
	mu   sync.Mutex
	last time.Time
}

func (q *quietWriter) touch() {
	q.mu.Lock()
	q.last = time.Now()
	q.mu.Unlock()
}

func (q *quietWriter) Write(p []byte) (int, error) {
	q.touch()
	return q.w.Write(p)
}

// cancelWhenQuiet calls cancel once nothing was written for quiet.
func (q *quietWriter) cancelWhenQuiet(ctx context.Context, quiet time.Duration, cancel context.CancelFunc) {
	q.touch()
	t := time.NewTicker(quiet / 10)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			q.mu.Lock()
			idle := time.Since(q.last)
			q.mu.Unlock()
			if idle >= quiet {
				cancel()
				return
			}
		}
	}
}

// onEOF calls f once when r reports its end (or fails).
type onEOF struct {
	r    io.Reader
	f    func()
	once sync.Once
}

func (e *onEOF) Read(p []byte) (int, error) {
	n, err := e.r.Read(p)
	if err != nil {
		e.once.Do(e.f)
	}
	return n, err
}

// PortForwardDialTimeout bounds connecting a port-forward stream to the guest.
const PortForwardDialTimeout = 10 * time.Second

// PortForward connects one stream to port of the pod's guest (podTarget).
func (sr streamRuntime) PortForward(ctx context.Context, id string, port int32, stream io.ReadWriteCloser) error {
	defer stream.Close()
	to, err := sr.s.podTarget(id)
	if err != nil {
		return err
	}
	if port <= 0 || port > 65535 {
		return fmt.Errorf("invalid port %d", port)
	}
	var conn net.Conn
	dial := func() error {
		var d net.Dialer
		dctx, cancel := context.WithTimeout(ctx, PortForwardDialTimeout)
		defer cancel()
		conn, err = d.DialContext(dctx, "tcp", net.JoinHostPort(to.addr, strconv.Itoa(int(port))))
		return err
	}
	if to.netns != "" {
		err = netns.Do(to.netns, dial) // the socket stays in the pod's namespace
	} else {
		err = dial()
	}
	if err != nil {
		return fmt.Errorf("connect to port %d of the unikernel pod's guest (%s): %w", port, to.addr, err)
	}
	defer conn.Close()
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(conn, stream); closeWrite(conn); done <- struct{}{} }()
	go func() { _, _ = io.Copy(stream, conn); done <- struct{}{} }()
	select {
	case <-done:
		<-done
	case <-ctx.Done():
	}
	return nil
}

func closeWrite(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.CloseWrite()
	}
}
