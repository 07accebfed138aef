package unikernel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	goruntime "runtime"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/cri/errdefs"
	"github.com/unilet-dev/unilet/cri/store"
	"github.com/unilet-dev/unilet/image"
	"github.com/unilet-dev/unilet/internal/testutil"
	"github.com/unilet-dev/unilet/vmm"
	"github.com/unilet-dev/unilet/vmm/manager"
)

func TestDedupEnvLaterWins(t *testing.T) {
	require.Equal(t, []string{"B=2", "A=3", "C="}, dedupEnv([]string{"A=1", "B=2", "A=3", "C="}))
}

func runningContainer(t *testing.T, cgroup string) (*Service, string) {
	return runningContainerWith(t, cgroup, &runtimeapi.ContainerConfig{}, newFakeVM(0))
}

func runningContainerWith(t *testing.T, cgroup string, cfg *runtimeapi.ContainerConfig, vm manager.VM) (*Service, string) {
	t.Helper()
	s := newTestService(t, Config{}, nil)
	id := strings.Repeat("c", 64)
	cfg.Metadata = &runtimeapi.ContainerMetadata{Name: "app"}
	s.containers.Restore(id, containerMeta{Config: cfg,
		Image: &image.Image{ID: "sha256:x"}, Machine: vmm.MachineConfig{MemoryMiB: 64}, Cgroup: cgroup},
		containerStatus{State: store.ContainerRunning, Sizing: Sizing{MemoryMiB: 64, MemoryLimit: 100 << 20}, vm: vm})
	return s, id
}

// consoleVM's console echoes its input until the session ends.
type consoleVM struct{ fakeVM }

func (c *consoleVM) Attach(ctx context.Context, in io.Reader, out io.Writer) error {
	go func() { _, _ = io.Copy(out, in) }()
	<-ctx.Done()
	return nil
}

// A stdin_once container's attach session ends once the client's stdin ended
// and the console went quiet (a VM cannot be shown EOF); others go on.
func TestAttachStdinOnceEndsWithStdin(t *testing.T) {
	s, id := runningContainerWith(t, "", &runtimeapi.ContainerConfig{Stdin: true, StdinOnce: true}, &consoleVM{})
	var out testutil.SyncBuf
	start := time.Now()
	require.NoError(t, s.StreamRuntime().Attach(context.Background(), id, strings.NewReader("echo hi\n"), nopCloser{&out}, nil, false, nil))
	require.Less(t, time.Since(start), StdinOnceLinger+2*time.Second)
	require.GreaterOrEqual(t, time.Since(start), StdinOnceLinger)
	require.Equal(t, "echo hi\n", out.String(), "output before the end of stdin is delivered")

	s, id = runningContainerWith(t, "", &runtimeapi.ContainerConfig{Stdin: true}, &consoleVM{})
	ctx, cancel := context.WithTimeout(context.Background(), StdinOnceLinger+time.Second)
	defer cancel()
	require.NoError(t, s.StreamRuntime().Attach(ctx, id, strings.NewReader("x"), nopCloser{&out}, nil, false, nil))
	require.ErrorIs(t, ctx.Err(), context.DeadlineExceeded, "without stdin_once the session outlives the client's stdin")
}

type nopCloser struct{ io.Writer }

func (nopCloser) Close() error { return nil }

// A non-tty attach has no resize channel: nothing may wait on it forever.
func TestAttachWithoutResizeLeavesNoGoroutine(t *testing.T) {
	s, id := runningContainer(t, "")
	before := goruntime.NumGoroutine()
	for i := 0; i < 50; i++ {
		require.NoError(t, s.StreamRuntime().Attach(context.Background(), id, nil, nil, nil, false, nil))
	}
	require.Eventually(t, func() bool { return goruntime.NumGoroutine()-before < 10 }, 5*time.Second, 10*time.Millisecond,
		"attach sessions left goroutines behind")
}

// New limits are recorded only once the cgroup took them.
func TestUpdateResourcesRecordsOnlyWhatTheCgroupTook(t *testing.T) {
	s, id := runningContainer(t, "/unilet-test-missing/"+strings.Repeat("c", 64))
	_, err := s.UpdateContainerResources(context.Background(), &runtimeapi.UpdateContainerResourcesRequest{ContainerId: id,
		Linux: &runtimeapi.LinuxContainerResources{MemoryLimitInBytes: 512 << 20, CpuQuota: 50000, CpuPeriod: 100000}})
	require.Error(t, err)
	c, err := s.containers.Get(id)
	require.NoError(t, err)
	require.Equal(t, int64(100<<20), c.Status().Sizing.MemoryLimit, "sizes recorded although the cgroup update failed")
	require.Zero(t, c.Status().Sizing.CPUQuota)
}

