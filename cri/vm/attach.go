package vm

import (
	"context"
	"fmt"
	"io"

	"google.golang.org/grpc/codes"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	"k8s.io/cri-streaming/pkg/streaming"
	remotecommandserver "k8s.io/cri-streaming/pkg/streaming/remotecommand"
)

// SetStreamServer installs the CRI streaming server that serves attach URLs.
func (s *Service) SetStreamServer(srv streaming.Server) { s.stream = srv }

// StreamRuntime adapts the service to the streaming server's Runtime.
func (s *Service) StreamRuntime() streaming.Runtime { return streamRuntime{s} }

// Attach returns a streaming URL for the VM's serial console.
func (s *Service) Attach(ctx context.Context, r *runtimeapi.AttachRequest) (*runtimeapi.AttachResponse, error) {
	if _, err := s.runningVM(r.GetContainerId()); err != nil {
		return nil, err
	}
	if s.stream == nil {
		return nil, errorf(codes.Unavailable, "the streaming server is not running")
	}
	if !r.GetStdout() && !r.GetStderr() && !r.GetStdin() {
		return nil, errorf(codes.InvalidArgument, "attach needs at least one of stdin, stdout or stderr")
	}
	return s.stream.GetAttach(r)
}

type streamRuntime struct{ s *Service }

func (sr streamRuntime) Exec(ctx context.Context, id string, cmd []string, in io.Reader, out, errw io.WriteCloser, tty bool, resize <-chan remotecommandserver.TerminalSize) error {
	return fmt.Errorf(noExec, "exec")
}

// Attach streams the console: output to out (stdout), input from in. A tty
// and a non-tty session see the same bytes: the serial line is the terminal.
func (sr streamRuntime) Attach(ctx context.Context, id string, in io.Reader, out, errw io.WriteCloser, tty bool, resize <-chan remotecommandserver.TerminalSize) error {
	v, err := sr.s.runningVM(id)
	if err != nil {
		return err
	}
	go func() {
		for range resize { // a serial console has no window size
		}
	}()
	var w io.Writer
	if out != nil {
		w = out
	}
	return v.Attach(ctx, in, w)
}

func (sr streamRuntime) PortForward(ctx context.Context, id string, port int32, stream io.ReadWriteCloser) error {
	return fmt.Errorf("port-forward to unikernel pods is not supported by this unilet version yet")
}
