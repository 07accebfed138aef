package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestRenderUnit(t *testing.T) {
	u := renderUnit("/opt/unilet/bin", "  --upstream-endpoint unix:///run/containerd/containerd.sock\n--log-level debug ")
	require.Contains(t, u, "ExecStart=/opt/unilet/bin/unilet --upstream-endpoint unix:///run/containerd/containerd.sock --log-level debug\n")
	require.Contains(t, u, "KillMode=process", "VMs and shims must survive restarts")
	require.Contains(t, u, "Restart=always")
	require.Contains(t, u, "Before=kubelet.service")
}

func TestPointKubeletAt(t *testing.T) {
	sock := "unix:///run/unilet/unilet.sock"
	cfg := "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\ncontainerRuntimeEndpoint: unix:///run/containerd/containerd.sock\ncgroupDriver: systemd\n"
	out, changed := pointKubeletAt([]byte(cfg), sock)
	require.True(t, changed)
	require.Equal(t, strings.Replace(cfg, "unix:///run/containerd/containerd.sock", sock, 1), string(out))
	_, changed = pointKubeletAt(out, sock)
	require.False(t, changed, "already pointing at unilet")
	_, changed = pointKubeletAt([]byte("containerRuntimeEndpoint: \""+sock+"\"\n"), sock)
	require.False(t, changed, "quoted value")

	out, changed = pointKubeletAt([]byte("kind: KubeletConfiguration\n"), sock)
	require.True(t, changed)
	require.Equal(t, "kind: KubeletConfiguration\ncontainerRuntimeEndpoint: "+sock+"\n", string(out))
}

func TestLabelPatch(t *testing.T) {
	require.JSONEq(t, `{"metadata":{"labels":{"unilet.dev/ready":"true"}}}`, string(labelPatch("unilet.dev/ready", ptr("true"))))
	require.JSONEq(t, `{"metadata":{"labels":{"unilet.dev/ready":null}}}`, string(labelPatch("unilet.dev/ready", nil)),
		"null removes the label in a merge patch")
}

func TestWithConfigFlag(t *testing.T) {
	require.Equal(t, []string{"--listen", "unix:///a", "--config=/etc/u.toml"},
		withConfigFlag([]string{"--config", "/old", "--listen", "unix:///a", "--config=/older"}, "/etc/u.toml"))
	require.Equal(t, []string{"--config=/c"}, withConfigFlag(nil, "/c"))
}

// The ConfigMap's file reaches the host only once this image's unilet
// accepts it; a refused one leaves the host's file as it was.
func TestInstallConfig(t *testing.T) {
	dir := t.TempDir()
	out, err := exec.Command("go", "build", "-o", filepath.Join(dir, "bin", "unilet"), "github.com/unilet-dev/unilet/cmd/unilet").CombinedOutput()
	require.NoError(t, err, "%s", out)
	c := config{hostRoot: filepath.Join(dir, "host"), imageBin: filepath.Join(dir, "bin"),
		configSource: filepath.Join(dir, "src.toml"), configFile: "/etc/unilet/config.toml"}
	changed, use, err := c.installConfig()
	require.NoError(t, err)
	require.False(t, changed || use, "no ConfigMap: the host's file is left alone")

	require.NoError(t, os.WriteFile(c.configSource, []byte("[debug]\nformat = 'json'\n"), 0o644))
	changed, use, err = c.installConfig()
	require.NoError(t, err)
	require.True(t, changed && use)
	installed := filepath.Join(c.hostRoot, "etc/unilet/config.toml")
	b, err := os.ReadFile(installed)
	require.NoError(t, err)
	require.Equal(t, "[debug]\nformat = 'json'\n", string(b))
	changed, use, err = c.installConfig()
	require.NoError(t, err)
	require.True(t, !changed && use, "same file: no restart")

	require.NoError(t, os.WriteFile(c.configSource, []byte("[debug]\nformat = 'json'\nlevl = 'x'\n"), 0o644))
	changed, use, err = c.installConfig()
	require.ErrorContains(t, err, `unknown key "debug.levl"`)
	require.True(t, !changed && use, "the daemon keeps the file it has")
	b, _ = os.ReadFile(installed)
	require.Equal(t, "[debug]\nformat = 'json'\n", string(b))
}
