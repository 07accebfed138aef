package cri_test

// The second adversarial pass, as regression tests through the real daemon:
// each test makes its own decoys (a process in a cgroup of its own, a
// loopback listener, a canary directory) and checks unilet leaves them be.

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	imagestore "github.com/unilet-dev/unilet/image"
	"github.com/unilet-dev/unilet/internal/testutil"
	"github.com/unilet-dev/unilet/pkg/cgroups"
	"github.com/unilet-dev/unilet/pkg/metadata"
)

// qemuPid is the PID of a running container's QEMU (from verbose status).
func qemuPid(t *testing.T, rt runtimeapi.RuntimeServiceClient, ctr string) int {
	t.Helper()
	st, err := rt.ContainerStatus(context.Background(), &runtimeapi.ContainerStatusRequest{ContainerId: ctr, Verbose: true})
	require.NoError(t, err)
	pid, err := strconv.Atoi(st.Info["pid"])
	require.NoError(t, err)
	return pid
}

// running reports whether pid is a process that has not exited (a zombie
// whose parent has not reaped it yet counts as ended).
func running(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	return len(f) > 0 && f[0] != "Z"
}

// startVM runs a pod (cfg) and starts one container in it.
func startVM(t *testing.T, rt runtimeapi.RuntimeServiceClient, cfg *runtimeapi.PodSandboxConfig, args ...string) (pod, ctr string) {
	t.Helper()
	ctx := context.Background()
	p, err := rt.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{Config: cfg})
	require.NoError(t, err)
	c, err := rt.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: p.PodSandboxId, Config: vmContainerConfig(args...), SandboxConfig: cfg})
	require.NoError(t, err)
	_, err = rt.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: c.ContainerId})
	require.NoError(t, err)
	return p.PodSandboxId, c.ContainerId
}

// A pod whose cgroup_parent is someone else's cgroup: after a daemon
// restart, that parent's other children — named like container IDs, as
// Docker's and kubelet's are — keep their cgroups and processes; unilet
// removes only the cgroup it made for its VM.
func TestForeignCgroupParentIsLeftAlone(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "")
	d.must("pull", image())
	foreign := "/unilet-e2e-foreign/" + filepath.Base(d.dir)
	t.Cleanup(func() { cgroups.RemoveTree(foreign); cgroups.RemoveIfEmpty(path.Dir(foreign)) })
	decoyCg := path.Join(foreign, strings.Repeat("d", 64))
	cg, err := cgroups.Create(decoyCg, cgroups.Resources{})
	require.NoError(t, err)
	_, err = cgroups.Create(path.Join(foreign, "stage-dddddddddddd"), cgroups.Resources{})
	require.NoError(t, err)
	decoy := exec.Command("sleep", "300")
	require.NoError(t, decoy.Start())
	t.Cleanup(func() { _ = decoy.Process.Kill(); _ = decoy.Wait() })
	require.NoError(t, cg.Add(decoy.Process.Pid))

	rt := d.rt(t)
	cfg := vmPodConfig(t, "foreign-parent")
	cfg.Linux = &runtimeapi.LinuxPodSandboxConfig{CgroupParent: foreign}
	pod, ctr := startVM(t, rt, cfg, "tick=100")
	require.True(t, cgroups.Exists(path.Join(foreign, ctr)), "the VM's cgroup is under the pod's parent")

	d.crash()
	d.start()
	require.True(t, running(decoy.Process.Pid), "a process in a cgroup unilet did not make was signalled")
	require.True(t, cgroups.Exists(decoyCg), "a cgroup unilet did not make was removed")
	require.True(t, cgroups.Exists(path.Join(foreign, "stage-dddddddddddd")))
	require.Equal(t, runtimeapi.ContainerState_CONTAINER_RUNNING, listedContainers(t, rt)[ctr])

	_, err = rt.RemovePodSandbox(context.Background(), &runtimeapi.RemovePodSandboxRequest{PodSandboxId: pod})
	require.NoError(t, err)
	require.False(t, cgroups.Exists(path.Join(foreign, ctr)), "unilet's own cgroup is removed")
	require.True(t, cgroups.Exists(decoyCg))
	require.True(t, running(decoy.Process.Pid))
}

// rewriteSandbox changes a stored sandbox record while the daemon is down.
func rewriteSandbox(t *testing.T, d *daemon, pod string, fn func(rec map[string]any)) {
	t.Helper()
	db, err := metadata.Open(filepath.Join(d.dir, "root"))
	require.NoError(t, err)
	defer db.Close()
	var rec map[string]any
	require.NoError(t, db.EachSandbox(func(k, v []byte) error {
		if string(k) == pod {
			return json.Unmarshal(v, &rec)
		}
		return nil
	}))
	require.NotNil(t, rec)
	fn(rec)
	require.NoError(t, db.PutSandbox(pod, rec))
}

