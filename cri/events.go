package cri

import (
	"context"
	"errors"
	"io"

	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// serveContainerEvents is GetContainerEvents (kubelet's evented PLEG): the
// unikernel side's container events merged with the upstream's stream. An
// upstream without events (Unimplemented) leaves the VM events; any other
// end of the upstream stream ends this one, so the client subscribes anew.
func (r *Router) serveContainerEvents(_ any, ss grpc.ServerStream) error {
	req := &runtimeapi.GetEventsRequest{}
	if err := ss.RecvMsg(req); err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ss.Context())
	defer cancel()
	vmEvents := r.vm.Events(ctx)
	// One channel for the upstream's events and its end, in order.
	type upMsg struct {
		ev  *runtimeapi.ContainerEventResponse
		err error
	}
	up := make(chan upMsg, 64)
	if r.upRT != nil {
		go func() {
			st, err := r.upRT.GetContainerEvents(ctx, req)
			for err == nil {
				var ev *runtimeapi.ContainerEventResponse
				if ev, err = st.Recv(); err == nil {
					select {
					case up <- upMsg{ev: ev}:
					case <-ctx.Done():
						return
					}
				}
			}
			up <- upMsg{err: err}
		}()
	}
	for {
		var ev *runtimeapi.ContainerEventResponse
		select {
		case ev = <-vmEvents:
		case m := <-up:
			switch {
			case m.err == nil:
				ev = m.ev
			case ctx.Err() != nil:
				return nil
			case status.Code(m.err) == codes.Unimplemented:
				logrus.Debug("the upstream runtime has no container events; serving the unikernel side's only")
				up = nil
				continue
			case errors.Is(m.err, io.EOF):
				return nil // the upstream ended its stream: so does this one (the client subscribes anew)
			default:
				return upstreamErr(m.err)
			}
		case <-ctx.Done():
			return nil
		}
		if err := ss.SendMsg(ev); err != nil {
			return err
		}
	}
}
