package cri_test

// Trust tests: races between verbs, a stuck shim, hostile and corrupted
// state on disk, driven through the real daemon with a Go CRI client.

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/internal/testutil"
	"github.com/unilet-dev/unilet/pkg/metadata"
)

// rt is a CRI client of the daemon (closed with the test).
func (d *daemon) rt(t *testing.T) runtimeapi.RuntimeServiceClient {
	conn, err := grpc.NewClient("unix://"+d.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	return runtimeapi.NewRuntimeServiceClient(conn)
}

func vmPodConfig(t *testing.T, name string) *runtimeapi.PodSandboxConfig {
	return &runtimeapi.PodSandboxConfig{
		Metadata:     &runtimeapi.PodSandboxMetadata{Name: name, Namespace: "e2e", Uid: name + "-uid"},
		Annotations:  map[string]string{"kubernetes.io/target-runtime": "unikraft"},
		LogDirectory: filepath.Join(t.TempDir(), "pods", name),
	}
}

func vmContainerConfig(args ...string) *runtimeapi.ContainerConfig {
	return &runtimeapi.ContainerConfig{Metadata: &runtimeapi.ContainerMetadata{Name: "app"}, Image: &runtimeapi.ImageSpec{Image: image()},
		LogPath: "app/0.log", Args: args}
}

// createVM runs a unikernel pod and creates (not starts) its container.
func createVM(t *testing.T, rt runtimeapi.RuntimeServiceClient, name string, args ...string) (pod, ctr string, cfg *runtimeapi.PodSandboxConfig) {
	t.Helper()
	ctx := context.Background()
	cfg = vmPodConfig(t, name)
	p, err := rt.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{Config: cfg})
	require.NoError(t, err)
	c, err := rt.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: p.PodSandboxId, Config: vmContainerConfig(args...), SandboxConfig: cfg})
	require.NoError(t, err)
	return p.PodSandboxId, c.ContainerId, cfg
}

func listedContainers(t *testing.T, rt runtimeapi.RuntimeServiceClient) map[string]runtimeapi.ContainerState {
	resp, err := rt.ListContainers(context.Background(), &runtimeapi.ListContainersRequest{})
	require.NoError(t, err)
	out := map[string]runtimeapi.ContainerState{}
	for _, c := range resp.Containers {
		out[c.Id] = c.State
	}
	return out
}

// vmLeft lists what a container may have left behind: its QEMU and shim
// processes and its VM directory.
func (d *daemon) vmLeft(ctr string) []string {
	dir := filepath.Join(d.stateDir, "vm", ctr[:16])
	var left []string
	left = append(left, qemuProcesses(d.t, dir)...)
	if pids := testutil.ShimsUnder(dir); len(pids) > 0 {
		left = append(left, fmt.Sprintf("unilet-shims %v", pids))
	}
	if _, err := os.Stat(dir); err == nil {
		left = append(left, "directory "+dir)
	}
	return left
}

// Remove sent 0–30 ms into a start: the answer is OK only once nothing of
// the VM is left, and the container does not come back after a crash.
func TestRemoveDuringStart(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "")
	d.must("pull", image())
	rt := d.rt(t)
	ctx := context.Background()
	var removed []string
	for i := 0; i < 10; i++ {
		pod, ctr, _ := createVM(t, rt, fmt.Sprintf("rm-start-%d", i), "tick=50")
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, _ = rt.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: ctr}) // may fail: cancelled
		}()
		time.Sleep(time.Duration(i*3) * time.Millisecond)
		var err error
		if i%2 == 0 {
			_, err = rt.RemoveContainer(ctx, &runtimeapi.RemoveContainerRequest{ContainerId: ctr})
		} else {
			_, err = rt.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: pod})
		}
		require.NoError(t, err)
		require.Empty(t, d.vmLeft(ctr), "remove %d answered OK while the VM was left", i)
		require.NotContains(t, listedContainers(t, rt), ctr)
		wg.Wait()
		require.Empty(t, d.vmLeft(ctr), "a start finished after the remove and left a VM (iteration %d)", i)
		removed = append(removed, ctr)
	}
	d.crash()
	d.start()
	listed := listedContainers(t, d.rt(t))
	for _, ctr := range removed {
		require.NotContains(t, listed, ctr, "a removed container came back after a restart")
	}
	require.Empty(t, qemuProcesses(t, d.stateDir))
}