// A stored record cannot make port-forward dial a host address. A routed
// pod's guest is dialled at its fixed address from inside the pod's own
// network namespace, so a CNI result changed to name a loopback address
// changes nothing; a guest network changed to name one is refused when the
// record loads (quarantined). The decoy, a loopback listener of this test,
// is never reached.
func TestTamperedPodAddressIsNotDialled(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "")
	d.must("pull", image())
	rt := d.rt(t)
	pod, _ := startVM(t, rt, vmPodConfig(t, "tampered-ip"), "tick=100")
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer lis.Close()
	accepted := make(chan struct{}, 1)
	go func() {
		if c, err := lis.Accept(); err == nil {
			accepted <- struct{}{}
			c.Close()
		}
	}()
	port := lis.Addr().(*net.TCPAddr).Port

	d.stop()
	rewriteSandbox(t, d, pod, func(rec map[string]any) {
		rec["net"].(map[string]any)["ips"] = []string{"127.0.0.1/8"}
	})
	d.start()
	local, pfOut := d.portForward(pod, port)
	forwarded := false
	for end := time.Now().Add(10 * time.Second); time.Now().Before(end) && !forwarded; time.Sleep(100 * time.Millisecond) {
		if c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", local), time.Second); err == nil {
			_, _ = c.Write([]byte("hello\n"))
			_, _ = c.Read(make([]byte, 1))
			c.Close()
			forwarded = true
		}
	}
	require.True(t, forwarded, "crictl port-forward never listened: %s", pfOut.String())
	select {
	case <-accepted:
		t.Fatal("the daemon dialled a host address a record named")
	case <-time.After(2 * time.Second):
	}

	d.stop()
	rewriteSandbox(t, d, pod, func(rec map[string]any) {
		g := rec["guest"].(map[string]any)
		g["addr"], g["gateway"] = "127.0.0.2/8", "127.0.0.1"
	})
	d.start()
	_, err = rt.PortForward(context.Background(), &runtimeapi.PortForwardRequest{PodSandboxId: pod, Port: []int32{int32(port)}})
	require.Equal(t, codes.NotFound, status.Code(err), "a guest network naming loopback is refused at load: %v", err)
	select {
	case <-accepted:
		t.Fatal("the daemon dialled a host address a record named")
	case <-time.After(500 * time.Millisecond):
	}
}

// Pod log directories must lie in --pod-log-root: a request naming another
// is refused, and a record changed to name one (a canary directory of this
// test) is not used — the shim, root, never creates a file there.
func TestLogDirectoryOutsideTheLogRoot(t *testing.T) {
	logRoot := t.TempDir()
	d := startDaemon(t, "--upstream-endpoint", "", "--pod-log-root", logRoot)
	d.must("pull", image())
	rt := d.rt(t)
	canary := t.TempDir()
	cfg := vmPodConfig(t, "log-outside")
	cfg.LogDirectory = canary
	_, err := rt.RunPodSandbox(context.Background(), &runtimeapi.RunPodSandboxRequest{Config: cfg})
	require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)
	require.ErrorContains(t, err, "--pod-log-root")

	cfg.LogDirectory = filepath.Join(logRoot, "e2e_log-outside_uid")
	p, err := rt.RunPodSandbox(context.Background(), &runtimeapi.RunPodSandboxRequest{Config: cfg})
	require.NoError(t, err)
	c, err := rt.CreateContainer(context.Background(), &runtimeapi.CreateContainerRequest{PodSandboxId: p.PodSandboxId,
		Config: vmContainerConfig("tick=100"), SandboxConfig: cfg})
	require.NoError(t, err)
	d.stop()
	rewriteSandbox(t, d, p.PodSandboxId, func(rec map[string]any) {
		var sc runtimeapi.PodSandboxConfig
		raw, err := json.Marshal(rec["config"])
		require.NoError(t, err)
		var b []byte
		require.NoError(t, json.Unmarshal(raw, &b))
		require.NoError(t, proto.Unmarshal(b, &sc))
		sc.LogDirectory = canary
		b, err = proto.Marshal(&sc)
		require.NoError(t, err)
		rec["config"] = b
	})
	d.start()
	_, err = rt.StartContainer(context.Background(), &runtimeapi.StartContainerRequest{ContainerId: c.ContainerId})
	require.Error(t, err, "a container whose pod's log directory left the log root was started")
	ents, _ := os.ReadDir(canary)
	require.Empty(t, ents, "the daemon or shim wrote outside the log root")
	b, _ := os.ReadFile(d.logFile)
	require.Contains(t, string(b), "outside the pod log roots")
	_, err = rt.RemovePodSandbox(context.Background(), &runtimeapi.RemovePodSandboxRequest{PodSandboxId: p.PodSandboxId})
	require.NoError(t, err)
}

