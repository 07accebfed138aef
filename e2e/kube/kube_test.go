// Package kube_test runs unikernel pods through a real Kubernetes: kubelet,
// kube-apiserver, kube-controller-manager, kube-scheduler and etcd built from
// Go modules (e2e/kube/build.sh), brought up by e2e/kube/cluster with unilet
// as the kubelet's runtime and containerd behind it, driven with kubectl.
//
// Specs that look at the whole node (no VM left, QEMU counts, the daemon
// killed, the node's labels) run one at a time first; specs that touch only
// their own objects call t.Parallel and then run together, so their waits
// (crash-loop back-off, grace periods, kubelet's garbage collection, guests
// booting) overlap.
package kube_test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/unilet-dev/unilet/internal/testimages"
	"github.com/unilet-dev/unilet/internal/testutil"
)

var (
	repoRoot   string
	outDir     string // _output
	clusterDir string
	kubectlBin string
	clusterBin string
	binDir     string
	// registry is what images are named under (the examples' and specs'
	// manifests as written); the cluster's unilet fetches it from the
	// registry's real port (ports.Registry) as a mirror, and pushes go there.
	registry = "127.0.0.1:5000"
	ports    clusterPorts
)

// clusterPorts are the free ports the cluster took (cluster/ports.go).
type clusterPorts struct {
	Registry  int `json:"registry"`
	APIServer int `json:"apiserver"`
}

// pushRegistry is where the registry really listens.
func pushRegistry() string { return fmt.Sprintf("127.0.0.1:%d", ports.Registry) }

func TestMain(m *testing.M) {
	testutil.MainNeedsRoot("e2e/kube", testutil.LaneKube)
	code, err := setup(m)
	if err != nil {
		fmt.Fprintln(os.Stderr, "kube e2e setup:", err)
		os.Exit(1)
	}
	os.Exit(code)
}

func run(dir string, name string, args ...string) error {
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return nil
}

func setup(m *testing.M) (int, error) {
	wd, _ := os.Getwd()
	repoRoot = filepath.Join(wd, "..", "..")
	outDir = filepath.Join(repoRoot, "_output")
	clusterDir = filepath.Join(outDir, "cluster")
	kubeBin := filepath.Join(outDir, "kube", "bin")
	kubectlBin = filepath.Join(kubeBin, "kubectl")
	binDir = filepath.Join(outDir, "kube-e2e", "bin")
	clusterBin = filepath.Join(binDir, "cluster")
	if err := run(repoRoot, "./e2e/kube/build.sh", kubeBin); err != nil {
		return 0, err
	}
	if err := run(repoRoot, "go", "build", "-o", binDir+"/", "./cmd/unilet", "./cmd/unilet-shim", "./cmd/unilet-jail", "./cmd/uniletctl", "./e2e/kube/cluster"); err != nil {
		return 0, err
	}
	upArgs := []string{"up", "--dir", clusterDir, "--kube-bin", kubeBin, "--unilet-bin", binDir, "--repo", repoRoot, "--nodes", "2"}
	if d := os.Getenv("UNILET_KUBE_CONTAINERD_BIN"); d != "" { // containerd 2.x (make test-kube runs both)
		upArgs = append(upArgs, "--containerd-bin", d)
	}
	up := exec.Command(clusterBin, upArgs...)
	up.Stdout, up.Stderr = os.Stderr, os.Stderr
	if err := up.Run(); err != nil {
		return 0, fmt.Errorf("cluster up: %w", err)
	}
	defer func() {
		down := exec.Command(clusterBin, "down", "--dir", clusterDir)
		down.Stdout, down.Stderr = os.Stderr, os.Stderr
		_ = down.Run()
	}()
	b, err := os.ReadFile(filepath.Join(clusterDir, "ports.json"))
	if err != nil {
		return 0, err
	}
	if err := json.Unmarshal(b, &ports); err != nil {
		return 0, err
	}
	// Test guests, packed with our uniletctl and pushed to the cluster's registry.
	kernel := filepath.Join(outDir, "kube-e2e", "testkernel.elf")
	if err := run(repoRoot, "./e2e/guest/testkernel/build.sh", kernel); err != nil {
		return 0, err
	}
	if err := run(repoRoot, filepath.Join(binDir, "uniletctl"), "pack", "--kernel", kernel, "--push", pushRegistry()+"/unikraft/testkernel:latest", "--insecure"); err != nil {
		return 0, err
	}
	ng := filepath.Join(outDir, "netguest")
	if err := run(repoRoot, "./e2e/guest/netguest/build.sh", ng); err != nil {
		return 0, err
	}
	kc := filepath.Join(ng, "kconfig")
	if err := os.WriteFile(kc, []byte(testimages.NetGuestKConfig), 0o644); err != nil {
		return 0, err
	}
	if err := run(repoRoot, filepath.Join(binDir, "uniletctl"), "pack", "--kernel", filepath.Join(ng, "vmlinuz"), "--initrd", filepath.Join(ng, "initrd.gz"),
		"--kconfig", kc, "--label", "dev.unilet.min-memory=128", "--push", pushRegistry()+"/unikraft/netguest:latest", "--insecure"); err != nil {
		return 0, err
	}
	code := m.Run()
	if code != 0 {
		for _, c := range []string{"unilet", "kubelet"} {
			b, _ := os.ReadFile(filepath.Join(clusterDir, "logs", c+".log"))
			fmt.Fprintf(os.Stderr, "--- %s log (tail) ---\n%s\n", c, tail(string(b), 60))
		}
	}
	return code, nil
}