// A stopped (SIGSTOP) shim affects only its own container: its stop fails
// with DeadlineExceeded within its timeout, every other pod's verbs and
// the passthrough pods keep answering, and removal still ends its VM.
func TestStuckShimAffectsOnlyItsContainer(t *testing.T) {
	ctrd := startContainerd(t)
	d := startDaemon(t, "--upstream-endpoint", "unix://"+ctrd.sock, "--unikernel-registry", regHost)
	d.must("pull", image())
	rt := d.rt(t)
	ctx := context.Background()
	_, stuck, _ := createVM(t, rt, "stuck", "tick=100")
	_, err := rt.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: stuck})
	require.NoError(t, err)
	podB, other, _ := createVM(t, rt, "healthy", "tick=100")
	shims := testutil.ShimsUnder(filepath.Join(d.stateDir, "vm", stuck[:16]))
	require.Len(t, shims, 1)
	shimPid := shims[0]
	pidfd, err := unix.PidfdOpen(shimPid, 0) // signal only this very process
	require.NoError(t, err)
	require.NoError(t, unix.PidfdSendSignal(pidfd, unix.SIGSTOP, nil, 0))
	require.Eventually(t, func() bool { // the signal is asynchronous: wait until it has stopped
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", shimPid))
		return strings.Contains(string(b), ") T ")
	}, 5*time.Second, 5*time.Millisecond)
	t.Cleanup(func() { _ = unix.PidfdSendSignal(pidfd, unix.SIGCONT, nil, 0); _ = unix.Close(pidfd) })

	stopErr := make(chan error, 1)
	t0 := time.Now()
	go func() {
		_, err := rt.StopContainer(ctx, &runtimeapi.StopContainerRequest{ContainerId: stuck, Timeout: 1})
		stopErr <- err
	}()
	require.Eventually(t, func() bool { // the stop now waits on the stuck shim
		return strings.Contains(d.must("inspect", stuck), `"state": "stopping"`)
	}, 10*time.Second, 10*time.Millisecond)
	// Everything else answers meanwhile. The bound is generous (the stuck
	// stop takes 11 s); it proves nothing waits for the stuck shim.
	quick := func(what string, f func() error) {
		t1 := time.Now()
		require.NoError(t, f(), what)
		require.Less(t, time.Since(t1), 3*time.Second, "%s waited for the stuck shim", what)
	}
	quick("status of the stuck container", func() error {
		_, err := rt.ContainerStatus(ctx, &runtimeapi.ContainerStatusRequest{ContainerId: stuck})
		return err
	})
	quick("list", func() error { _, err := rt.ListContainers(ctx, &runtimeapi.ListContainersRequest{}); return err })
	quick("stats", func() error {
		_, err := rt.ListContainerStats(ctx, &runtimeapi.ListContainerStatsRequest{})
		return err
	})
	quick("start another pod's VM", func() error {
		_, err := rt.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: other})
		return err
	})
	quick("stop another pod", func() error {
		_, err := rt.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: podB})
		return err
	})
	quick("remove another pod", func() error {
		_, err := rt.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: podB})
		return err
	})
	plainCfg := &runtimeapi.PodSandboxConfig{Metadata: &runtimeapi.PodSandboxMetadata{Name: "plain", Namespace: "e2e", Uid: "plain-uid"},
		LogDirectory: filepath.Join(t.TempDir(), "plain"),
		Linux: &runtimeapi.LinuxPodSandboxConfig{SecurityContext: &runtimeapi.LinuxSandboxSecurityContext{
			NamespaceOptions: &runtimeapi.NamespaceOption{Network: runtimeapi.NamespaceMode_NODE}}}}
	var plain string
	quick("run a plain pod (passthrough)", func() error {
		r, err := rt.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{Config: plainCfg})
		if err == nil {
			plain = r.PodSandboxId
		}
		return err
	})
	quick("remove the plain pod (passthrough)", func() error {
		_, err := rt.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: plain})
		return err
	})

	err = <-stopErr
	require.Equal(t, codes.DeadlineExceeded, status.Code(err), "%v", err)
	require.Less(t, time.Since(t0), 20*time.Second)
	st, err := rt.ContainerStatus(ctx, &runtimeapi.ContainerStatusRequest{ContainerId: stuck})
	require.NoError(t, err)
	require.Equal(t, runtimeapi.ContainerState_CONTAINER_RUNNING, st.Status.State, "a VM that may run is never reported stopped")

	_, err = rt.RemoveContainer(ctx, &runtimeapi.RemoveContainerRequest{ContainerId: stuck})
	require.NoError(t, err)
	require.Empty(t, d.vmLeft(stuck), "remove answered OK while the stuck VM was left")
}