// An image's least-memory label cannot lift a VM above --max-memory: the
// container is refused naming the label and the bound.
func TestImageMinMemoryAboveMaxMemory(t *testing.T) {
	reg := testutil.NewHostileRegistry(t)
	d := startDaemon(t, "--upstream-endpoint", "", "--insecure-registry", reg.Host, "--max-memory", "512")
	idx, err := imagestore.Pack(imagestore.PackOptions{Kernel: kernel, Args: []string{"tick=100"},
		Labels: map[string]string{"dev.unilet.min-memory": "200000"}})
	require.NoError(t, err)
	ref := reg.Host + "/unikraft/bigmem:1"
	tag, err := name.NewTag(ref, name.Insecure)
	require.NoError(t, err)
	require.NoError(t, remote.WriteIndex(tag, idx))
	d.must("pull", ref)
	rt := d.rt(t)
	cfg := vmPodConfig(t, "bigmem")
	p, err := rt.RunPodSandbox(context.Background(), &runtimeapi.RunPodSandboxRequest{Config: cfg})
	require.NoError(t, err)
	cc := vmContainerConfig()
	cc.Image.Image = ref
	_, err = rt.CreateContainer(context.Background(), &runtimeapi.CreateContainerRequest{PodSandboxId: p.PodSandboxId, Config: cc, SandboxConfig: cfg})
	require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)
	require.ErrorContains(t, err, "dev.unilet.min-memory")
	require.ErrorContains(t, err, "--max-memory")
	require.Empty(t, testutil.QEMUsUnder(d.dir))
}

// Two shims stopped (SIGSTOP), then the daemon killed: the new daemon
// serves at once, reports both containers CONTAINER_UNKNOWN (reason
// ShimNotAnswering) without killing their VMs, adopts a shim once it
// answers, refuses a stop meanwhile, and still removes the pod of the
// other (its shim killed, proven unilet's).
func TestFrozenShimsDoNotStallARestart(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "")
	d.must("pull", image())
	rt := d.rt(t)
	_, ctr1 := startVM(t, rt, vmPodConfig(t, "frozen-1"), "tick=100")
	pod2, ctr2 := startVM(t, rt, vmPodConfig(t, "frozen-2"), "tick=100")
	q1, q2 := qemuPid(t, rt, ctr1), qemuPid(t, rt, ctr2)
	s1, s2 := parentPid(q1), parentPid(q2)
	for _, s := range []int{s1, s2} {
		require.NoError(t, syscall.Kill(s, syscall.SIGSTOP))
		t.Cleanup(func() { _ = syscall.Kill(s, syscall.SIGCONT) })
	}
	d.crash()
	t0 := time.Now()
	d.start() // fails the test unless the socket serves within 15 s
	t.Logf("the daemon served %s after its start with two frozen shims", time.Since(t0).Round(time.Millisecond))
	listed := listedContainers(t, rt)
	for _, c := range []string{ctr1, ctr2} {
		require.Equal(t, runtimeapi.ContainerState_CONTAINER_UNKNOWN, listed[c])
		st, err := rt.ContainerStatus(context.Background(), &runtimeapi.ContainerStatusRequest{ContainerId: c})
		require.NoError(t, err)
		require.Equal(t, "ShimNotAnswering", st.Status.Reason)
	}
	_, err := rt.StopContainer(context.Background(), &runtimeapi.StopContainerRequest{ContainerId: ctr1})
	require.Equal(t, codes.Unavailable, status.Code(err), "%v", err)
	for _, q := range []int{q1, q2} {
		require.True(t, running(q), "a VM was killed because its shim was slow")
	}

	require.NoError(t, syscall.Kill(s1, syscall.SIGCONT))
	require.Eventually(t, func() bool { return listedContainers(t, rt)[ctr1] == runtimeapi.ContainerState_CONTAINER_RUNNING },
		40*time.Second, 100*time.Millisecond, "a shim that answers later is adopted")
	require.Equal(t, q1, qemuPid(t, rt, ctr1), "the same VM")
	_, err = rt.StopContainer(context.Background(), &runtimeapi.StopContainerRequest{ContainerId: ctr1, Timeout: 10})
	require.NoError(t, err)
	require.Equal(t, "Completed", d.inspect(ctr1).Status.Reason)

	_, err = rt.RemovePodSandbox(context.Background(), &runtimeapi.RemovePodSandboxRequest{PodSandboxId: pod2})
	require.NoError(t, err, "a removal is forced")
	require.Empty(t, d.vmLeft(ctr2))
	require.False(t, running(s2), "the frozen shim was killed")
}

