package cri

import (
	"context"
	"errors"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"

	"github.com/unilet-dev/unilet/cri/errdefs"
	"github.com/unilet-dev/unilet/cri/store"
	"github.com/unilet-dev/unilet/vmm/manager"
)

// ToGRPC converts an error to a gRPC status, once, at the CRI boundary:
// errors that already carry a code keep it (errdefs kinds, upstream
// statuses); the sentinel errors of the store and the VM manager get
// theirs here; the rest is Unknown. errdefs holds the kind→code table.
func ToGRPC(err error) error {
	if err == nil {
		return nil
	}
	kind := errdefs.ErrUnknown
	switch {
	case errors.Is(err, store.ErrNotFound), errors.Is(err, store.ErrDeleted):
		kind = errdefs.ErrNotFound
	case errors.Is(err, store.ErrAmbiguous):
		kind = errdefs.ErrInvalidArgument
	case errors.Is(err, store.ErrAlreadyExists):
		kind = errdefs.ErrAlreadyExists
	case errors.Is(err, store.ErrInvalidTransition):
		kind = errdefs.ErrFailedPrecondition
	case errors.Is(err, manager.ErrUntrusted):
		kind = errdefs.ErrInternal
	default:
		return status.Error(errdefs.Code(err), err.Error())
	}
	return status.Error(errdefs.Code(kind), err.Error())
}

// StreamErrors is UnaryErrors for streaming calls.
func StreamErrors(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	return ToGRPC(h(srv, ss))
}

// UnaryErrors is the gRPC interceptor that applies ToGRPC to every answer.
func UnaryErrors(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	resp, err := h(ctx, req)
	return resp, ToGRPC(err)
}
