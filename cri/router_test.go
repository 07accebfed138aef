package cri

import (
	"context"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/cri/unikernel"
	"github.com/unilet-dev/unilet/image"
	"github.com/unilet-dev/unilet/vmm/manager"
)

// fakeUpstream records which calls reached "containerd".
type fakeUpstream struct {
	runtimeapi.UnimplementedRuntimeServiceServer
	runtimeapi.UnimplementedImageServiceServer
	mu    sync.Mutex
	calls []string
	known []string // sandbox IDs "containerd" has (prefixes resolve)
}

func (f *fakeUpstream) PodSandboxStatus(ctx context.Context, r *runtimeapi.PodSandboxStatusRequest) (*runtimeapi.PodSandboxStatusResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, k := range f.known {
		if strings.HasPrefix(k, r.GetPodSandboxId()) {
			return &runtimeapi.PodSandboxStatusResponse{Status: &runtimeapi.PodSandboxStatus{Id: k}}, nil
		}
	}
	return nil, status.Error(codes.NotFound, "not found")
}

func (f *fakeUpstream) record(c string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, c)
}

func (f *fakeUpstream) RunPodSandbox(ctx context.Context, r *runtimeapi.RunPodSandboxRequest) (*runtimeapi.RunPodSandboxResponse, error) {
	f.record("RunPodSandbox")
	return &runtimeapi.RunPodSandboxResponse{PodSandboxId: "upstream-pod-1"}, nil
}

func (f *fakeUpstream) ListPodSandbox(ctx context.Context, r *runtimeapi.ListPodSandboxRequest) (*runtimeapi.ListPodSandboxResponse, error) {
	f.record("ListPodSandbox")
	return &runtimeapi.ListPodSandboxResponse{Items: []*runtimeapi.PodSandbox{{Id: "upstream-pod-1"}}}, nil
}

func (f *fakeUpstream) StopPodSandbox(ctx context.Context, r *runtimeapi.StopPodSandboxRequest) (*runtimeapi.StopPodSandboxResponse, error) {
	f.record("StopPodSandbox:" + r.GetPodSandboxId())
	return nil, status.Error(codes.NotFound, "no such sandbox")
}

func (f *fakeUpstream) PullImage(ctx context.Context, r *runtimeapi.PullImageRequest) (*runtimeapi.PullImageResponse, error) {
	f.record("PullImage:" + r.GetImage().GetImage())
	return &runtimeapi.PullImageResponse{ImageRef: "sha256:up"}, nil
}

func (f *fakeUpstream) Status(ctx context.Context, r *runtimeapi.StatusRequest) (*runtimeapi.StatusResponse, error) {
	return &runtimeapi.StatusResponse{
		Status: &runtimeapi.RuntimeStatus{Conditions: []*runtimeapi.RuntimeCondition{{Type: runtimeapi.RuntimeReady, Status: true}, {Type: runtimeapi.NetworkReady, Status: true}}},
		RuntimeHandlers: []*runtimeapi.RuntimeHandler{
			{Name: "", Features: &runtimeapi.RuntimeHandlerFeatures{RecursiveReadOnlyMounts: true, UserNamespaces: true}},
			{Name: "runc", Features: &runtimeapi.RuntimeHandlerFeatures{RecursiveReadOnlyMounts: true}},
		},
		Features: &runtimeapi.RuntimeFeatures{SupplementalGroupsPolicy: true},
		Info:     map[string]string{"config": "{}"},
	}, nil
}

func (f *fakeUpstream) ImageStatus(ctx context.Context, r *runtimeapi.ImageStatusRequest) (*runtimeapi.ImageStatusResponse, error) {
	f.record("ImageStatus:" + r.GetImage().GetImage())
	return &runtimeapi.ImageStatusResponse{Image: &runtimeapi.Image{Id: "sha256:containerd", RepoTags: []string{r.GetImage().GetImage()}}}, nil
}

func (f *fakeUpstream) ListMetricDescriptors(ctx context.Context, r *runtimeapi.ListMetricDescriptorsRequest) (*runtimeapi.ListMetricDescriptorsResponse, error) {
	return &runtimeapi.ListMetricDescriptorsResponse{Descriptors: []*runtimeapi.MetricDescriptor{
		{Name: "container_cpu_usage_seconds_total", Help: "containerd's"}, {Name: "container_network_receive_bytes_total"}}}, nil
}

func (f *fakeUpstream) ListPodSandboxMetrics(ctx context.Context, r *runtimeapi.ListPodSandboxMetricsRequest) (*runtimeapi.ListPodSandboxMetricsResponse, error) {
	return &runtimeapi.ListPodSandboxMetricsResponse{PodMetrics: []*runtimeapi.PodSandboxMetrics{{PodSandboxId: "plain"}}}, nil
}