// Records a corrupted or hand-edited meta.db may hold: the daemon signals
// no process that is not proven its own, touches no path outside its own
// directories, quarantines what it cannot read and still serves.
func TestHostileRecordsAreNotTrusted(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "")
	d.must("pull", image())
	rt := d.rt(t)
	pod, _, _ := createVM(t, rt, "victim-pod")
	d.stop()

	// What a hostile record points at: a process and files of this test.
	canaryDir := t.TempDir()
	canaryFile := filepath.Join(canaryDir, "keep")
	require.NoError(t, os.WriteFile(canaryFile, []byte("x"), 0o644))
	sleeper := exec.Command("sleep", "300")
	require.NoError(t, sleeper.Start())
	t.Cleanup(func() { _ = sleeper.Process.Kill(); _ = sleeper.Wait() })

	db, err := metadata.Open(filepath.Join(d.dir, "root"))
	require.NoError(t, err)
	hostileID := strings.Repeat("ab", 32)
	ccfg, err := proto.Marshal(vmContainerConfig("tick=1"))
	require.NoError(t, err)
	scfg, err := proto.Marshal(vmPodConfig(t, "hostile-pod"))
	require.NoError(t, err)
	require.NoError(t, db.PutContainer(hostileID, map[string]any{
		"id": hostileID, "sandboxId": pod, "config": ccfg, "imageId": "sha256:" + strings.Repeat("0", 64), "state": 1, "phase": "running", "pid": sleeper.Process.Pid,
		"vmDir": canaryDir, "cgroup": "/", "logPath": canaryFile,
		"machine": map[string]any{"Kernel": "/etc/shadow"}, // no QMP socket: an empty marker proved any PID before
	}))
	require.NoError(t, db.PutContainer(strings.Repeat("cd", 32), "not a record"))
	require.NoError(t, db.PutContainer("../../etc", map[string]any{"id": "../../etc", "sandboxId": pod, "state": 1, "vmDir": "/"}))
	hostilePod := strings.Repeat("ef", 32)
	require.NoError(t, db.PutSandbox(hostilePod, map[string]any{"id": hostilePod, "state": 1, "phase": "notready",
		"netns": canaryFile, "netPending": true, "config": scfg}))
	require.NoError(t, db.Close())

	d.start()
	require.NoError(t, syscall.Kill(sleeper.Process.Pid, 0), "the daemon signalled a process it did not prove its own")
	_, err = os.Stat(canaryFile)
	require.NoError(t, err, "the daemon touched a path a record named")
	listed := listedContainers(t, d.rt(t))
	require.Equal(t, runtimeapi.ContainerState_CONTAINER_EXITED, listed[hostileID], "a record of a VM that does not run is not RUNNING")
	require.NotContains(t, listed, strings.Repeat("cd", 32))
	in := d.inspect(hostileID)
	require.Equal(t, "VMLost", in.Status.Reason)
	b, _ := os.ReadFile(d.logFile)
	require.Contains(t, string(b), "quarantined it")

	db2 := func() []metadata.Quarantined {
		d.stop()
		db, err := metadata.Open(filepath.Join(d.dir, "root"))
		require.NoError(t, err)
		defer db.Close()
		q, err := db.Quarantine()
		require.NoError(t, err)
		return q
	}()
	require.Len(t, db2, 2, "the undecodable record and the one with a foreign ID are kept for the operator")
	d.start()
	d.must("rmp", "-f", pod)
	d.must("rmp", "-f", hostilePod)
}

