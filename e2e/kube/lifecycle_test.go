package kube_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/internal/testutil"
)

// TestCrashLoopAndPrevious: a unikernel whose main returns 3 under
// restartPolicy Always goes to CrashLoopBackOff with exit code 3, and
// `kubectl logs --previous` shows the last run's console.
func TestCrashLoopAndPrevious(t *testing.T) {
	t.Parallel() // its own objects only: runs beside the other waiting specs
	apply(t, vmPod("vm-crashloop", `"exit=3"`))
	status := func(jp string) string {
		out, _ := kubectl("get", "pod", "vm-crashloop", "-o", "jsonpath={.status.containerStatuses[0]."+jp+"}")
		return out
	}
	require.Eventually(t, func() bool {
		return status("state.waiting.reason") == "CrashLoopBackOff" && status("lastState.terminated.exitCode") == "3"
	}, 90*time.Second, 250*time.Millisecond, "CrashLoopBackOff with exit code 3\n%s", describe("vm-crashloop"))
	require.Equal(t, "Error", status("lastState.terminated.reason"))
	require.Contains(t, status("lastState.terminated.message"), "the application exited with status 3")
	require.NotEqual(t, "0", status("restartCount"))
	// The previous run can change under us (the next one may end and
	// replace it while we ask): ask until an answer holds its console.
	var prev string
	require.Eventually(t, func() bool {
		prev, _ = kubectl("logs", "vm-crashloop", "--previous")
		return strings.Contains(prev, "argv[1]: exit=3") && strings.Contains(prev, "main returned 3, halting system")
	}, 60*time.Second, time.Second, "kubectl logs --previous: %q", prev)
}