func (f *fakeUpstream) ContainerStatus(ctx context.Context, r *runtimeapi.ContainerStatusRequest) (*runtimeapi.ContainerStatusResponse, error) {
	f.record("ContainerStatus:" + r.GetContainerId())
	return &runtimeapi.ContainerStatusResponse{Status: &runtimeapi.ContainerStatus{Id: r.GetContainerId()}}, nil
}

// newVMService is a unikernel side without processes, network or persistence.
func newVMService(t *testing.T) *unikernel.Service {
	t.Helper()
	store, err := image.Open(t.TempDir(), nil)
	require.NoError(t, err)
	t.Cleanup(func() { store.Close() })
	state := t.TempDir()
	vms, err := manager.New(manager.Config{QEMU: "/bin/false", StateDir: state})
	require.NoError(t, err)
	svc, err := unikernel.New(unikernel.Config{QEMU: "/bin/false", Accel: "tcg", StateDir: state}, vms, store, nil)
	require.NoError(t, err)
	return svc
}

func newTestRouter(t *testing.T, withUpstream bool) (*Router, *fakeUpstream) {
	t.Helper()
	svc := newVMService(t)
	cfg := Config{Registries: []string{"unikraft.org"}}
	var up *fakeUpstream
	if withUpstream {
		up = &fakeUpstream{}
		sock := filepath.Join(t.TempDir(), "up.sock")
		lis, err := net.Listen("unix", sock)
		require.NoError(t, err)
		srv := grpc.NewServer()
		runtimeapi.RegisterRuntimeServiceServer(srv, up)
		runtimeapi.RegisterImageServiceServer(srv, up)
		go func() { _ = srv.Serve(lis) }()
		t.Cleanup(srv.Stop)
		cfg.Upstream = "unix://" + sock
	}
	r, err := NewRouter(cfg, svc)
	require.NoError(t, err)
	t.Cleanup(func() { r.Close() })
	return r, up
}

func podCfg(name string, ann map[string]string) *runtimeapi.PodSandboxConfig {
	return &runtimeapi.PodSandboxConfig{Metadata: &runtimeapi.PodSandboxMetadata{Name: name, Namespace: "ns", Uid: name}, Annotations: ann}
}

func TestIsUnikernelPod(t *testing.T) {
	r, _ := newTestRouter(t, false)
	cases := []struct {
		ann     map[string]string
		handler string
		want    bool
	}{
		{map[string]string{"kubernetes.io/target-runtime": "unikraft"}, "", true},
		{nil, "unikraft", true},
		{map[string]string{"kubernetes.io/target-runtime": "virtlet.cloud"}, "", false},
		{map[string]string{"kubernetes.io/target-runtime": ""}, "runc", false},
		{nil, "", false},
	}
	for _, c := range cases {
		require.Equal(t, c.want, r.IsUnikernelPod(podCfg("p", c.ann), c.handler), "%v %q", c.ann, c.handler)
	}
	require.False(t, r.IsUnikernelPod(nil, ""))
}

