package unikernel

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

func TestLastLines(t *testing.T) {
	b := []byte("a\nb\nc\n")
	require.Equal(t, "c\n", string(lastLines(b, 1)))
	require.Equal(t, "b\nc\n", string(lastLines(b, 2)))
	require.Equal(t, "a\nb\nc\n", string(lastLines(b, 9)))
	require.Equal(t, "c", string(lastLines([]byte("a\nb\nc"), 1)))
}

// A record's env values are redacted everywhere they appear, its config is
// shown as JSON, kubectl's last-applied-configuration is blanked.
func TestRedactRecord(t *testing.T) {
	cfg := &runtimeapi.ContainerConfig{Metadata: &runtimeapi.ContainerMetadata{Name: "app"},
		Envs:        []*runtimeapi.KeyValue{{Key: "TOKEN", Value: []byte("hunter2")}, {Key: "EMPTY"}},
		Annotations: map[string]string{"kubectl.kubernetes.io/last-applied-configuration": `{"env":"hunter2"}`, "keep": "me"}}
	raw, err := proto.Marshal(cfg)
	require.NoError(t, err)
	rec, err := json.Marshal(map[string]any{"id": "x", "config": raw, "machine": map[string]any{"Cmdline": "env.vars=[ TOKEN=hunter2 ] -- a"}, "pid": 42})
	require.NoError(t, err)
	out, err := json.Marshal(redactRecord(rec, &runtimeapi.ContainerConfig{}))
	require.NoError(t, err)
	s := string(out)
	require.NotContains(t, s, "hunter2")
	require.Contains(t, s, `"Cmdline":"env.vars=[ TOKEN=\u003credacted\u003e ] -- a"`)
	require.Contains(t, s, `"keep":"me"`)
	require.Contains(t, s, `"name":"app"`)
	require.Contains(t, s, `"pid":42`)
	require.Equal(t, 2, strings.Count(s, `"value":"\u003credacted\u003e"`), "every env value, empty ones too")
	require.Contains(t, string(mustJSON(t, redactRecord([]byte("{not json"), &runtimeapi.ContainerConfig{}))), "unreadable")
}

func mustJSON(t *testing.T, v any) []byte {
	b, err := json.Marshal(v)
	require.NoError(t, err)
	return b
}

// ps and inspect show the image as the pod names it, never kubelet's
// resolved image ID when a name is known.
func TestImageName(t *testing.T) {
	m := containerMeta{Config: &runtimeapi.ContainerConfig{Image: &runtimeapi.ImageSpec{Image: "sha256:abc", UserSpecifiedImage: "reg/app:1"}}}
	require.Equal(t, "reg/app:1", imageName(m))
	m.Config.Image.UserSpecifiedImage, m.ImageRef = "", "reg/app@sha256:abc"
	require.Equal(t, "reg/app@sha256:abc", imageName(m))
	m.ImageRef = ""
	require.Equal(t, "sha256:abc", imageName(m))
	m.Config.Image.Image = "reg/app:2"
	require.Equal(t, "reg/app:2", imageName(m))
}
