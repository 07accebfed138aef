package main

import (
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