func TestRoutingTable(t *testing.T) {
	r, up := newTestRouter(t, true)
	ctx := context.Background()

	// unikernel pod stays local; plain pod goes upstream with its ID unchanged.
	vmPod, err := r.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{Config: podCfg("vm", map[string]string{"kubernetes.io/target-runtime": "unikraft"})})
	require.NoError(t, err)
	plain, err := r.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{Config: podCfg("plain", nil)})
	require.NoError(t, err)
	require.Equal(t, "upstream-pod-1", plain.GetPodSandboxId())
	require.Equal(t, []string{"RunPodSandbox"}, up.calls)

	// Lists merge; a list filtered by a VM ID does not go upstream.
	list, err := r.ListPodSandbox(ctx, &runtimeapi.ListPodSandboxRequest{})
	require.NoError(t, err)
	require.Len(t, list.GetItems(), 2)
	up.calls = nil
	list, err = r.ListPodSandbox(ctx, &runtimeapi.ListPodSandboxRequest{Filter: &runtimeapi.PodSandboxFilter{Id: vmPod.GetPodSandboxId()}})
	require.NoError(t, err)
	require.Len(t, list.GetItems(), 1)
	require.Empty(t, up.calls)

	// ID-only calls route by ownership; unknown IDs go upstream; NotFound on stop is success.
	_, err = r.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: vmPod.GetPodSandboxId()})
	require.NoError(t, err)
	require.Empty(t, up.calls)
	_, err = r.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: "unknown"})
	require.NoError(t, err)
	require.Equal(t, []string{"StopPodSandbox:unknown"}, up.calls)
	_, err = r.ContainerStatus(ctx, &runtimeapi.ContainerStatusRequest{ContainerId: "abc"})
	require.NoError(t, err)
	require.Contains(t, up.calls, "ContainerStatus:abc")

	// Images: unikernel registries and unikernel pods go to the VM store, the rest upstream.
	up.calls = nil
	_, err = r.PullImage(ctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: "busybox"}})
	require.NoError(t, err)
	require.Equal(t, []string{"PullImage:busybox"}, up.calls)
	for _, req := range []*runtimeapi.PullImageRequest{
		{Image: &runtimeapi.ImageSpec{Image: "127.0.0.1:1/x:1", RuntimeHandler: "unikraft"}},
		{Image: &runtimeapi.ImageSpec{Image: "127.0.0.1:1/x:1"}, SandboxConfig: podCfg("vm", map[string]string{"kubernetes.io/target-runtime": "unikraft"})},
	} {
		_, err = r.PullImage(ctx, req)
		require.Error(t, err) // nothing listens there: the VM store tried and failed
		require.Contains(t, err.Error(), "pull unikernel image")
	}
	require.Equal(t, []string{"PullImage:busybox"}, up.calls)
	// kubelet pulls for a RuntimeClass pod with its sandbox config but no
	// handler: the pod's VM sandbox (run first) routes the pull.
	_, err = r.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{Config: podCfg("rc", nil), RuntimeHandler: "unikraft"})
	require.NoError(t, err)
	_, err = r.PullImage(ctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: "127.0.0.1:1/x:1"}, SandboxConfig: podCfg("rc", nil)})
	require.ErrorContains(t, err, "pull unikernel image")
	require.Equal(t, []string{"PullImage:busybox"}, up.calls)
	// Refs under the unikernel registries go to the VM store (checked without
	// pulling: tests never reach outside loopback).
	require.True(t, r.isVMImageRef("unikraft.org/helloworld:latest"))
	require.True(t, r.isVMImageRef("unikraft.org/nginx@sha256:"+strings.Repeat("a", 64)))
	require.False(t, r.isVMImageRef("docker.io/library/busybox"))
	require.False(t, r.isVMImageRef("unikraft.org.evil.example/x"))
}

func TestNoUpstream(t *testing.T) {
	r, _ := newTestRouter(t, false)
	_, err := r.RunPodSandbox(context.Background(), &runtimeapi.RunPodSandboxRequest{Config: podCfg("plain", nil)})
	require.Equal(t, codes.FailedPrecondition, status.Code(err))
	require.Contains(t, err.Error(), "--upstream-endpoint is empty")
	_, err = r.RunPodSandbox(context.Background(), &runtimeapi.RunPodSandboxRequest{})
	require.Equal(t, codes.InvalidArgument, status.Code(err))
	// Unknown IDs: stop/remove succeed, status is NotFound.
	_, err = r.StopContainer(context.Background(), &runtimeapi.StopContainerRequest{ContainerId: "nope"})
	require.NoError(t, err)
	_, err = r.ContainerStatus(context.Background(), &runtimeapi.ContainerStatusRequest{ContainerId: "nope"})
	require.Equal(t, codes.NotFound, status.Code(ToGRPC(err)), "converted at the gRPC boundary (UnaryErrors)")
}

// Status keeps what the upstream says it supports (kubelet would otherwise
// believe containerd lacks recursive read-only mounts, user namespaces and
// the supplemental groups policy) and adds the unikernel handler.
func TestStatusKeepsUpstreamHandlersAndFeatures(t *testing.T) {
	r, _ := newTestRouter(t, true)
	resp, err := r.Status(context.Background(), &runtimeapi.StatusRequest{Verbose: true})
	require.NoError(t, err)
	var names []string
	for _, h := range resp.RuntimeHandlers {
		names = append(names, h.Name)
	}
	require.Equal(t, []string{"", "runc", "unikraft"}, names)
	require.True(t, resp.RuntimeHandlers[0].Features.RecursiveReadOnlyMounts)
	require.True(t, resp.RuntimeHandlers[0].Features.UserNamespaces)
	require.False(t, resp.RuntimeHandlers[2].Features.UserNamespaces)
	require.True(t, resp.Features.SupplementalGroupsPolicy)
	require.Equal(t, "{}", resp.Info["config"])
	require.Equal(t, "tcg", resp.Info["accel"], "unilet's own info stays")

	noUp, _ := newTestRouter(t, false)
	resp, err = noUp.Status(context.Background(), &runtimeapi.StatusRequest{})
	require.NoError(t, err)
	require.Len(t, resp.RuntimeHandlers, 1)
	require.Equal(t, "unikraft", resp.RuntimeHandlers[0].Name)
}

