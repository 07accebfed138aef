// Package errdefs owns the kinds of error unilet's CRI and operator API
// return, and the one table that maps each kind to its gRPC status code.
// The translation (cri/unikernel) returns errors of a kind with a message an
// operator can act on; the gRPC boundary (cri.UnaryErrors, cri.StreamErrors)
// turns them into statuses, for unary and streaming calls alike.
package errdefs

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// The kinds of error, one per gRPC code unilet answers with.
var (
	ErrInvalidArgument    = errors.New("invalid argument")
	ErrNotFound           = errors.New("not found")
	ErrAlreadyExists      = errors.New("already exists")
	ErrFailedPrecondition = errors.New("failed precondition")
	ErrResourceExhausted  = errors.New("resource exhausted")
	ErrUnimplemented      = errors.New("not implemented")
	ErrDeadlineExceeded   = errors.New("deadline exceeded")
	ErrCanceled           = errors.New("canceled")
	ErrDataLoss           = errors.New("data loss")
	ErrPermissionDenied   = errors.New("permission denied")
	ErrUnavailable        = errors.New("unavailable")
	ErrInternal           = errors.New("internal error")
	ErrUnknown            = errors.New("unknown error")
)

// table maps kinds to codes: the one place codes are chosen.
var table = []struct {
	kind error
	code codes.Code
}{
	{ErrInvalidArgument, codes.InvalidArgument},
	{ErrNotFound, codes.NotFound},
	{ErrAlreadyExists, codes.AlreadyExists},
	{ErrFailedPrecondition, codes.FailedPrecondition},
	{ErrResourceExhausted, codes.ResourceExhausted},
	{ErrUnimplemented, codes.Unimplemented},
	{ErrDeadlineExceeded, codes.DeadlineExceeded},
	{ErrCanceled, codes.Canceled},
	{ErrDataLoss, codes.DataLoss},
	{ErrPermissionDenied, codes.PermissionDenied},
	{ErrUnavailable, codes.Unavailable},
	{ErrInternal, codes.Internal},
	{ErrUnknown, codes.Unknown},
	// The context's own errors, wherever they come from.
	{context.DeadlineExceeded, codes.DeadlineExceeded},
	{context.Canceled, codes.Canceled},
}

// Errorf is an error of kind whose message is the formatted text alone
// (the kind is not repeated in it); errors.Is(err, kind) holds.
func Errorf(kind error, format string, a ...any) error {
	return &kindError{kind: kind, msg: fmt.Sprintf(format, a...)}
}

type kindError struct {
	kind error
	msg  string
}

func (e *kindError) Error() string { return e.msg }
func (e *kindError) Unwrap() error { return e.kind }

// GRPCStatus lets gRPC (and status.Code) see the kind's code wherever the
// error travels.
func (e *kindError) GRPCStatus() *status.Status { return status.New(Code(e), e.msg) }

// Code is the gRPC code of err: a status error's own code, else its kind's
// (codes.Unknown when it has none).
func Code(err error) codes.Code {
	if err == nil {
		return codes.OK
	}
	for _, t := range table {
		if errors.Is(err, t.kind) {
			return t.code
		}
	}
	var se interface{ GRPCStatus() *status.Status }
	if errors.As(err, &se) {
		if _, own := se.(*kindError); !own {
			return se.GRPCStatus().Code()
		}
	}
	return codes.Unknown
}
