package kube_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/internal/testimages"
)

// buildUniletImage builds the DaemonSet's image the way the Dockerfile does
// (static binaries under /unilet/bin, nsenter on PATH), stamped with ver.
func buildUniletImage(t *testing.T, ver string) string {
	dir := filepath.Join(t.TempDir(), ver)
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-X github.com/unilet-dev/unilet/pkg/version.Version="+ver, "-o", dir+"/",
		"./cmd/unilet", "./cmd/unilet-shim", "./cmd/unilet-jail", "./cmd/uniletctl", "./cmd/unilet-install")
	cmd.Dir = repoRoot
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, string(out))
	files := map[string][]byte{}
	for _, b := range []string{"unilet", "unilet-shim", "unilet-jail", "uniletctl", "unilet-install"} {
		files["unilet/bin/"+b], err = os.ReadFile(filepath.Join(dir, b))
		require.NoError(t, err)
	}
	files["bin/busybox"], err = os.ReadFile("/bin/busybox")
	require.NoError(t, err)
	img, err := testimages.Build(files, map[string]string{"bin/nsenter": "busybox", "bin/sh": "busybox"}, []string{"/unilet/bin/unilet-install"})
	require.NoError(t, err)
	ref := "unilet.test/unilet:" + ver
	require.NoError(t, testimages.Import(t.TempDir(), filepath.Join(clusterDir, "containerd", "containerd.sock"), map[string]v1.Image{ref: img}))
	return ref
}

