package cri

import (
	"context"
	"io"
	"net"
	"path/filepath"
	"reflect"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// recordingUpstream is a CRI runtime that records every call it gets and
// answers Unimplemented, except for a streamed GetContainerEvents.
type recordingUpstream struct {
	runtimeapi.UnimplementedRuntimeServiceServer
	runtimeapi.UnimplementedImageServiceServer
	mu    sync.Mutex
	calls map[string]bool
	md    metadata.MD
}

func (u *recordingUpstream) record(ctx context.Context, method string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.calls[method] = true
	if md, ok := metadata.FromIncomingContext(ctx); ok && method == runtimeapi.RuntimeService_CheckpointContainer_FullMethodName {
		u.md = md
	}
}

func (u *recordingUpstream) GetContainerEvents(_ *runtimeapi.GetEventsRequest, s runtimeapi.RuntimeService_GetContainerEventsServer) error {
	for _, id := range []string{"c1", "c2"} {
		if err := s.Send(&runtimeapi.ContainerEventResponse{ContainerId: id, ContainerEventType: runtimeapi.ContainerEventType_CONTAINER_STARTED_EVENT}); err != nil {
			return err
		}
	}
	return nil
}

func (u *recordingUpstream) StreamPodSandboxes(_ *runtimeapi.StreamPodSandboxesRequest, s runtimeapi.RuntimeService_StreamPodSandboxesServer) error {
	return s.Send(&runtimeapi.StreamPodSandboxesResponse{PodSandboxes: []*runtimeapi.PodSandbox{{Id: "up1"}}})
}

func serveUnix(t *testing.T, srv *grpc.Server) string {
	sock := filepath.Join(t.TempDir(), "s.sock")
	lis, err := net.Listen("unix", sock)
	require.NoError(t, err)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	return sock
}

// servedRouter serves a Router (upstream at upSock, "" for none) as the
// daemon does and returns it with a client connection.
func servedRouter(t *testing.T, upSock string) (*Router, *grpc.ClientConn) {
	t.Helper()
	cfg := Config{Registries: []string{"unikraft.org"}}
	if upSock != "" {
		cfg.Upstream = "unix://" + upSock
	}
	r, err := NewRouter(cfg, newVMService(t))
	require.NoError(t, err)
	t.Cleanup(func() { r.Close() })
	srv := grpc.NewServer(append(r.ServerOptions(), grpc.ChainUnaryInterceptor(UnaryErrors))...)
	r.Register(srv)
	return r, dialUnix(t, serveUnix(t, srv))
}

func dialUnix(t *testing.T, sock string) *grpc.ClientConn {
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	return conn
}

// Every method of both CRI services reaches the upstream for a plain pod:
// the ones the Router serves (it routes or merges them) and all others,
// forwarded generically — so a cri-api upgrade cannot turn a verb into
// Unimplemented for containerd's pods.
func TestEveryCRIMethodReachesTheUpstream(t *testing.T) {
	up := &recordingUpstream{calls: map[string]bool{}}
	upSrv := grpc.NewServer(
		grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			up.record(ctx, info.FullMethod)
			return h(ctx, req)
		}),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			up.record(ss.Context(), info.FullMethod)
			return h(srv, ss)
		}))
	runtimeapi.RegisterRuntimeServiceServer(upSrv, up)
	runtimeapi.RegisterImageServiceServer(upSrv, up)
	upSock := serveUnix(t, upSrv)

	_, conn := servedRouter(t, upSock)

	// Answered by unilet itself, by design.
	own := map[string]string{
		runtimeapi.RuntimeService_Version_FullMethodName: "the runtime's name and version are unilet's",
	}
	plainPod := &runtimeapi.PodSandboxConfig{Metadata: &runtimeapi.PodSandboxMetadata{Name: "plain", Namespace: "default", Uid: "u1"}}
	var methods []string
	for _, c := range []struct {
		sd     *grpc.ServiceDesc
		client any
	}{{&runtimeapi.RuntimeService_ServiceDesc, runtimeapi.NewRuntimeServiceClient(conn)}, {&runtimeapi.ImageService_ServiceDesc, runtimeapi.NewImageServiceClient(conn)}} {
		var names []string
		for _, m := range c.sd.Methods {
			names = append(names, m.MethodName)
		}
		for _, s := range c.sd.Streams {
			names = append(names, s.StreamName)
		}
		for _, name := range names {
			full := "/" + c.sd.ServiceName + "/" + name
			methods = append(methods, full)
			fn := reflect.ValueOf(c.client).MethodByName(name)
			require.True(t, fn.IsValid(), name)
			req := reflect.New(fn.Type().In(1).Elem())
			if rp, ok := req.Interface().(*runtimeapi.RunPodSandboxRequest); ok {
				rp.Config = plainPod
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			out := fn.Call([]reflect.Value{reflect.ValueOf(ctx), req})
			if recv := out[0].MethodByName("Recv"); recv.IsValid() && out[1].IsNil() {
				for recv.Call(nil)[1].IsNil() { // drain the stream until its end or error
				}
			}
			cancel()
		}
	}
	sort.Strings(methods)
	require.Len(t, methods, len(runtimeapi.RuntimeService_ServiceDesc.Methods)+len(runtimeapi.RuntimeService_ServiceDesc.Streams)+
		len(runtimeapi.ImageService_ServiceDesc.Methods)+len(runtimeapi.ImageService_ServiceDesc.Streams))
	up.mu.Lock()
	defer up.mu.Unlock()
	for _, m := range methods {
		if why, ok := own[m]; ok {
			require.False(t, up.calls[m], "%s is unilet's own (%s)", m, why)
			continue
		}
		require.True(t, up.calls[m], "%s did not reach the upstream", m)
	}
}