func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func kubectlCmd(args ...string) *exec.Cmd {
	return exec.Command(kubectlBin, append([]string{"--kubeconfig", filepath.Join(clusterDir, "kubeconfig")}, args...)...)
}

func kubectl(args ...string) (string, error) {
	cmd := kubectlCmd(args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("kubectl %s: %v: %s", strings.Join(args, " "), err, stderr.String())
	}
	return strings.TrimSpace(string(out)), nil
}

func must(t *testing.T, args ...string) string {
	t.Helper()
	out, err := kubectl(args...)
	require.NoError(t, err)
	return out
}

// apply creates objects from YAML and deletes them when the test ends.
func apply(t *testing.T, yaml string) {
	t.Helper()
	f := filepath.Join(t.TempDir(), "obj.yaml")
	require.NoError(t, os.WriteFile(f, []byte(yaml), 0o644))
	must(t, "apply", "-f", f)
	// Foreground: a Deployment's pods are gone (their VMs stopped) before
	// the next test starts, not garbage-collected behind its back.
	t.Cleanup(func() {
		_, _ = kubectl("delete", "-f", f, "--cascade=foreground", "--wait=true", "--timeout=60s", "--ignore-not-found")
	})
}

func waitPod(t *testing.T, pod, jsonpath, want string, timeout time.Duration) {
	t.Helper()
	var got string
	require.Eventually(t, func() bool {
		got, _ = kubectl("get", "pod", pod, "-o", "jsonpath="+jsonpath)
		return got == want
	}, timeout, 200*time.Millisecond, "pod %s: %s = %q, want %q\n%s", pod, jsonpath, got, want, describe(pod))
}

func describe(pod string) string {
	out, _ := kubectl("describe", "pod", pod)
	return out
}

func waitRunning(t *testing.T, pod string) {
	t.Helper()
	waitPod(t, pod, "{.status.phase}", "Running", 90*time.Second)
}

func waitLogs(t *testing.T, pod, want string, extra ...string) string {
	t.Helper()
	var out string
	require.Eventually(t, func() bool {
		out, _ = kubectl(append([]string{"logs", pod}, extra...)...)
		return strings.Contains(out, want)
	}, 60*time.Second, 200*time.Millisecond, "kubectl logs %s never showed %q: %q", pod, want, out)
	return out
}

