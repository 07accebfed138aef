package unikernel

import (
	"context"
	"errors"
	"io"
	"log"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/cri/store"
	"github.com/unilet-dev/unilet/image"
	"github.com/unilet-dev/unilet/pkg/metadata"
	"github.com/unilet-dev/unilet/vmm"
	"github.com/unilet-dev/unilet/vmm/manager"
)

// newTestService is a Service whose VMs are vms (a fresh fakeVMs when nil),
// with no network, logging below a temporary log root.
func newTestService(t *testing.T, cfg Config, vms VMs) *Service {
	t.Helper()
	if cfg.StateDir == "" {
		cfg.StateDir = t.TempDir()
	}
	if vms == nil {
		vms = newFakeVMs(filepath.Join(cfg.StateDir, "vm"))
	}
	s, err := New(cfg, vms, nil, nil)
	require.NoError(t, err)
	return s
}

// testImages is an image store holding one unikernel image (a fake kernel,
// packed and pulled through a loopback registry); it returns the store and
// the image's reference.
func testImages(t *testing.T) (*image.Store, string) {
	t.Helper()
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(srv.Close)
	u, _ := url.Parse(srv.URL)
	kernel := filepath.Join(t.TempDir(), "kernel")
	require.NoError(t, os.WriteFile(kernel, []byte("\x7fELF fake kernel"), 0o755))
	idx, err := image.Pack(image.PackOptions{Kernel: kernel, Args: []string{"serve"}, KConfig: []string{"CONFIG_LIBUKLIBPARAM=y"}})
	require.NoError(t, err)
	ref := u.Host + "/unikraft/app:1"
	r, err := name.ParseReference(ref, name.Insecure)
	require.NoError(t, err)
	require.NoError(t, remote.WriteIndex(r, idx))
	st, err := image.Open(t.TempDir(), []string{u.Host})
	require.NoError(t, err)
	t.Cleanup(func() { st.Close() })
	_, err = st.Pull(context.Background(), ref, nil)
	require.NoError(t, err)
	return st, ref
}

// testPod creates a pod and one container in it; it returns their IDs.
func testPod(t *testing.T, s *Service, ref, name, logRoot string) (string, string) {
	t.Helper()
	ctx := context.Background()
	sbCfg := &runtimeapi.PodSandboxConfig{Metadata: &runtimeapi.PodSandboxMetadata{Name: name, Namespace: "default", Uid: name + "-uid"},
		LogDirectory: filepath.Join(logRoot, name), Linux: &runtimeapi.LinuxPodSandboxConfig{CgroupParent: "/kubepods/" + name}}
	sb, err := s.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{Config: sbCfg})
	require.NoError(t, err)
	c, err := s.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: sb.PodSandboxId, SandboxConfig: sbCfg,
		Config: &runtimeapi.ContainerConfig{Metadata: &runtimeapi.ContainerMetadata{Name: "app"}, Image: &runtimeapi.ImageSpec{Image: ref}, LogPath: "app/0.log"}})
	require.NoError(t, err)
	return sb.PodSandboxId, c.ContainerId
}

func containerState(t *testing.T, s *Service, id string) *runtimeapi.ContainerStatus {
	t.Helper()
	r, err := s.ContainerStatus(context.Background(), &runtimeapi.ContainerStatusRequest{ContainerId: id})
	require.NoError(t, err)
	return r.Status
}

