package cri

import (
	"context"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/cri/unikernel"
)

// The routing shapes every CRI method of the Router takes: a call that
// names one object goes to the side owning it (routed, either), a list
// asks both sides and merges (merged). The sides are named by method
// expressions: (*unikernel.Service).X and runtimeapi.RuntimeServiceClient.X (or
// ImageServiceClient.X), so a missing upstream client is never called.

type (
	vmCall[Req, Resp any]    func(*unikernel.Service, context.Context, Req) (Resp, error)
	upCall[C, Req, Resp any] func(C, context.Context, Req, ...grpc.CallOption) (Resp, error)
)

// either sends req to the unikernel side when toVM, else to the upstream client up.
func either[C, Req, Resp any](ctx context.Context, r *Router, toVM bool, req Req, v vmCall[Req, Resp], up C, u upCall[C, Req, Resp]) (Resp, error) {
	if toVM {
		return v(r.vm, ctx, req)
	}
	resp, err := u(up, ctx, req)
	return resp, upstreamErr(err)
}

// routed sends a call naming the object id to the side owning it (side:
// sandboxSide or containerSide). gone, when set, answers an ID the upstream
// does not know (CRI's stop and remove are idempotent).
func routed[Req, Resp any](ctx context.Context, r *Router, side func(context.Context, string) (bool, error), id string, req Req,
	v vmCall[Req, Resp], u upCall[runtimeapi.RuntimeServiceClient, Req, Resp], gone func() Resp) (Resp, error) {
	toVM, err := side(ctx, id)
	if err != nil {
		var zero Resp
		return zero, err
	}
	resp, err := either(ctx, r, toVM, req, v, r.upRT, u)
	if gone != nil && !toVM && status.Code(err) == codes.NotFound {
		return gone(), nil
	}
	return resp, err
}

// merged asks the unikernel side, then (unless vmOnly, or there is no upstream)
// the upstream, and joins its answer into the unikernel side's. A failing
// upstream degrades the answer to the unikernel side's, logged as op.
func merged[C, Req, Resp any](ctx context.Context, r *Router, op string, req Req, v vmCall[Req, Resp],
	up C, hasUp bool, u upCall[C, Req, Resp], vmOnly bool, join func(into, from Resp) Resp) (Resp, error) {
	resp, err := v(r.vm, ctx, req)
	if err != nil || !hasUp || vmOnly {
		return resp, err
	}
	from, err := u(up, ctx, req)
	if err != nil {
		r.logUpstreamDown(op, err)
		return resp, nil
	}
	return join(resp, from), nil
}

// mergedRT is merged for the runtime service.
func mergedRT[Req, Resp any](ctx context.Context, r *Router, op string, req Req, v vmCall[Req, Resp],
	u upCall[runtimeapi.RuntimeServiceClient, Req, Resp], vmOnly bool, join func(into, from Resp) Resp) (Resp, error) {
	return merged(ctx, r, op, req, v, r.upRT, r.upRT != nil, u, vmOnly, join)
}

// empty is a new empty response (routed's gone).
func empty[T any]() *T { return new(T) }