// A corrupted meta.db is moved aside with a loud error; the daemon starts,
// rebuilds the running VM's pod and container from its VM directory, and
// the VM goes on (same ID, same console log).
func TestCorruptedMetaDBIsRebuiltFromRunningVMs(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "")
	pod, ctr := d.runVM(t, "vm-corrupt-db", "tick=100")
	in := d.waitState(ctr, "CONTAINER_RUNNING", 10*time.Second)
	waitLog(t, in.Status.LogPath, "tick 2\n")
	_, stopped := d.runVM(t, "vm-stopped", "count=1")
	d.waitState(stopped, "CONTAINER_EXITED", 10*time.Second)
	d.crash()
	dbPath := filepath.Join(d.dir, "root", metadata.FileName)
	fi, err := os.Stat(dbPath)
	require.NoError(t, err)
	f, err := os.OpenFile(dbPath, os.O_WRONLY, 0)
	require.NoError(t, err)
	junk := make([]byte, fi.Size())
	for i := range junk {
		junk[i] = byte(i*13 + 7)
	}
	_, err = f.WriteAt(junk, 0)
	require.NoError(t, err)
	f.Close()

	d.start()
	require.Equal(t, "CONTAINER_RUNNING", d.inspect(ctr).Status.State, "the running VM was rebuilt")
	require.Contains(t, d.must("pods", "-q"), pod)
	require.Len(t, qemuProcesses(t, d.stateDir), 1)
	waitLog(t, in.Status.LogPath, "tick 6\n")
	aside, _ := filepath.Glob(dbPath + ".corrupt-*")
	require.Len(t, aside, 1, "the corrupted file is kept")
	b, _ := os.ReadFile(d.logFile)
	require.Contains(t, string(b), "metadata store was corrupted")
	d.must("rmp", "-f", pod)
	require.Empty(t, qemuProcesses(t, d.stateDir))
	var left []string
	ents, _ := os.ReadDir(filepath.Join(d.stateDir, "vm"))
	for _, e := range ents {
		left = append(left, e.Name())
	}
	require.Empty(t, left)
}

// Two creates of the same container name race: exactly one wins, the other
// is AlreadyExists (the check and the insertion are one step).
func TestConcurrentCreateOfOneName(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "")
	d.must("pull", image())
	rt := d.rt(t)
	ctx := context.Background()
	cfg := vmPodConfig(t, "twins")
	p, err := rt.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{Config: cfg})
	require.NoError(t, err)
	for round := 0; round < 5; round++ {
		ccfg := vmContainerConfig("tick=50")
		ccfg.Metadata.Attempt = uint32(round)
		var wg sync.WaitGroup
		errs := make([]error, 4)
		for i := range errs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, errs[i] = rt.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: p.PodSandboxId, Config: ccfg, SandboxConfig: cfg})
			}()
		}
		wg.Wait()
		won := 0
		for _, err := range errs {
			if err == nil {
				won++
			} else {
				require.Equal(t, codes.AlreadyExists, status.Code(err), "%v", err)
			}
		}
		require.Equal(t, 1, won, "round %d", round)
	}
	require.Len(t, listedContainers(t, rt), 5)
	d.must("rmp", "-f", p.PodSandboxId)
}

// Network namespace bind files of unilet's form that no sandbox claims (a
// daemon killed while creating one) are removed at start-up; other files
// in the directory are left alone.
func TestStrayNetNSFilesAreSwept(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "")
	d.stop()
	stray := filepath.Join(d.netnsDir, "unilet-"+strings.Repeat("9", 64))
	other := filepath.Join(d.netnsDir, "someone-else")
	require.NoError(t, os.MkdirAll(d.netnsDir, 0o755))
	for _, f := range []string{stray, other} {
		require.NoError(t, os.WriteFile(f, nil, 0o444))
	}
	d.start()
	_, err := os.Stat(stray)
	require.True(t, os.IsNotExist(err), "the stray unilet netns file is still there")
	_, err = os.Stat(other)
	require.NoError(t, err, "a file unilet does not own was touched")
}

// GetContainerEvents (kubelet's evented PLEG) carries the VM containers'
// lifecycle and containerd's events in one stream.
func TestContainerEventsMergeBothSides(t *testing.T) {
	for _, f := range containerdFlavors() {
		t.Run(f.name, func(t *testing.T) { testContainerEvents(t, f) })
	}
}