func vmPod(name, args string) string {
	return fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata:
  name: %s
  annotations: {kubernetes.io/target-runtime: unikraft}
spec:
  automountServiceAccountToken: false
  containers:
  - name: app
    image: %s/unikraft/testkernel:latest
    args: [%s]
    stdin: true
    tty: true
`, name, registry, args)
}

// qemuOf is the QEMU of one pod's (default namespace) container (by its -name).
func qemuOf(t *testing.T, pod string) []string {
	var found []string
	for _, l := range qemuFor(t) {
		if strings.Contains(l, "guest=default_"+pod+"_") {
			found = append(found, l)
		}
	}
	return found
}

// qemuFor lists the cluster's QEMUs as "PID ARGS".
func qemuFor(t *testing.T) []string {
	var found []string
	for _, q := range testutil.QEMUsUnder(clusterDir) {
		found = append(found, strconv.Itoa(q.Pid)+" "+q.Cmdline)
	}
	return found
}

func TestAnnotatedPodLogsAndFollow(t *testing.T) {
	apply(t, vmPod("vm-logs", `"tick=200"`))
	waitRunning(t, "vm-logs")
	out := waitLogs(t, "vm-logs", "tick 2")
	require.Contains(t, out, "unilet-testkernel: booted")
	require.Contains(t, out, "argv[1]: tick=200")

	// kubectl logs -f follows new console lines as they come.
	cmd := kubectlCmd("logs", "-f", "vm-logs")
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	lines := make(chan string, 1000)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	var last int
	deadline := time.After(30 * time.Second)
	for followed := 0; followed < 5; {
		select {
		case l, ok := <-lines:
			require.True(t, ok, "kubectl logs -f ended")
			var n int
			if _, err := fmt.Sscanf(l, "tick %d", &n); err == nil {
				if last > 0 {
					require.Equal(t, last+1, n, "lines in order, none lost")
					followed++
				}
				last = n
			}
		case <-deadline:
			t.Fatalf("kubectl logs -f did not follow new lines (last tick %d)", last)
		}
	}
}

func TestRuntimeClassPodAndExecUnsupported(t *testing.T) {
	apply(t, fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata: {name: vm-rc}
spec:
  runtimeClassName: unikraft
  automountServiceAccountToken: false
  containers:
  - name: app
    image: %s/unikraft/testkernel:latest
    args: ["tick=500"]
`, registry))
	waitRunning(t, "vm-rc")
	waitLogs(t, "vm-rc", "unilet-testkernel: booted")
	require.NotEmpty(t, qemuFor(t), "the RuntimeClass pod runs as a VM")
	_, err := kubectl("exec", "vm-rc", "--", "ls")
	require.Error(t, err)
	require.Contains(t, err.Error(), "unikernel pods run a single application in a VM with no shell or process model")
}

func TestAttachEchoAndDetach(t *testing.T) {
	apply(t, vmPod("vm-attach", `"echo"`))
	waitRunning(t, "vm-attach")
	vm := qemuOf(t, "vm-attach")
	waitLogs(t, "vm-attach", "echo: ready")
	cmd := exec.Command("script", "-q", "-e", "-c", kubectlBin+" --kubeconfig "+filepath.Join(clusterDir, "kubeconfig")+" attach -it vm-attach", "/dev/null")
	stdin, err := cmd.StdinPipe()
	require.NoError(t, err)
	var out syncBuf
	cmd.Stdout, cmd.Stderr = &out, &out
	require.NoError(t, cmd.Start())
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	require.Eventually(t, func() bool {
		_, _ = stdin.Write([]byte("kube-hello\r"))
		time.Sleep(200 * time.Millisecond)
		return strings.Contains(out.String(), "kube-hello")
	}, 30*time.Second, 100*time.Millisecond, "attach round trip; got %q", out.String())
	_, err = stdin.Write([]byte{0x1d}) // Ctrl-]
	require.NoError(t, err)
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatalf("Ctrl-] did not end kubectl attach: %q", out.String())
	}
	require.Equal(t, vm, qemuOf(t, "vm-attach"), "detaching leaves the VM running")
	waitPod(t, "vm-attach", "{.status.phase}", "Running", 5*time.Second)
	waitPod(t, "vm-attach", "{.status.containerStatuses[0].restartCount}", "0", 5*time.Second)
	waitLogs(t, "vm-attach", "kube-hello")
}

