package cri

import (
	"context"
	"errors"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/unilet-dev/unilet/cri/store"
	"github.com/unilet-dev/unilet/runtime/manager"
)

// ToGRPC converts an error to a gRPC status, once, at the CRI boundary:
// errors that already carry a code keep it; the sentinel errors of the
// store, the VM manager and contexts get theirs; the rest is Unknown.
func ToGRPC(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	code := codes.Unknown
	switch {
	case errors.Is(err, store.ErrNotFound), errors.Is(err, store.ErrDeleted):
		code = codes.NotFound
	case errors.Is(err, store.ErrAmbiguous):
		code = codes.InvalidArgument
	case errors.Is(err, store.ErrAlreadyExists):
		code = codes.AlreadyExists
	case errors.Is(err, store.ErrInvalidTransition):
		code = codes.FailedPrecondition
	case errors.Is(err, manager.ErrUntrusted):
		code = codes.Internal
	case errors.Is(err, context.DeadlineExceeded):
		code = codes.DeadlineExceeded
	case errors.Is(err, context.Canceled):
		code = codes.Canceled
	}
	return status.Error(code, err.Error())
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
