package cri

import (
	"context"
	"errors"
	"fmt"
	"io"
	"reflect"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/cri/errdefs"
)

// Forward by default: the gRPC server serves only the CRI methods the
// Router declares itself (found by reflection, so none is hand-listed);
// every other method of the CRI services — and any a newer cri-api adds —
// is unknown to the server and reaches Router.forward, which passes the
// call to the upstream runtime as raw frames: request, response, headers,
// trailers, errors and streams unchanged. No verb can silently become
// Unimplemented for plain pods.

// rawFrame is a message forwarded without decoding.
type rawFrame struct{ b []byte }

// codec is the gRPC "proto" codec that also passes rawFrames through.
type codec struct{}

func (codec) Name() string { return "proto" }

func (codec) Marshal(v any) ([]byte, error) {
	switch m := v.(type) {
	case *rawFrame:
		return m.b, nil
	case proto.Message:
		return proto.Marshal(m)
	}
	return nil, fmt.Errorf("cannot marshal %T", v)
}

func (codec) Unmarshal(data []byte, v any) error {
	switch m := v.(type) {
	case *rawFrame:
		m.b = append([]byte(nil), data...)
		return nil
	case proto.Message:
		return proto.Unmarshal(data, m)
	}
	return fmt.Errorf("cannot unmarshal into %T", v)
}

// ServerOptions are the options the CRI gRPC server needs for forwarding.
func (r *Router) ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{grpc.ForceServerCodec(codec{}), grpc.UnknownServiceHandler(r.forward)}
}

// Register serves the Router's own CRI methods on srv (created with
// ServerOptions); the rest are forwarded.
func (r *Router) Register(srv *grpc.Server) {
	for _, sd := range []*grpc.ServiceDesc{&runtimeapi.RuntimeService_ServiceDesc, &runtimeapi.ImageService_ServiceDesc} {
		srv.RegisterService(r.ownMethods(sd), r)
	}
}

// ownMethods is sd reduced to the unary methods Router has, each called by
// reflection (the generated handlers would need the whole interface).
func (r *Router) ownMethods(sd *grpc.ServiceDesc) *grpc.ServiceDesc {
	own := &grpc.ServiceDesc{ServiceName: sd.ServiceName, HandlerType: (*any)(nil), Metadata: sd.Metadata}
	rt := reflect.TypeOf(r)
	for _, m := range sd.Methods {
		meth, ok := rt.MethodByName(m.MethodName)
		if !ok || meth.Type.NumIn() != 3 || meth.Type.NumOut() != 2 {
			continue
		}
		own.Methods = append(own.Methods, grpc.MethodDesc{MethodName: m.MethodName,
			Handler: reflectHandler(meth, "/"+sd.ServiceName+"/"+m.MethodName)})
	}
	for _, st := range sd.Streams {
		if h, ok := r.ownStreams()[sd.ServiceName+"/"+st.StreamName]; ok {
			own.Streams = append(own.Streams, grpc.StreamDesc{StreamName: st.StreamName, Handler: h,
				ServerStreams: st.ServerStreams, ClientStreams: st.ClientStreams})
		}
	}
	return own
}

// ownStreams are the streaming methods the Router serves itself.
func (r *Router) ownStreams() map[string]grpc.StreamHandler {
	own := map[string]grpc.StreamHandler{
		runtimeapi.RuntimeService_ServiceDesc.ServiceName + "/GetContainerEvents": r.serveContainerEvents,
	}
	for name, sl := range r.streamLists() {
		own["runtime.v1."+name] = r.serveStreamList(sl)
	}
	return own
}

func reflectHandler(m reflect.Method, fullMethod string) func(any, context.Context, func(any) error, grpc.UnaryServerInterceptor) (any, error) {
	reqType := m.Type.In(2).Elem()
	return func(srv any, ctx context.Context, dec func(any) error, icpt grpc.UnaryServerInterceptor) (any, error) {
		req := reflect.New(reqType).Interface()
		if err := dec(req); err != nil {
			return nil, err
		}
		call := func(ctx context.Context, req any) (any, error) {
			out := m.Func.Call([]reflect.Value{reflect.ValueOf(srv), reflect.ValueOf(ctx), reflect.ValueOf(req)})
			err, _ := out[1].Interface().(error)
			return out[0].Interface(), err
		}
		if icpt == nil {
			return call(ctx, req)
		}
		return icpt(ctx, req, &grpc.UnaryServerInfo{Server: srv, FullMethod: fullMethod}, call)
	}
}

// forward passes one call of a method the Router does not serve to the
// upstream runtime, unchanged, in both directions.
func (r *Router) forward(_ any, ss grpc.ServerStream) error {
	method, _ := grpc.MethodFromServerStream(ss)
	if r.conn == nil {
		return errdefs.Errorf(errdefs.ErrUnimplemented, "%s is not served for unikernel pods, and unilet has no upstream runtime to pass it to (--upstream-endpoint is empty)", method)
	}
	ctx, cancel := context.WithCancel(ss.Context())
	defer cancel()
	if md, ok := metadata.FromIncomingContext(ctx); ok {
		ctx = metadata.NewOutgoingContext(ctx, md.Copy())
	}
	cs, err := r.conn.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}, method, grpc.ForceCodec(codec{}))
	if err != nil {
		return upstreamErr(err)
	}
	go func() { // client → upstream
		for {
			f := &rawFrame{}
			if err := ss.RecvMsg(f); err != nil {
				if errors.Is(err, io.EOF) {
					_ = cs.CloseSend()
				} else {
					cancel()
				}
				return
			}
			if err := cs.SendMsg(f); err != nil {
				return // the upstream's answer says why
			}
		}
	}()
	sentHeader := false
	for { // upstream → client
		f := &rawFrame{}
		err := cs.RecvMsg(f)
		if !sentHeader {
			if md, herr := cs.Header(); herr == nil && len(md) > 0 {
				_ = ss.SendHeader(md)
			}
			sentHeader = true
		}
		if err != nil {
			ss.SetTrailer(cs.Trailer())
			if errors.Is(err, io.EOF) {
				return nil
			}
			return upstreamErr(err)
		}
		if err := ss.SendMsg(f); err != nil {
			return err
		}
	}
}
