package unikernel

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/unilet-dev/unilet/api/admin"
	"github.com/unilet-dev/unilet/cri/errdefs"
)

// logFollowPoll is how often a followed log is checked for new lines and
// for rotation by kubelet.
const logFollowPoll = 100 * time.Millisecond

// logChunk bounds one LogChunk message.
const logChunk = 64 << 10

// Logs streams a container's CRI log file (or its previous attempt's);
// with follow it goes on until the VM ends and the file is read, or the
// client goes.
func (s *Service) Logs(r *admin.LogsRequest, stream admin.Admin_LogsServer) error {
	c, err := s.resolveContainer(r.GetContainer())
	if err != nil {
		return err
	}
	if r.GetPrevious() {
		if c, err = s.previousAttempt(c); err != nil {
			return err
		}
	}
	if r.GetRedact() && r.GetFollow() {
		return errorf(errdefs.ErrInvalidArgument, "a followed log cannot be redacted")
	}
	path := c.Meta().LogPath
	if path == "" {
		return errorf(errdefs.ErrFailedPrecondition, "container %s has no log file (its pod names no log directory)", c.ID())
	}
	f, err := openLog(path)
	if err != nil {
		return errorf(errdefs.ErrNotFound, "the log of container %s: %v", c.ID(), err)
	}
	defer func() { f.Close() }()
	send := func(p []byte) error {
		for len(p) > 0 {
			n := min(len(p), logChunk)
			if err := stream.Send(&admin.LogChunk{Data: p[:n]}); err != nil {
				return err
			}
			p = p[n:]
		}
		return nil
	}
	if n := r.GetTailLines(); n > 0 || r.GetRedact() {
		b, err := io.ReadAll(f)
		if err != nil {
			return err
		}
		if n > 0 {
			b = lastLines(b, int(n))
		}
		if r.GetRedact() {
			for _, sec := range envValues(c) {
				b = bytes.ReplaceAll(b, []byte(sec), []byte(redacted))
			}
		}
		if err := send(b); err != nil {
			return err
		}
	} else if _, err := io.Copy(writerFunc(send), f); err != nil {
		return err
	}
	if !r.GetFollow() || r.GetPrevious() {
		return nil
	}
	ctx := stream.Context()
	for {
		ended := !c.Status().State.Live() || c.Deleted()
		if _, err := io.Copy(writerFunc(send), f); err != nil {
			return err
		}
		// kubelet rotated the file: finish the old one, go on with the new.
		if rotated(f, path) {
			if nf, err := openLog(path); err == nil {
				if _, err := io.Copy(writerFunc(send), f); err != nil {
					nf.Close()
					return err
				}
				f.Close()
				f = nf
				continue
			}
		}
		if ended {
			return nil
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(logFollowPoll):
		}
	}
}

// previousAttempt is the container of the same pod and name that ran
// before c (the highest attempt below c's).
func (s *Service) previousAttempt(c *container) (*container, error) {
	md := c.Meta().Config.GetMetadata()
	var prev *container
	for _, cand := range s.containersOf(c.Meta().SandboxID) {
		cm := cand.Meta().Config.GetMetadata()
		if cm.GetName() == md.GetName() && cm.GetAttempt() < md.GetAttempt() &&
			(prev == nil || cm.GetAttempt() > prev.Meta().Config.GetMetadata().GetAttempt()) {
			prev = cand
		}
	}
	if prev == nil {
		return nil, errorf(errdefs.ErrNotFound, "container %q of this pod has no previous attempt kept on this node", md.GetName())
	}
	return prev, nil
}

// openLog opens a CRI log file for reading, never through a symlink.
func openLog(path string) (*os.File, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	f := os.NewFile(uintptr(fd), path)
	if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() {
		f.Close()
		return nil, &os.PathError{Op: "open", Path: path, Err: errors.New("not a regular file")}
	}
	return f, nil
}

// rotated reports whether path now names another file than f.
func rotated(f *os.File, path string) bool {
	a, err1 := f.Stat()
	b, err2 := os.Lstat(path)
	if err1 != nil || err2 != nil {
		return false
	}
	sa, ok1 := a.Sys().(*syscall.Stat_t)
	sb, ok2 := b.Sys().(*syscall.Stat_t)
	return ok1 && ok2 && (sa.Ino != sb.Ino || sa.Dev != sb.Dev)
}

// lastLines returns the last n lines of b.
func lastLines(b []byte, n int) []byte {
	end := len(b)
	if end > 0 && b[end-1] == '\n' {
		end--
	}
	for i := end - 1; i >= 0; i-- {
		if b[i] == '\n' {
			if n--; n == 0 {
				return b[i+1:]
			}
		}
	}
	return b
}

type writerFunc func(p []byte) error

func (w writerFunc) Write(p []byte) (int, error) {
	if err := w(bytes.Clone(p)); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Console attaches the client to a running VM's serial console: the first
// message names the container; input goes to the guest; a Ctrl-] in it
// detaches (the VM runs on).
func (s *Service) Console(stream admin.Admin_ConsoleServer) error {
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	c, err := s.resolveContainer(first.GetContainer())
	if err != nil {
		return err
	}
	v, err := s.runningVM(c.ID())
	if err != nil {
		return err
	}
	pr, pw := io.Pipe()
	go func() {
		for m := first; ; {
			if _, err := pw.Write(m.GetData()); err != nil {
				return
			}
			var rerr error
			if m, rerr = stream.Recv(); rerr != nil {
				pw.CloseWithError(io.EOF)
				return
			}
		}
	}()
	ctx, cancel := context.WithCancel(stream.Context())
	defer cancel()
	err = v.Attach(ctx, pr, writerFunc(func(p []byte) error { return stream.Send(&admin.ConsoleOutput{Data: p}) }))
	pr.Close()
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}