// A short or prefix ID resolves the same way on both sides: a prefix of a
// VM sandbox goes to the unikernel side (never upstream to be "not found" and
// silently succeed), and a prefix naming objects on both sides is an error.
func TestPrefixIDsResolveOnBothSides(t *testing.T) {
	r, up := newTestRouter(t, true)
	ctx := context.Background()
	run, err := r.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{Config: podCfg("vm", map[string]string{DefaultAnnotation: DefaultAnnotationValue})})
	require.NoError(t, err)
	id := run.PodSandboxId
	st, err := r.PodSandboxStatus(ctx, &runtimeapi.PodSandboxStatusRequest{PodSandboxId: id[:3]})
	require.NoError(t, err, "a 3-character prefix of a VM sandbox")
	require.Equal(t, id, st.Status.Id)

	up.mu.Lock()
	other := "0"
	if id[3] == '0' {
		other = "1"
	}
	up.known = []string{id[:3] + other + "abc"} // shares 3 characters with the VM sandbox, not 4
	up.mu.Unlock()
	_, err = r.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: id[:3]})
	require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)
	require.Contains(t, err.Error(), "ambiguous")
	_, err = r.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: id[:5]})
	require.NoError(t, err, "a longer prefix names only the VM sandbox")
	_, err = r.PodSandboxStatus(ctx, &runtimeapi.PodSandboxStatusRequest{PodSandboxId: id})
	require.NoError(t, err, "a full ID needs no upstream check")
	up.mu.Lock()
	defer up.mu.Unlock()
	for _, c := range up.calls {
		require.NotContains(t, c, "StopPodSandbox", "a VM sandbox's stop reached the upstream")
	}
}

// kubelet's IfNotPresent asks ImageStatus with the pod's annotations (and,
// with RuntimeClassInImageCriAPI, its handler): for a unikernel pod the
// answer comes from the VM store only, so an image containerd happens to
// have is never taken as present for the VM.
func TestImageStatusOfAVMPodAsksTheVMStore(t *testing.T) {
	r, up := newTestRouter(t, true)
	ctx := context.Background()
	ref := "registry.example/app:1"
	for _, spec := range []*runtimeapi.ImageSpec{
		{Image: ref, Annotations: map[string]string{DefaultAnnotation: DefaultAnnotationValue}},
		{Image: ref, RuntimeHandler: DefaultHandler},
	} {
		st, err := r.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: spec})
		require.NoError(t, err)
		require.Nil(t, st.Image, "not in the VM store: kubelet must pull it")
	}
	st, err := r.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: ref}})
	require.NoError(t, err)
	require.Equal(t, "sha256:containerd", st.Image.GetId(), "a plain pod's image is containerd's")
	up.mu.Lock()
	defer up.mu.Unlock()
	require.Equal(t, 1, strings.Count(strings.Join(up.calls, " "), "ImageStatus:"), "only the plain pod's status went upstream")
}

// The metrics verbs merge: containerd's descriptors (its own kept where both
// describe a name) plus the unikernel pods' others; unikernel pods' metrics beside its.
func TestMetricsMergeBothSides(t *testing.T) {
	r, _ := newTestRouter(t, true)
	ctx := context.Background()
	d, err := r.ListMetricDescriptors(ctx, &runtimeapi.ListMetricDescriptorsRequest{})
	require.NoError(t, err)
	names := map[string]int{}
	for _, x := range d.Descriptors {
		names[x.Name]++
	}
	require.Equal(t, 1, names["container_cpu_usage_seconds_total"], "no name twice")
	require.Equal(t, "containerd's", d.Descriptors[0].Help)
	require.Equal(t, 1, names["container_network_receive_bytes_total"])
	require.Equal(t, 1, names["container_memory_working_set_bytes"], "the unikernel side's own")
	run, err := r.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{Config: podCfg("vm", map[string]string{DefaultAnnotation: DefaultAnnotationValue})})
	require.NoError(t, err)
	m, err := r.ListPodSandboxMetrics(ctx, &runtimeapi.ListPodSandboxMetricsRequest{})
	require.NoError(t, err)
	var ids []string
	for _, p := range m.PodMetrics {
		ids = append(ids, p.PodSandboxId)
	}
	require.Equal(t, []string{run.PodSandboxId, "plain"}, ids)
}