// The verbs drive VMs only through the door: a start hands the VM its
// spec, cgroup and limits; stats, updates, stops, exits, removals and
// failed starts each end in the manager call that releases what the VM
// held, and nothing is left once the pod is gone.
func TestVerbsThroughTheDoor(t *testing.T) {
	ctx := context.Background()
	images, ref := testImages(t)
	logRoot := t.TempDir()
	state := t.TempDir()
	f := newFakeVMs(filepath.Join(state, "vm"))
	s, err := New(Config{StateDir: state, Accel: "tcg", LogRoots: []string{logRoot}}, f, images, nil)
	require.NoError(t, err)

	sb, id := testPod(t, s, ref, "web", logRoot)
	_, err = s.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: id})
	require.NoError(t, err)
	require.Equal(t, []string{"Start " + id}, f.called("Start"))
	vm := f.started[id]
	st := containerState(t, s, id)
	require.Equal(t, runtimeapi.ContainerState_CONTAINER_RUNNING, st.State)
	_, cgs := f.left()
	require.Equal(t, []string{"/fake/kubepods/web/" + id}, cgs, "the VM's cgroup is the pod's parent and the ID")
	require.NotEmpty(t, f.owners[id], "a copy of the records is kept with the VM")

	f.usage = manager.Usage{Timestamp: time.Now(), CPUNanos: 42, WorkingSet: 7 << 20, MemoryLimit: 100 << 20}
	stats, err := s.ContainerStats(ctx, &runtimeapi.ContainerStatsRequest{ContainerId: id})
	require.NoError(t, err)
	require.Equal(t, uint64(42), stats.Stats.Cpu.UsageCoreNanoSeconds.Value)
	require.Equal(t, uint64(7<<20), stats.Stats.Memory.WorkingSetBytes.Value)
	require.Equal(t, uint64(93<<20), stats.Stats.Memory.AvailableBytes.Value)

	_, err = s.UpdateContainerResources(ctx, &runtimeapi.UpdateContainerResourcesRequest{ContainerId: id,
		Linux: &runtimeapi.LinuxContainerResources{MemoryLimitInBytes: 512 << 20}})
	require.NoError(t, err)
	require.Equal(t, int64(512<<20), f.cgroups["/fake/kubepods/web/"+id].MemoryLimit)

	// The guest powers off by itself: the exit is recorded and released.
	vm.end(vmm.ExitStatus{Code: 3, Reason: vmm.ReasonError, FinishedAt: time.Now()})
	require.Eventually(t, func() bool {
		return containerState(t, s, id).State == runtimeapi.ContainerState_CONTAINER_EXITED
	}, 5*time.Second, 10*time.Millisecond)
	require.EqualValues(t, 3, containerState(t, s, id).ExitCode)
	require.Equal(t, []string{"Release " + id}, f.called("Release"))
	dirs, cgs := f.left()
	require.Empty(t, dirs)
	require.Empty(t, cgs)
	_, err = s.RemoveContainer(ctx, &runtimeapi.RemoveContainerRequest{ContainerId: id})
	require.NoError(t, err)
	_, err = s.ContainerStatus(ctx, &runtimeapi.ContainerStatusRequest{ContainerId: id})
	require.ErrorIs(t, err, store.ErrNotFound)

	// A start that fails leaves the container EXITED with StartError.
	_, err = s.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: sb})
	require.NoError(t, err)
	_, err = s.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: sb})
	require.NoError(t, err)
	_, id2 := testPod(t, s, ref, "broken", logRoot)
	f.startErr = errors.New("QEMU said no")
	_, err = s.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: id2})
	require.ErrorContains(t, err, "QEMU said no")
	st = containerState(t, s, id2)
	require.Equal(t, runtimeapi.ContainerState_CONTAINER_EXITED, st.State)
	require.Equal(t, vmm.ReasonStartFailed, st.Reason)
	f.startErr = nil

	// A stop hands the VM its grace period and releases it.
	sb3, id3 := testPod(t, s, ref, "stopped", logRoot)
	_, err = s.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: id3})
	require.NoError(t, err)
	_, err = s.StopContainer(ctx, &runtimeapi.StopContainerRequest{ContainerId: id3, Timeout: 5})
	require.NoError(t, err)
	require.Equal(t, 5*time.Second, f.started[id3].stopped)
	require.Equal(t, runtimeapi.ContainerState_CONTAINER_EXITED, containerState(t, s, id3).State)
	_, err = s.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: sb3})
	require.NoError(t, err)
	require.Contains(t, f.called("DropStaging"), "DropStaging "+sb3)
	dirs, cgs = f.left()
	require.Empty(t, dirs, "VM directories left")
	require.Empty(t, cgs, "cgroups left")
}

