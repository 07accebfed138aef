package unikernel

import (
	"context"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// Oversized or CNI-breaking requests are refused with InvalidArgument naming
// the limit, before anything is recorded.
func TestRequestLimits(t *testing.T) {
	s := newTestService(t, Config{}, nil)
	pod := func(name, ns, uid string, ann map[string]string) *runtimeapi.RunPodSandboxRequest {
		return &runtimeapi.RunPodSandboxRequest{Config: &runtimeapi.PodSandboxConfig{
			Metadata: &runtimeapi.PodSandboxMetadata{Name: name, Namespace: ns, Uid: uid}, Annotations: ann}}
	}
	big := map[string]string{"k": strings.Repeat("x", MaxMapBytes)}
	for _, c := range []struct {
		req  *runtimeapi.RunPodSandboxRequest
		want string
	}{
		{pod("a=b", "ns", "u", nil), "'='"},
		{pod("a", "n;s", "u", nil), "';'"},
		{pod("a", "ns", "u\x00", nil), `'\x00'`},
		{pod("a b", "ns", "u", nil), "' '"},
		{pod(strings.Repeat("a", MaxNameLen+1), "ns", "u", nil), "the limit is 253"},
		{pod("a", "ns", "u", big), "the pod's annotations take"},
	} {
		_, err := s.RunPodSandbox(context.Background(), c.req)
		require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)
		require.ErrorContains(t, err, c.want)
	}
	ctr := func(cfg *runtimeapi.ContainerConfig) error {
		cfg.Metadata, cfg.Image = &runtimeapi.ContainerMetadata{Name: "app"}, &runtimeapi.ImageSpec{Image: "x"}
		_, err := s.CreateContainer(context.Background(), &runtimeapi.CreateContainerRequest{PodSandboxId: strings.Repeat("a", 64), Config: cfg})
		return err
	}
	for _, c := range []struct {
		cfg  *runtimeapi.ContainerConfig
		want string
	}{
		{&runtimeapi.ContainerConfig{Envs: make([]*runtimeapi.KeyValue, MaxEnv+1)}, "environment variables; the limit is 1024"},
		{&runtimeapi.ContainerConfig{Args: make([]string, MaxArgs+1)}, "command and args entries"},
		{&runtimeapi.ContainerConfig{Mounts: make([]*runtimeapi.Mount, MaxMounts+1)}, "mounts; the limit is 64"},
		{&runtimeapi.ContainerConfig{Labels: big}, "the container's labels take"},
		{&runtimeapi.ContainerConfig{Args: []string{strings.Repeat("a", MaxConfigBytes)}}, "bytes encoded; the limit is"},
	} {
		err := ctr(c.cfg)
		require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)
		require.ErrorContains(t, err, c.want)
	}
}