func TestContainerLogPathStaysInThePodLogDirectory(t *testing.T) {
	s := &Service{cfg: Config{LogRoots: []string{"/var/log/pods"}}}
	p, err := s.containerLogPath("/var/log/pods/x", "app/0.log")
	require.NoError(t, err)
	require.Equal(t, "/var/log/pods/x/app/0.log", p)
	for _, bad := range []string{"../../../etc/passwd", "/etc/passwd", "app/../../y", ".", "app/.."} {
		_, err := s.containerLogPath("/var/log/pods/x", bad)
		require.Error(t, err, bad)
	}
	p, err = s.containerLogPath("", "app/0.log")
	require.NoError(t, err)
	require.Empty(t, p, "no log directory: no log")
}

// A pod's log directory (from a request or a record) must lie in a log
// root, also once symlinks are resolved: the shim creates the log file as
// root.
func TestLogDirectoryInsideTheLogRoots(t *testing.T) {
	root := t.TempDir()
	outside := t.TempDir()
	require.NoError(t, os.Symlink(outside, filepath.Join(root, "link")))
	s := &Service{cfg: Config{LogRoots: []string{root}}}
	require.NoError(t, s.checkLogDir(filepath.Join(root, "ns_pod_uid")))
	require.NoError(t, s.checkLogDir(filepath.Join(root, "not", "made", "yet")))
	for _, bad := range []string{outside, "/etc", root + "/../x", filepath.Join(root, "link", "pod"), "relative/dir"} {
		_, err := s.containerLogPath(bad, "app/0.log")
		require.ErrorContains(t, err, "log", bad)
	}
	require.Error(t, (&Service{}).checkLogDir("/var/log/pods/x"), "no roots: nothing is allowed")
}

func TestCreateRefusesRunAsGroupWithoutUser(t *testing.T) {
	s := newTestService(t, Config{}, nil)
	_, err := s.CreateContainer(context.Background(), &runtimeapi.CreateContainerRequest{PodSandboxId: strings.Repeat("a", 64),
		Config: &runtimeapi.ContainerConfig{Metadata: &runtimeapi.ContainerMetadata{Name: "app"}, Image: &runtimeapi.ImageSpec{Image: "x"},
			Linux: &runtimeapi.LinuxContainerConfig{SecurityContext: &runtimeapi.LinuxContainerSecurityContext{RunAsGroup: &runtimeapi.Int64Value{Value: 1}}}}})
	require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)
	require.ErrorContains(t, err, "run_as_group")
}

func TestPullErrorCodes(t *testing.T) {
	for _, c := range []struct {
		err  error
		code codes.Code
	}{
		{fmt.Errorf("x: %w", &image.LimitError{What: "kernel", Limit: 1 << 20}), codes.ResourceExhausted},
		{fmt.Errorf("x: %w", image.ErrStalled), codes.DeadlineExceeded},
		{context.DeadlineExceeded, codes.DeadlineExceeded},
		{&image.VerifyError{What: "layer 0", Digest: "sha256:x"}, codes.DataLoss},
		{fmt.Errorf("y: %w", image.ErrNotUnikernel), codes.FailedPrecondition},
		{fmt.Errorf("z: %w", &transport.Error{StatusCode: http.StatusNotFound}), codes.NotFound},
		{errors.New("other"), codes.Unknown},
	} {
		require.Equal(t, c.code, errdefs.Code(pullKind(c.err)), "%v", c.err)
	}
}

// What ImageStatus verbose and crictl inspecti show of a unikernel image.
func TestImageView(t *testing.T) {
	dir := t.TempDir()
	kernel, initrd := dir+"/k", dir+"/i"
	require.NoError(t, os.WriteFile(kernel, make([]byte, 1234), 0o644))
	require.NoError(t, os.WriteFile(initrd, make([]byte, 56), 0o644))
	img := &image.Image{ID: "sha256:abc", Kernel: kernel, Initrd: initrd,
		Features:    []string{"CONFIG_LIBUKBOOT=y", "CONFIG_HZ=100", "CONFIG_CROSS_COMPILE="},
		Annotations: map[string]string{image.AnnotationKernelVersion: "0.17.0~eaf6fda1"}}
	v := imageView(img)
	require.Equal(t, int64(1234), v.KernelSize)
	require.Equal(t, int64(56), v.InitrdSize)
	require.Equal(t, "0.17.0~eaf6fda1", v.UnikraftVersion)
	require.Equal(t, []string{"LIBUKBOOT"}, v.Enabled)
	require.Equal(t, map[string]string{"HZ": "100", "CROSS_COMPILE": ""}, v.Settings)
	a := toAPIImage(img).GetSpec().GetAnnotations()
	require.Equal(t, "1234", a[AnnotationImageKernelSize])
	require.Equal(t, "56", a[AnnotationImageInitrdSize])
	require.Equal(t, "3", a[AnnotationImageFeatures])
	require.Equal(t, "0.17.0~eaf6fda1", a[image.AnnotationKernelVersion])
}