// TestNetworkGuestProbePortForwardVolumes: a network guest with an init
// container, ConfigMap, emptyDir and hostPath volumes and a tcpSocket
// readiness probe; kubectl port-forward reaches its web server.
func TestNetworkGuestProbePortForwardVolumes(t *testing.T) {
	hostDir := t.TempDir()
	require.NoError(t, os.Chmod(hostDir, 0o755)) // QEMU reads it as the jail's uid
	require.NoError(t, os.WriteFile(filepath.Join(hostDir, "host.txt"), []byte("from-hostpath\n"), 0o644))
	apply(t, fmt.Sprintf(`apiVersion: v1
kind: ConfigMap
metadata: {name: web-config}
data: {greeting: from-configmap}
---
apiVersion: v1
kind: Pod
metadata:
  name: vm-web
  annotations: {kubernetes.io/target-runtime: unikraft}
spec:
  automountServiceAccountToken: false
  enableServiceLinks: false
  initContainers:
  - name: init
    image: %[1]s/unikraft/testkernel:latest
    args: ["init-done"]
  containers:
  - name: web
    image: %[1]s/unikraft/netguest:latest
    command: ["/bin/sh", "-c", "cat /config/greeting; echo; cat /host/host.txt; echo scratch > /scratch/x && cat /scratch/x; exec httpd -f -p 8080 -h /host"]
    ports: [{containerPort: 8080}]
    readinessProbe:
      tcpSocket: {port: 8080}
      periodSeconds: 1
    resources:
      limits: {memory: 256Mi, cpu: "1"}
    volumeMounts:
    - {name: config, mountPath: /config}
    - {name: scratch, mountPath: /scratch}
    - {name: host, mountPath: /host}
  volumes:
  - name: config
    configMap: {name: web-config}
  - name: scratch
    emptyDir: {}
  - name: host
    hostPath: {path: %[2]s, type: Directory}
`, registry, hostDir))
	waitPod(t, "vm-web", `{.status.conditions[?(@.type=="Ready")].status}`, "True", 120*time.Second)
	init := must(t, "logs", "vm-web", "-c", "init")
	require.Contains(t, init, "argv[1]: init-done")
	require.Equal(t, "Completed", must(t, "get", "pod", "vm-web", "-o", "jsonpath={.status.initContainerStatuses[0].state.terminated.reason}"))
	logs := waitLogs(t, "vm-web", "scratch", "-c", "web")
	for _, want := range []string{"from-configmap", "from-hostpath", "fstab: fs1:/config:9pfs:1::mkmp mounted read-only"} {
		require.Contains(t, logs, want)
	}
	ip := must(t, "get", "pod", "vm-web", "-o", "jsonpath={.status.podIP}")
	require.True(t, strings.HasPrefix(ip, "198.19.0."), "pod IP %q", ip)
	require.Equal(t, "from-hostpath\n", testutil.MustHTTPGet(t, "http://"+ip+":8080/host.txt", 30*time.Second))

	port, pfOut := portForward(t, "vm-web", 8080)
	require.Equal(t, "from-hostpath\n", testutil.MustHTTPGet(t, fmt.Sprintf("http://127.0.0.1:%d/host.txt", port), 30*time.Second), pfOut.String())
}

func TestPlainPodPassesThrough(t *testing.T) {
	apply(t, `apiVersion: v1
kind: Pod
metadata: {name: plain}
spec:
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1 # sleep as PID 1 ignores SIGTERM
  containers:
  - name: sh
    image: unilet.test/busybox:1
    imagePullPolicy: Never
    command: ["/bin/sh", "-c", "echo hello-from-runc; sleep 3600"]
`)
	waitRunning(t, "plain")
	waitLogs(t, "plain", "hello-from-runc")
	require.Equal(t, "exec-ok", must(t, "exec", "plain", "--", "echo", "exec-ok"))
	require.Empty(t, qemuFor(t), "a plain pod never becomes a VM")
}