// RemovePodSandbox of a pod whose shim is frozen succeeds (a removal is
// forced): its shim and QEMU are killed and nothing of the VM is left.
func TestRemovePodWithFrozenShim(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "")
	d.must("pull", image())
	rt := d.rt(t)
	pod, ctr := startVM(t, rt, vmPodConfig(t, "frozen-rm"), "tick=100")
	shimPid := parentPid(qemuPid(t, rt, ctr))
	require.NoError(t, syscall.Kill(shimPid, syscall.SIGSTOP))
	t.Cleanup(func() { _ = syscall.Kill(shimPid, syscall.SIGCONT) })
	_, err := rt.RemovePodSandbox(context.Background(), &runtimeapi.RemovePodSandboxRequest{PodSandboxId: pod})
	require.NoError(t, err)
	require.Empty(t, d.vmLeft(ctr))
	require.NotContains(t, listedContainers(t, rt), ctr)
}

// A volume's host directory swapped for a symlink between CreateContainer
// and StartContainer: the start fails naming it; the symlink's target (a
// canary of this test) is never exported to the guest.
func TestVolumeSwappedForASymlinkBeforeStart(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "")
	d.must("pull", image())
	rt := d.rt(t)
	base := t.TempDir()
	require.NoError(t, os.Chmod(base, 0o755))
	vol, canary := filepath.Join(base, "vol"), filepath.Join(base, "canary")
	require.NoError(t, os.Mkdir(vol, 0o777))
	require.NoError(t, os.Mkdir(canary, 0o777))
	cfg := vmPodConfig(t, "swap-vol")
	p, err := rt.RunPodSandbox(context.Background(), &runtimeapi.RunPodSandboxRequest{Config: cfg})
	require.NoError(t, err)
	cc := vmContainerConfig("tick=100")
	cc.Mounts = []*runtimeapi.Mount{{ContainerPath: "/data", HostPath: vol}}
	c, err := rt.CreateContainer(context.Background(), &runtimeapi.CreateContainerRequest{PodSandboxId: p.PodSandboxId, Config: cc, SandboxConfig: cfg})
	require.NoError(t, err)
	require.NoError(t, os.Remove(vol))
	require.NoError(t, os.Symlink(canary, vol))
	_, err = rt.StartContainer(context.Background(), &runtimeapi.StartContainerRequest{ContainerId: c.ContainerId})
	require.ErrorContains(t, err, "no longer the directory checked")
	require.Empty(t, testutil.QEMUsUnder(d.dir))
	_, err = rt.RemovePodSandbox(context.Background(), &runtimeapi.RemovePodSandboxRequest{PodSandboxId: p.PodSandboxId})
	require.NoError(t, err)
}

// Attach URLs requested by the thousand and never used do not make the
// node's attach and port-forward fail: the oldest unused are revoked.
func TestUnusedStreamingURLsAreBounded(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "")
	d.must("pull", image())
	rt := d.rt(t)
	pod, ctr := startVM(t, rt, vmPodConfig(t, "url-flood"), "tick=100")
	for i := 0; i < 1100; i++ {
		_, err := rt.Attach(context.Background(), &runtimeapi.AttachRequest{ContainerId: ctr, Stdout: true})
		require.NoError(t, err, "attach URL %d", i)
	}
	_, err := rt.PortForward(context.Background(), &runtimeapi.PortForwardRequest{PodSandboxId: pod, Port: []int32{8080}})
	require.NoError(t, err)
	// The newest URL works: crictl attach reaches the console.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, crictl, "--runtime-endpoint", "unix://"+d.sock, "attach", ctr)
	var out syncBuf
	cmd.Stdout, cmd.Stderr = &out, &out
	_ = cmd.Run() // ends by the timeout: it follows the console
	require.Contains(t, out.String(), "tick", "crictl attach: %s", out.String())
	_, err = rt.RemovePodSandbox(context.Background(), &runtimeapi.RemovePodSandboxRequest{PodSandboxId: pod})
	require.NoError(t, err)
}
