package cri

import (
	"context"
	"errors"
	"io"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// The streaming list verbs (Stream*) answer with the unikernel side's objects
// first, then pass the upstream's stream through unchanged; an upstream
// without the verb (Unimplemented) or unreachable leaves the unikernel side's.

// streamList is one Stream* verb: its request type and the unikernel side's part
// of the answer (nil: none); local reports a filter that names a VM object
// by its full ID (the upstream is not asked then).
type streamList struct {
	req   func() proto.Message
	vm    func(ctx context.Context, req proto.Message) (proto.Message, error)
	local func(req proto.Message) bool
}

func (r *Router) streamLists() map[string]streamList {
	never := func(proto.Message) bool { return false }
	return map[string]streamList{
		"RuntimeService/StreamPodSandboxes": {
			req: func() proto.Message { return &runtimeapi.StreamPodSandboxesRequest{} },
			vm: func(ctx context.Context, m proto.Message) (proto.Message, error) {
				l, err := r.vm.ListPodSandbox(ctx, &runtimeapi.ListPodSandboxRequest{Filter: m.(*runtimeapi.StreamPodSandboxesRequest).GetFilter()})
				return &runtimeapi.StreamPodSandboxesResponse{PodSandboxes: l.GetItems()}, err
			},
			local: func(m proto.Message) bool {
				id := m.(*runtimeapi.StreamPodSandboxesRequest).GetFilter().GetId()
				return id != "" && r.vmExactSandbox(id)
			},
		},
		"RuntimeService/StreamContainers": {
			req: func() proto.Message { return &runtimeapi.StreamContainersRequest{} },
			vm: func(ctx context.Context, m proto.Message) (proto.Message, error) {
				l, err := r.vm.ListContainers(ctx, &runtimeapi.ListContainersRequest{Filter: m.(*runtimeapi.StreamContainersRequest).GetFilter()})
				return &runtimeapi.StreamContainersResponse{Containers: l.GetContainers()}, err
			},
			local: func(m proto.Message) bool {
				f := m.(*runtimeapi.StreamContainersRequest).GetFilter()
				return (f.GetId() != "" && r.vmExactContainer(f.GetId())) || (f.GetPodSandboxId() != "" && r.vmExactSandbox(f.GetPodSandboxId()))
			},
		},
		"RuntimeService/StreamContainerStats": {
			req: func() proto.Message { return &runtimeapi.StreamContainerStatsRequest{} },
			vm: func(ctx context.Context, m proto.Message) (proto.Message, error) {
				l, err := r.vm.ListContainerStats(ctx, &runtimeapi.ListContainerStatsRequest{Filter: m.(*runtimeapi.StreamContainerStatsRequest).GetFilter()})
				return &runtimeapi.StreamContainerStatsResponse{ContainerStats: l.GetStats()}, err
			},
			local: func(m proto.Message) bool {
				f := m.(*runtimeapi.StreamContainerStatsRequest).GetFilter()
				return (f.GetId() != "" && r.vmExactContainer(f.GetId())) || (f.GetPodSandboxId() != "" && r.vmExactSandbox(f.GetPodSandboxId()))
			},
		},
		"RuntimeService/StreamPodSandboxStats": {
			req: func() proto.Message { return &runtimeapi.StreamPodSandboxStatsRequest{} },
			vm: func(ctx context.Context, m proto.Message) (proto.Message, error) {
				l, err := r.vm.ListPodSandboxStats(ctx, &runtimeapi.ListPodSandboxStatsRequest{Filter: m.(*runtimeapi.StreamPodSandboxStatsRequest).GetFilter()})
				return &runtimeapi.StreamPodSandboxStatsResponse{PodSandboxStats: l.GetStats()}, err
			},
			local: func(m proto.Message) bool {
				id := m.(*runtimeapi.StreamPodSandboxStatsRequest).GetFilter().GetId()
				return id != "" && r.vmExactSandbox(id)
			},
		},
		"RuntimeService/StreamPodSandboxMetrics": {
			req: func() proto.Message { return &runtimeapi.StreamPodSandboxMetricsRequest{} },
			vm: func(ctx context.Context, _ proto.Message) (proto.Message, error) {
				l, err := r.vm.ListPodSandboxMetrics(ctx, &runtimeapi.ListPodSandboxMetricsRequest{})
				return &runtimeapi.StreamPodSandboxMetricsResponse{PodSandboxMetrics: l.GetPodMetrics()}, err
			},
			local: never,
		},
		"ImageService/StreamImages": {
			req: func() proto.Message { return &runtimeapi.StreamImagesRequest{} },
			vm: func(ctx context.Context, m proto.Message) (proto.Message, error) {
				l, err := r.vm.ListImages(ctx, &runtimeapi.ListImagesRequest{Filter: m.(*runtimeapi.StreamImagesRequest).GetFilter()})
				return &runtimeapi.StreamImagesResponse{Images: l.GetImages()}, err
			},
			local: never,
		},
	}
}

// serveStreamList serves one Stream* verb (see streamLists).
func (r *Router) serveStreamList(sl streamList) grpc.StreamHandler {
	return func(_ any, ss grpc.ServerStream) error {
		method, _ := grpc.MethodFromServerStream(ss)
		req := sl.req()
		if err := ss.RecvMsg(req); err != nil {
			return err
		}
		ctx, cancel := context.WithCancel(ss.Context())
		defer cancel()
		part, err := sl.vm(ctx, req)
		if err != nil {
			return err
		}
		if err := ss.SendMsg(part); err != nil {
			return err
		}
		if r.conn == nil || sl.local(req) {
			return nil
		}
		if md, ok := metadata.FromIncomingContext(ctx); ok {
			ctx = metadata.NewOutgoingContext(ctx, md.Copy())
		}
		cs, err := r.conn.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true}, method, grpc.ForceCodec(codec{}))
		if err == nil {
			if err = cs.SendMsg(req); err == nil {
				err = cs.CloseSend()
			}
		}
		for err == nil {
			f := &rawFrame{}
			if err = cs.RecvMsg(f); err == nil {
				if serr := ss.SendMsg(f); serr != nil {
					return serr
				}
			}
		}
		switch {
		case errors.Is(err, io.EOF):
			return nil
		case status.Code(err) == codes.Unimplemented || status.Code(err) == codes.Unavailable:
			r.logUpstreamDown(method, err)
			return nil
		}
		return err
	}
}