func TestDeploymentScale(t *testing.T) {
	apply(t, fmt.Sprintf(`apiVersion: apps/v1
kind: Deployment
metadata: {name: vm-deploy}
spec:
  replicas: 3
  selector: {matchLabels: {app: vm-deploy}}
  template:
    metadata:
      labels: {app: vm-deploy}
      annotations: {kubernetes.io/target-runtime: unikraft}
    spec:
      automountServiceAccountToken: false
      containers:
      - name: app
        image: %s/unikraft/testkernel:latest
        args: ["tick=1000"]
`, registry))
	running := func(n int) func() bool {
		return func() bool {
			out, _ := kubectl("get", "pods", "-l", "app=vm-deploy", "-o", "jsonpath={.items[*].status.phase}")
			return strings.Count(out, "Running") == n && len(strings.Fields(out)) == n && len(qemuFor(t)) == n
		}
	}
	require.Eventually(t, running(3), 120*time.Second, 500*time.Millisecond, "3 replicas Running")
	must(t, "scale", "deployment/vm-deploy", "--replicas=0")
	require.Eventually(t, running(0), 120*time.Second, 500*time.Millisecond, "scaled to 0")
	must(t, "scale", "deployment/vm-deploy", "--replicas=3")
	require.Eventually(t, running(3), 120*time.Second, 500*time.Millisecond, "3 replicas Running again")
}

// TestDaemonKilled: kill -9 of unilet keeps pods Running; kubelet recovers
// once it returns (the harness's supervisor role is played by the test).
func TestDaemonKilled(t *testing.T) {
	apply(t, vmPod("vm-survive", `"tick=100"`))
	waitRunning(t, "vm-survive")
	before := qemuOf(t, "vm-survive")
	require.Len(t, before, 1)
	pidFile := filepath.Join(clusterDir, "pids", "unilet.pid")
	b, err := os.ReadFile(pidFile)
	require.NoError(t, err)
	var pid int
	_, err = fmt.Sscan(string(b), &pid)
	require.NoError(t, err)
	cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	args := strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")
	require.NoError(t, syscall.Kill(pid, syscall.SIGKILL))
	require.Eventually(t, func() bool { // gone, or a zombie its supervisor has not reaped
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		return err != nil || strings.Contains(string(b), ") Z ")
	}, 10*time.Second, 10*time.Millisecond, "the daemon survived SIGKILL")
	require.Equal(t, before, qemuOf(t, "vm-survive"), "the VM survives the daemon")
	require.Equal(t, "Running", must(t, "get", "pod", "vm-survive", "-o", "jsonpath={.status.phase}"))

	lf, err := os.OpenFile(filepath.Join(clusterDir, "logs", "unilet.log"), os.O_APPEND|os.O_WRONLY, 0o644)
	require.NoError(t, err)
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	require.NoError(t, cmd.Start())
	lf.Close()
	require.NoError(t, os.WriteFile(pidFile, []byte(fmt.Sprint(cmd.Process.Pid)), 0o644))
	go func() { _ = cmd.Wait() }()
	waitLogs(t, "vm-survive", "tick 80")
	apply(t, vmPod("vm-after", `"tick=100"`))
	waitRunning(t, "vm-after")
	waitPod(t, "vm-survive", "{.status.containerStatuses[0].restartCount}", "0", 5*time.Second)
}

type syncBuf = testutil.SyncBuf

// portForward runs kubectl port-forward to remote port of pod until the
// test ends; it returns the local port and kubectl's output.
func portForward(t *testing.T, pod string, remote int) (int, *syncBuf) {
	return testutil.PortForward(t, remote, func(mapping string) *exec.Cmd { return kubectlCmd("port-forward", "pod/"+pod, mapping) })
}