// TestGuestOutOfMemoryIsItsOwnPanic: a guest that uses up its RAM inside a
// limit that holds guest RAM plus QEMU panics on its own; the pod says
// GuestPanicked with the guest's last words, not OOMKilled (the host's OOM
// kill is e2e/cri's TestGuestEndsAreToldApart).
func TestGuestOutOfMemoryIsItsOwnPanic(t *testing.T) {
	t.Parallel() // its own objects only: runs beside the other waiting specs
	apply(t, fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata:
  name: vm-oom
  annotations: {kubernetes.io/target-runtime: unikraft}
spec:
  automountServiceAccountToken: false
  restartPolicy: Never
  containers:
  - name: app
    image: %s/unikraft/testkernel:latest
    args: ["oom"]
    resources:
      limits: {memory: 128Mi}
`, registry))
	waitPod(t, "vm-oom", "{.status.phase}", "Failed", 90*time.Second)
	term := func(jp string) string {
		return must(t, "get", "pod", "vm-oom", "-o", "jsonpath={.status.containerStatuses[0].state.terminated."+jp+"}")
	}
	require.Equal(t, "GuestPanicked", term("reason"))
	require.Contains(t, term("message"), "oom: out of memory: no free page left in 6")
	waitLogs(t, "vm-oom", "oom: touched 48 MiB")
}

// stopLine is the daemon's log line for container id's VM stopping.
func stopLine(t *testing.T, id string) string {
	var line string
	require.Eventually(t, func() bool {
		b, _ := os.ReadFile(filepath.Join(clusterDir, "logs", "unilet.log"))
		for _, l := range strings.Split(string(b), "\n") {
			if strings.Contains(l, "unikernel VM stopped") && strings.Contains(l, id) {
				line = l
				return true
			}
		}
		return false
	}, 30*time.Second, 200*time.Millisecond, "no stop logged for container %s", id)
	return line
}

func containerID(t *testing.T, pod string) string {
	id := must(t, "get", "pod", pod, "-o", "jsonpath={.status.containerStatuses[0].containerID}")
	_, id, _ = strings.Cut(id, "://")
	require.NotEmpty(t, id)
	return id
}

// TestGracePeriods: deletion presses the power button first — a guest that
// answers it powers off (reason Completed) — and kills at the pod's
// terminationGracePeriodSeconds: a guest ignoring the button still runs
// after part of its grace period and is gone by its end (reason Killed).
func TestGracePeriods(t *testing.T) {
	t.Parallel() // its own objects only: runs beside the other waiting specs
	pod := func(name, args string, grace int) {
		apply(t, strings.Replace(vmPod(name, args), "spec:\n", fmt.Sprintf("spec:\n  terminationGracePeriodSeconds: %d\n", grace), 1))
		waitLogs(t, name, "tick 2")
	}
	pod("vm-polite", `"tick=200"`, 60)
	pod("vm-stubborn", `"tick=200", "ignore-acpi"`, 6)
	polite, stubborn := containerID(t, "vm-polite"), containerID(t, "vm-stubborn")
	require.Len(t, qemuOf(t, "vm-stubborn"), 1)

	must(t, "delete", "pod", "vm-polite", "--wait=true", "--timeout=50s")
	require.Regexp(t, `reason=Completed`, stopLine(t, polite))

	del := kubectlCmd("delete", "pod", "vm-stubborn", "--wait=false")
	require.NoError(t, del.Run())
	deleted := time.Now()
	time.Sleep(3 * time.Second)
	require.Len(t, qemuOf(t, "vm-stubborn"), 1, "a guest that ignores the power button runs until its grace period ends")
	require.Eventually(t, func() bool { return len(qemuOf(t, "vm-stubborn")) == 0 }, 20*time.Second, 100*time.Millisecond,
		"QEMU is killed at the deadline")
	t.Logf("the stubborn guest's QEMU ended %.1f s after the delete (grace period 6 s)", time.Since(deleted).Seconds())
	line := stopLine(t, stubborn)
	require.Regexp(t, `exitCode=137`, line)
	require.Regexp(t, `reason=Killed`, line)
}

// TestDeleteLeavesNothing: `kubectl delete` and `kubectl delete
// --grace-period=0 --force` leave no QEMU, shim, network namespace, veth,
// cgroup, VM directory or CRI record of the pod behind.
func TestDeleteLeavesNothing(t *testing.T) {
	t.Parallel() // pod-specific checks; it waits on kubelet's garbage collection
	rt := criClient(t)
	var vs []victim
	for _, name := range []string{"vm-delete", "vm-force"} {
		f := filepath.Join(t.TempDir(), name+".yaml")
		require.NoError(t, os.WriteFile(f, []byte(vmPod(name, `"tick=100"`)), 0o644))
		must(t, "apply", "-f", f)
	}
	for _, name := range []string{"vm-delete", "vm-force"} {
		waitRunning(t, name)
		require.Len(t, qemuOf(t, name), 1)
		v := victim{name: name, uid: must(t, "get", "pod", name, "-o", "jsonpath={.metadata.uid}"), id: containerID(t, name),
			ip: must(t, "get", "pod", name, "-o", "jsonpath={.status.podIP}")}
		v.sandbox = sandboxOf(t, rt, v.uid)
		// Every check sees the running pod (so none passes by looking in the wrong place).
		running := strings.Join(v.leftovers(t, rt), "\n")
		for _, what := range []string{"QEMU ", "shim ", "netns ", "IP lease ", "cgroup ", "VM directory ", "sandbox record ", "container record "} {
			require.Contains(t, running, what, "a running pod's %s", what)
		}
		vs = append(vs, v)
	}
	must(t, "delete", "pod", "vm-force", "--grace-period=0", "--force")
	must(t, "delete", "pod", "vm-delete", "--wait=true", "--timeout=60s")
	// kubelet removes a force-deleted pod's sandbox at its next garbage
	// collection (once a minute).
	waitNothingLeft(t, rt, vs)
}

// sandboxOf is the ID of the one pod sandbox unilet has for the pod uid.
func sandboxOf(t *testing.T, rt runtimeapi.RuntimeServiceClient, uid string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	pods, err := rt.ListPodSandbox(ctx, &runtimeapi.ListPodSandboxRequest{Filter: &runtimeapi.PodSandboxFilter{
		LabelSelector: map[string]string{"io.kubernetes.pod.uid": uid}}})
	require.NoError(t, err)
	require.Len(t, pods.GetItems(), 1)
	return pods.GetItems()[0].GetId()
}

// waitNothingLeft waits until nothing of each victim remains (2 min).
func waitNothingLeft(t *testing.T, rt runtimeapi.RuntimeServiceClient, vs []victim) {
	t.Helper()
	for _, v := range vs {
		var left []string
		require.Eventually(t, func() bool {
			left = v.leftovers(t, rt)
			return len(left) == 0
		}, 120*time.Second, 500*time.Millisecond, "%s: left behind", v.name)
		require.Empty(t, left, v.name)
	}
}

func criClient(t *testing.T) runtimeapi.RuntimeServiceClient {
	conn, err := grpc.NewClient("unix://"+filepath.Join(clusterDir, "unilet", "unilet.sock"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	return runtimeapi.NewRuntimeServiceClient(conn)
}

// victim is a unikernel pod whose remains a test looks for.
type victim struct{ name, uid, id, sandbox, ip string }

// leftovers lists what remains of the pod: its QEMU or shim, its network
// namespace, its IP lease (CNI DEL releases it and removes the veth), a
// cgroup, the VM directory and the daemon's records.
func (v victim) leftovers(t *testing.T, rt runtimeapi.RuntimeServiceClient) []string {
	var left []string
	vmDir := filepath.Join(clusterDir, "unilet", "run", "vm", v.id[:16]) // vmm/manager names VM directories so
	for _, q := range testutil.QEMUsUnder(clusterDir) {
		if q.VMDir == vmDir {
			left = append(left, "QEMU "+q.Cmdline)
		}
	}
	for _, pid := range testutil.ShimsServing(vmDir) {
		left = append(left, fmt.Sprintf("shim %d", pid))
	}
	if _, err := os.Stat(filepath.Join(clusterDir, "netns", "unilet-"+v.sandbox)); err == nil {
		left = append(left, "netns unilet-"+v.sandbox)
	}
	if b, err := os.ReadFile(filepath.Join(clusterDir, "cni", "ipam", "unilet-e2e", v.ip)); err == nil && strings.Contains(string(b), v.sandbox) {
		left = append(left, "IP lease "+v.ip)
	}
	// Every plain or unikernel pod of the e2e cluster's first node lives under /kubepods.
	_ = filepath.WalkDir("/sys/fs/cgroup/memory/kubepods", func(p string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() && (strings.Contains(p, v.id) || strings.Contains(p, "pod"+v.uid)) {
			left = append(left, "cgroup "+p)
		}
		return nil
	})
	if _, err := os.Stat(vmDir); err == nil {
		left = append(left, "VM directory "+vmDir)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	pods, err := rt.ListPodSandbox(ctx, &runtimeapi.ListPodSandboxRequest{Filter: &runtimeapi.PodSandboxFilter{Id: v.sandbox}})
	require.NoError(t, err)
	for _, p := range pods.GetItems() {
		left = append(left, "sandbox record "+p.GetId()+" "+p.GetState().String())
	}
	ctrs, err := rt.ListContainers(ctx, &runtimeapi.ListContainersRequest{Filter: &runtimeapi.ContainerFilter{Id: v.id}})
	require.NoError(t, err)
	for _, c := range ctrs.GetContainers() {
		left = append(left, "container record "+c.GetId()+" "+c.GetState().String())
	}
	return left
}