// A forwarded call keeps its metadata, and the upstream's error and its
// stream reach the client unchanged.
func TestForwardedCallsAreUnchanged(t *testing.T) {
	up := &recordingUpstream{calls: map[string]bool{}}
	upSrv := grpc.NewServer(grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		up.record(ctx, info.FullMethod)
		return h(ctx, req)
	}))
	runtimeapi.RegisterRuntimeServiceServer(upSrv, up)
	_, conn := servedRouter(t, serveUnix(t, upSrv))
	rt := runtimeapi.NewRuntimeServiceClient(conn)

	ctx := metadata.AppendToOutgoingContext(context.Background(), "x-trace", "abc")
	_, err := rt.CheckpointContainer(ctx, &runtimeapi.CheckpointContainerRequest{ContainerId: "c1"})
	require.Equal(t, codes.Unimplemented, status.Code(err))
	require.Contains(t, status.Convert(err).Message(), "method CheckpointContainer not implemented", "the upstream's own error")
	up.mu.Lock()
	require.Equal(t, []string{"abc"}, up.md.Get("x-trace"))
	up.mu.Unlock()

	ev, err := rt.GetContainerEvents(context.Background(), &runtimeapi.GetEventsRequest{})
	require.NoError(t, err)
	var got []string
	for {
		e, err := ev.Recv()
		if err != nil {
			break
		}
		got = append(got, e.ContainerId)
	}
	require.Equal(t, []string{"c1", "c2"}, got)

	// Without an upstream the method says so.
	_, conn2 := servedRouter(t, "")
	rt2 := runtimeapi.NewRuntimeServiceClient(conn2)
	_, err = rt2.CheckpointContainer(context.Background(), &runtimeapi.CheckpointContainerRequest{ContainerId: "c1"})
	require.Equal(t, codes.Unimplemented, status.Code(err))
	require.Contains(t, err.Error(), "--upstream-endpoint is empty")
}

// The streaming list verbs list both sides: the unikernel side's objects, then the
// upstream's stream.
func TestStreamListsMergeBothSides(t *testing.T) {
	up := &recordingUpstream{calls: map[string]bool{}}
	upSrv := grpc.NewServer()
	runtimeapi.RegisterRuntimeServiceServer(upSrv, up)
	r, conn := servedRouter(t, serveUnix(t, upSrv))
	vmPod, err := r.RunPodSandbox(context.Background(), &runtimeapi.RunPodSandboxRequest{
		Config: &runtimeapi.PodSandboxConfig{Metadata: &runtimeapi.PodSandboxMetadata{Name: "vm", Namespace: "ns", Uid: "u"},
			Annotations: map[string]string{DefaultAnnotation: DefaultAnnotationValue}}})
	require.NoError(t, err)
	rt := runtimeapi.NewRuntimeServiceClient(conn)

	list := func(f *runtimeapi.PodSandboxFilter) []string {
		st, err := rt.StreamPodSandboxes(context.Background(), &runtimeapi.StreamPodSandboxesRequest{Filter: f})
		require.NoError(t, err)
		var ids []string
		for {
			m, err := st.Recv()
			if err != nil {
				require.ErrorIs(t, err, io.EOF)
				return ids
			}
			for _, p := range m.PodSandboxes {
				ids = append(ids, p.Id)
			}
		}
	}
	require.Equal(t, []string{vmPod.PodSandboxId, "up1"}, list(nil))
	require.Equal(t, []string{vmPod.PodSandboxId}, list(&runtimeapi.PodSandboxFilter{Id: vmPod.PodSandboxId}), "a full VM ID stays local")
	// containers: none on the unikernel side; the upstream lacks the verb.
	cs, err := rt.StreamContainers(context.Background(), &runtimeapi.StreamContainersRequest{})
	require.NoError(t, err)
	m, err := cs.Recv()
	require.NoError(t, err)
	require.Empty(t, m.Containers)
	_, err = cs.Recv()
	require.ErrorIs(t, err, io.EOF, "an upstream without the verb leaves the unikernel side's answer")
}