// A restarted daemon settles every restored container through the door
// alone: a live VM is adopted, one that ended meanwhile reports the exit
// its shim recorded, one whose shim is gone without a record is reported
// lost (its QEMU, proven, is ended), a shim that does not answer leaves its
// container UNKNOWN until it does, and VM directories no record claims are
// swept.
func TestRestartReconcilesThroughTheDoor(t *testing.T) {
	ctx := context.Background()
	images, ref := testImages(t)
	logRoot, state, metaDir := t.TempDir(), t.TempDir(), t.TempDir()
	meta, err := metadata.Open(metaDir)
	require.NoError(t, err)
	f1 := newFakeVMs(filepath.Join(state, "vm"))
	s1, err := New(Config{StateDir: state, Accel: "tcg", LogRoots: []string{logRoot}}, f1, images, meta)
	require.NoError(t, err)
	ids := map[string]string{}
	for _, n := range []string{"adopted", "ended", "lost", "frozen"} {
		_, ids[n] = testPod(t, s1, ref, n, logRoot)
		_, err = s1.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: ids[n]})
		require.NoError(t, err)
	}
	lostPid := f1.started[ids["lost"]].Pid()
	s1.Shutdown() // the daemon goes away; its VMs run on
	require.NoError(t, meta.Close())

	f2 := newFakeVMs(filepath.Join(state, "vm"))
	for d := range f1.dirs {
		f2.dirs[d] = true
	}
	stray := "0123456789abcdef"
	f2.dirs[stray] = true
	live := newFakeVM(4242)
	f2.reconnect[ids["adopted"]] = func() (manager.VM, error) { return live, nil }
	f2.exits[ids["ended"]] = vmm.ExitStatus{Code: 7, Reason: vmm.ReasonError, FinishedAt: time.Now()}
	answer := make(chan struct{})
	frozen := newFakeVM(4343)
	f2.reconnect[ids["frozen"]] = func() (manager.VM, error) {
		select {
		case <-answer:
			return frozen, nil
		default:
			return nil, manager.ErrShimNotAnswering
		}
	}
	meta, err = metadata.Open(metaDir)
	require.NoError(t, err)
	defer meta.Close()
	s2, err := New(Config{StateDir: state, Accel: "tcg", LogRoots: []string{logRoot}}, f2, images, meta)
	require.NoError(t, err)
	t0 := time.Now()
	require.NoError(t, s2.Load())
	require.Less(t, time.Since(t0), AdoptWait+time.Second, "a shim that does not answer holds the restart up to AdoptWait only")

	st := containerState(t, s2, ids["adopted"])
	require.Equal(t, runtimeapi.ContainerState_CONTAINER_RUNNING, st.State)
	st = containerState(t, s2, ids["ended"])
	require.Equal(t, runtimeapi.ContainerState_CONTAINER_EXITED, st.State)
	require.EqualValues(t, 7, st.ExitCode)
	st = containerState(t, s2, ids["lost"])
	require.Equal(t, runtimeapi.ContainerState_CONTAINER_EXITED, st.State)
	require.Equal(t, ReasonVMLost, st.Reason)
	require.Contains(t, f2.called("KillStray"), "KillStray "+ids["lost"]+" "+itoa(lostPid), "the QEMU left without its shim is ended")
	st = containerState(t, s2, ids["frozen"])
	require.Equal(t, runtimeapi.ContainerState_CONTAINER_UNKNOWN, st.State)
	require.Equal(t, ReasonShimNotAnswering, st.Reason)
	_, err = s2.StopContainer(ctx, &runtimeapi.StopContainerRequest{ContainerId: ids["frozen"]})
	require.Equal(t, codes.Unavailable, status.Code(err), "a stop of an unadopted VM fails, the VM is left alone: %v", err)

	dirs, _ := f2.left()
	require.Equal(t, []string{stray}, f2.swept, "only the directory no record claims is swept")
	require.Equal(t, sortedStrings([]string{ids["adopted"][:16], ids["frozen"][:16]}), dirs)
	require.NotEmpty(t, f2.called("SweepCgroups"))

	close(answer) // the frozen shim answers again: adopted
	require.Eventually(t, func() bool {
		return containerState(t, s2, ids["frozen"]).State == runtimeapi.ContainerState_CONTAINER_RUNNING
	}, 5*time.Second, 20*time.Millisecond)
	require.EqualValues(t, 4343, s2Pid(t, s2, ids["frozen"]))

	// The adopted VM is driven as any other: its exit is recorded.
	live.end(vmm.ExitStatus{Code: 0, Reason: vmm.ReasonCompleted, FinishedAt: time.Now()})
	require.Eventually(t, func() bool {
		return containerState(t, s2, ids["adopted"]).State == runtimeapi.ContainerState_CONTAINER_EXITED
	}, 5*time.Second, 10*time.Millisecond)
	require.Contains(t, f2.called("Release"), "Release "+ids["adopted"])
}

func s2Pid(t *testing.T, s *Service, id string) int {
	c, err := s.containers.Get(id)
	require.NoError(t, err)
	return c.Status().Pid
}

func itoa(i int) string { return strconv.Itoa(i) }

func sortedStrings(l []string) []string {
	out := append([]string(nil), l...)
	sort.Strings(out)
	return out
}