func testContainerEvents(t *testing.T, f containerdFlavor) {
	ctrd := startContainerdFlavor(t, f)
	d := startDaemon(t, "--upstream-endpoint", "unix://"+ctrd.sock, "--unikernel-registry", regHost)
	d.must("pull", image())
	rt := d.rt(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stream, err := rt.GetContainerEvents(ctx, &runtimeapi.GetEventsRequest{})
	require.NoError(t, err)
	type seen struct {
		mu sync.Mutex
		ev map[string][]runtimeapi.ContainerEventType
	}
	got := &seen{ev: map[string][]runtimeapi.ContainerEventType{}}
	go func() {
		for {
			e, err := stream.Recv()
			if err != nil {
				return
			}
			got.mu.Lock()
			got.ev[e.ContainerId] = append(got.ev[e.ContainerId], e.ContainerEventType)
			got.mu.Unlock()
		}
	}()
	time.Sleep(200 * time.Millisecond) // subscribed on both sides

	pod, ctr := d.runVM(t, "vm-events", "tick=20", "count=2")
	d.waitState(ctr, "CONTAINER_EXITED", 20*time.Second)
	d.must("rm", ctr)

	logDir := filepath.Join(t.TempDir(), "pods", "plain-ev")
	podCfg := writeJSON(t, map[string]any{"metadata": map[string]any{"name": "plain-ev", "namespace": "e2e", "uid": "plain-ev-uid"},
		"log_directory": logDir, "linux": map[string]any{"security_context": map[string]any{"namespace_options": map[string]any{"network": 2}}}})
	plainPod := d.must("runp", podCfg)
	plain := d.must("create", plainPod, writeJSON(t, map[string]any{"metadata": map[string]any{"name": "sh"}, "image": map[string]string{"image": busyboxImage},
		"command": []string{"/bin/sh", "-c", "echo hi"}, "log_path": "sh/0.log"}), podCfg)
	d.must("start", plain)

	vmWant := []runtimeapi.ContainerEventType{runtimeapi.ContainerEventType_CONTAINER_CREATED_EVENT, runtimeapi.ContainerEventType_CONTAINER_STARTED_EVENT,
		runtimeapi.ContainerEventType_CONTAINER_STOPPED_EVENT, runtimeapi.ContainerEventType_CONTAINER_DELETED_EVENT}
	// containerd 1.6 has no container events (Unimplemented; 1.7+ has):
	// then the merged stream carries the unikernel side's and stays open.
	upHasEvents := true
	upConn, err := grpc.NewClient("unix://"+ctrd.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	defer upConn.Close()
	if us, err := runtimeapi.NewRuntimeServiceClient(upConn).GetContainerEvents(ctx, &runtimeapi.GetEventsRequest{}); err == nil {
		first := make(chan error, 1)
		go func() { _, err := us.Recv(); first <- err }()
		select {
		case err := <-first: // a runtime with events blocks until its next one
			upHasEvents = status.Code(err) != codes.Unimplemented
		case <-time.After(time.Second):
		}
	}
	require.Eventually(t, func() bool {
		got.mu.Lock()
		defer got.mu.Unlock()
		return fmt.Sprint(got.ev[ctr]) == fmt.Sprint(vmWant) && (!upHasEvents || len(got.ev[plain]) >= 2)
	}, 20*time.Second, 50*time.Millisecond, "events: %v (upstream has events: %v)", got.ev, upHasEvents)
	d.must("rmp", "-f", pod)
	d.must("rmp", "-f", plainPod)
}

// kubelet's CRI metrics for a unikernel pod come from the VM's cgroup, under the
// names and labels containerd 2.x uses.
func TestVMPodMetrics(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "")
	pod, ctr := d.runVM(t, "vm-metrics", "tick=100")
	d.waitState(ctr, "CONTAINER_RUNNING", 10*time.Second)
	rt := d.rt(t)
	var got map[string]*runtimeapi.Metric
	require.Eventually(t, func() bool {
		m, err := rt.ListPodSandboxMetrics(context.Background(), &runtimeapi.ListPodSandboxMetricsRequest{})
		require.NoError(t, err)
		got = map[string]*runtimeapi.Metric{}
		for _, p := range m.PodMetrics {
			for _, c := range p.ContainerMetrics {
				if p.PodSandboxId == pod && c.ContainerId == ctr {
					for _, x := range c.Metrics {
						got[x.Name] = x
					}
				}
			}
		}
		return got["container_memory_working_set_bytes"].GetValue().GetValue() > 1<<20
	}, 10*time.Second, 100*time.Millisecond, "metrics: %v", got)
	ws := got["container_memory_working_set_bytes"]
	require.Equal(t, []string{"vm-metrics", "e2e", "app", ctr, image()}, ws.LabelValues)
	require.Contains(t, got, "container_cpu_usage_seconds_total")
	require.Equal(t, runtimeapi.MetricType_COUNTER, got["container_cpu_usage_seconds_total"].MetricType)
	desc, err := rt.ListMetricDescriptors(context.Background(), &runtimeapi.ListMetricDescriptorsRequest{})
	require.NoError(t, err)
	var names []string
	for _, x := range desc.Descriptors {
		names = append(names, x.Name)
	}
	require.Contains(t, names, "container_memory_working_set_bytes")
	d.must("rmp", "-f", pod)
}