// runtimeVersion asks the daemon behind the cluster's CRI socket for its version.
func runtimeVersion() (string, error) {
	conn, err := grpc.NewClient("unix://"+filepath.Join(clusterDir, "unilet", "unilet.sock"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return "", err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	v, err := runtimeapi.NewRuntimeServiceClient(conn).Version(ctx, &runtimeapi.VersionRequest{})
	if err != nil {
		return "", err
	}
	return v.GetRuntimeVersion(), nil
}

// daemonManifest is deploy/unilet.yaml pointed at this cluster: its image,
// and the host paths the cluster's daemon uses (pid file, log, binaries).
func daemonManifest(t *testing.T, image string) string {
	b, err := os.ReadFile(filepath.Join(repoRoot, "deploy", "unilet.yaml"))
	require.NoError(t, err)
	s := string(b)
	for old, new := range map[string]string{
		"image: unilet/unilet:0.1.0":              "image: " + image,
		`value: "/opt/unilet/bin"`:                fmt.Sprintf("value: %q", filepath.Join(clusterDir, "host-bin")),
		`value: "/run/unilet/unilet.pid"`:         fmt.Sprintf("value: %q", filepath.Join(clusterDir, "pids", "unilet.pid")),
		`value: "/var/log/unilet.log"`:            fmt.Sprintf("value: %q", filepath.Join(clusterDir, "logs", "unilet.log")),
		`value: "/etc/unilet/config.toml"`:        fmt.Sprintf("value: %q", filepath.Join(clusterDir, "unilet-config.toml")),
		`value: "unix:///run/unilet/unilet.sock"`: fmt.Sprintf("value: %q", "unix://"+filepath.Join(clusterDir, "unilet", "unilet.sock")),
		// The e2e apiserver listens on loopback only (no endpoints for the
		// kubernetes Service); the installer runs in the host's network.
		"        env:\n": "        env:\n        - {name: KUBERNETES_SERVICE_HOST, value: 127.0.0.1}\n        - {name: KUBERNETES_SERVICE_PORT, value: \"" + strconv.Itoa(ports.APIServer) + "\"}\n",
	} {
		require.Contains(t, s, old)
		s = strings.ReplaceAll(s, old, new)
	}
	f := filepath.Join(t.TempDir(), "unilet.yaml")
	require.NoError(t, os.WriteFile(f, []byte(s), 0o644))
	return f
}

// TestDaemonSetRollout: the DaemonSet's installer takes over the node's
// daemon (adopting its flags), installs its binaries on the host and
// restarts it there; rolling the DaemonSet to a new version replaces the
// binaries and restarts the daemon again; a VM started before runs on
// untouched throughout, and kubelet keeps starting pods.
func TestDaemonSetRollout(t *testing.T) {
	apply(t, vmPod("vm-rollout", `"tick=200"`))
	waitRunning(t, "vm-rollout")
	vms := qemuOf(t, "vm-rollout") // by pod: PIDs may wrap, so /proc order says nothing
	require.Len(t, vms, 1)

	// The installer labels the node ready once its daemon answers and
	// removes the label when it ends; until then the cluster tool's label
	// stands in for it.
	node := "localhost" // the first node, where unilet runs
	must(t, "label", "node", node, "unilet.dev/ready-")
	t.Cleanup(func() { _, _ = kubectl("label", "node", node, "unilet.dev/ready=true", "--overwrite") })
	ready := func(want string) {
		t.Helper()
		var got string
		require.Eventually(t, func() bool {
			got, _ = kubectl("get", "node", node, "-o", `jsonpath={.metadata.labels.unilet\.dev/ready}`)
			return got == want
		}, 60*time.Second, 250*time.Millisecond, "node label unilet.dev/ready = %q, want %q\ninstaller:\n%s", got, want, installerLogs())
	}
	img1 := buildUniletImage(t, "e2e-v1")
	img2 := buildUniletImage(t, "e2e-v2")
	manifest := daemonManifest(t, img1)
	rec := newTranscript(t)
	rec.kubectl("deploy/unilet.yaml", "apply", "-f", manifest)
	t.Cleanup(func() {
		_, _ = kubectl("delete", "-f", manifest, "--wait=true", "--timeout=60s", "--ignore-not-found")
	})
	waitVersion := func(want string) {
		var got string
		var err error
		for deadline := time.Now().Add(120 * time.Second); time.Now().Before(deadline); time.Sleep(500 * time.Millisecond) {
			if got, err = runtimeVersion(); got == want {
				return
			}
		}
		t.Fatalf("daemon version %q (%v), want %q\ninstaller:\n%s", got, err, want, installerLogs())
	}
	waitVersion("e2e-v1")
	ready("true")
	rec.uniletctl("version")
	// The second node (no unilet.dev/kvm label) gets no installer, though
	// the DaemonSet tolerates every taint.
	require.Equal(t, node, must(t, "-n", "unilet-system", "get", "pods", "-l", "app.kubernetes.io/name=unilet", "-o", "jsonpath={.items[*].spec.nodeName}"))
	require.FileExists(t, filepath.Join(clusterDir, "host-bin", "unilet"), "binaries installed on the host")
	require.Equal(t, vms, qemuOf(t, "vm-rollout"), "the VM runs on through the takeover")
	apply(t, vmPod("vm-after-v1", `"tick=200"`))
	waitRunning(t, "vm-after-v1")

	// Roll to v2 with a configuration: JSON logs.
	setConfig := func(toml string) {
		b, _ := json.Marshal(map[string]any{"data": map[string]string{"config.toml": toml}})
		must(t, "-n", "unilet-system", "patch", "configmap", "unilet-config", "--type", "merge", "-p", string(b))
	}
	setConfig("[debug]\nformat = 'json'\n")
	rec.kubectl("", "-n", "unilet-system", "set", "image", "daemonset/unilet", "installer="+img2)
	waitVersion("e2e-v2")
	ready("true")
	rec.uniletctl("version")
	rec.uniletctl("ps")
	hostConfig, err := os.ReadFile(filepath.Join(clusterDir, "unilet-config.toml"))
	require.NoError(t, err)
	require.Equal(t, "[debug]\nformat = 'json'\n", string(hostConfig))
	logs, err := os.ReadFile(filepath.Join(clusterDir, "logs", "unilet.log"))
	require.NoError(t, err)
	_, v2log, ok := strings.Cut(string(logs), "started by unilet-install e2e-v2")
	require.True(t, ok)
	require.Regexp(t, `\n\{"accel":.*"msg":"unilet serving CRI"`, v2log, "the daemon logs JSON as configured")

	// A configuration the daemon would refuse is not installed: the daemon
	// runs on with the one it has, and the installer says why.
	pidFile := filepath.Join(clusterDir, "pids", "unilet.pid")
	pid, err := os.ReadFile(pidFile)
	require.NoError(t, err)
	setConfig("[debug]\nformatt = 'json'\n")
	rec.kubectl("", "-n", "unilet-system", "rollout", "restart", "daemonset/unilet")
	require.Eventually(t, func() bool {
		return strings.Contains(installerLogs(), `unknown key \"debug.formatt\"`)
	}, 90*time.Second, 500*time.Millisecond, "installer:\n%s", installerLogs())
	hostConfig, _ = os.ReadFile(filepath.Join(clusterDir, "unilet-config.toml"))
	require.Equal(t, "[debug]\nformat = 'json'\n", string(hostConfig))
	ready("true")
	again, _ := os.ReadFile(pidFile)
	require.Equal(t, string(pid), string(again), "the daemon was not restarted")
	require.Equal(t, vms, qemuOf(t, "vm-rollout"), "the first VM runs on through the rollout")
	waitPod(t, "vm-rollout", "{.status.containerStatuses[0].restartCount}", "0", 5*time.Second)
	waitLogs(t, "vm-rollout", "tick 5")
	apply(t, vmPod("vm-after-v2", `"tick=200"`))
	waitRunning(t, "vm-after-v2")
	rec.add("$ kubectl -n unilet-system logs daemonset/unilet | grep 'NOT installed'", grepLine(installerLogs(), "NOT installed"))

	// Roll back to v1 (revision 1: the restart above made revision 3), with
	// the configuration fixed (text logs again, as the other specs read them).
	setConfig("[debug]\nformat = 'text'\n")
	rec.kubectl("", "-n", "unilet-system", "rollout", "undo", "daemonset/unilet", "--to-revision=1")
	waitVersion("e2e-v1")
	ready("true")
	hostConfig, _ = os.ReadFile(filepath.Join(clusterDir, "unilet-config.toml"))
	require.Equal(t, "[debug]\nformat = 'text'\n", string(hostConfig), "the fixed configuration is installed with the roll back")
	rec.uniletctl("version")
	require.Equal(t, vms, qemuOf(t, "vm-rollout"), "the first VM runs on through the roll back")

	// Deleting the DaemonSet leaves the daemon on the host.
	// Uninstall as docs/install.md says: the DaemonSet first (its installers
	// remove the label while their service account still exists), then the rest.
	rec.kubectl("", "-n", "unilet-system", "delete", "daemonset", "unilet", "--wait=true", "--timeout=60s")
	ready("")
	rec.kubectl("deploy/unilet.yaml", "delete", "-f", manifest, "--wait=true", "--timeout=60s", "--ignore-not-found")
	require.Eventually(t, func() bool { // every installer and the namespace are gone
		_, err := kubectl("get", "namespace", "unilet-system")
		return err != nil
	}, 60*time.Second, 250*time.Millisecond)
	v, err := runtimeVersion()
	require.NoError(t, err)
	require.Equal(t, "e2e-v1", v)
	rec.uniletctl("ps")
}

// transcript records the commands of the rollout spec and their real
// output in _output/kube-e2e/operations-transcript.txt (docs/operations.md
// quotes it).
type transcript struct {
	t    *testing.T
	path string
}

func newTranscript(t *testing.T) *transcript {
	p := filepath.Join(outDir, "kube-e2e", "operations-transcript.txt")
	require.NoError(t, os.WriteFile(p, nil, 0o644))
	return &transcript{t: t, path: p}
}

func (r *transcript) add(cmd, out string) {
	f, err := os.OpenFile(r.path, os.O_APPEND|os.O_WRONLY, 0o644)
	require.NoError(r.t, err)
	defer f.Close()
	_, err = fmt.Fprintf(f, "%s\n%s\n", cmd, strings.TrimRight(out, "\n"))
	require.NoError(r.t, err)
}

// kubectl runs kubectl args and records it; shown, when set, replaces the
// test's own manifest path in the recorded command line.
func (r *transcript) kubectl(shown string, args ...string) {
	r.t.Helper()
	out := must(r.t, args...)
	line := "$ kubectl " + strings.Join(args, " ")
	if shown != "" {
		for _, a := range args {
			if strings.HasSuffix(a, "unilet.yaml") && strings.HasPrefix(a, "/") {
				line = strings.ReplaceAll(line, a, shown)
			}
		}
	}
	r.add(line, out)
}

// uniletctl runs the node's installed uniletctl (what the installer put on
// the host) against the daemon and records it.
func (r *transcript) uniletctl(args ...string) {
	r.t.Helper()
	cmd := exec.Command(filepath.Join(clusterDir, "host-bin", "uniletctl"),
		append([]string{"--endpoint", "unix://" + filepath.Join(clusterDir, "unilet", "unilet.sock")}, args...)...)
	out, err := cmd.CombinedOutput()
	require.NoError(r.t, err, "%s", out)
	r.add("$ uniletctl "+strings.Join(args, " "), string(out))
}

func grepLine(s, want string) string {
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, want) {
			return l
		}
	}
	return ""
}

func installerLogs() string {
	out, _ := kubectl("-n", "unilet-system", "logs", "daemonset/unilet", "--tail", "30")
	return out
}
