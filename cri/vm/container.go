package vm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/sirupsen/logrus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/image"
	"github.com/unilet-dev/unilet/runtime"
	"github.com/unilet-dev/unilet/runtime/shim"
)

// Guest memory bounds (MiB).
const (
	MinMemoryMiB = 16
	MaxVCPUs     = 64
)

// CreateContainer turns the container config into a VM spec (kernel command
// line validated now, so a bad pod fails here with InvalidArgument).
func (s *Service) CreateContainer(ctx context.Context, r *runtimeapi.CreateContainerRequest) (*runtimeapi.CreateContainerResponse, error) {
	cfg := r.GetConfig()
	if cfg == nil || cfg.GetMetadata() == nil || cfg.GetMetadata().GetName() == "" {
		return nil, errorf(codes.InvalidArgument, "container config with a metadata name is required")
	}
	if cfg.GetImage().GetImage() == "" {
		return nil, errorf(codes.InvalidArgument, "container %q has no image", cfg.GetMetadata().GetName())
	}
	img, err := s.images.Get(cfg.GetImage().GetImage())
	if errors.Is(err, image.ErrNotFound) {
		return nil, errorf(codes.NotFound, "unikernel image %q is not present on this node; pull it first", cfg.GetImage().GetImage())
	}
	if err != nil {
		return nil, errorf(codes.Internal, "look up image: %v", err)
	}
	s.mu.Lock()
	sb, err := s.sandboxLocked(r.GetPodSandboxId())
	if err != nil {
		s.mu.Unlock()
		return nil, err
	}
	if sb.state != runtimeapi.PodSandboxState_SANDBOX_READY {
		s.mu.Unlock()
		return nil, errorf(codes.FailedPrecondition, "pod sandbox %s is not ready", sb.id)
	}
	for _, c := range s.containers {
		m := c.config.GetMetadata()
		if c.sandboxID == sb.id && m.GetName() == cfg.GetMetadata().GetName() && m.GetAttempt() == cfg.GetMetadata().GetAttempt() {
			s.mu.Unlock()
			return nil, errorf(codes.AlreadyExists, "container %q (attempt %d) already exists in pod %s as %s", m.GetName(), m.GetAttempt(), sb.id, c.id)
		}
	}
	s.mu.Unlock()

	args := append(append([]string{}, cfg.GetCommand()...), cfg.GetArgs()...)
	if len(args) == 0 {
		args = img.Cmd
	}
	env := append([]string{}, img.Env...)
	for _, kv := range cfg.GetEnvs() {
		if kv.GetKey() == "" {
			return nil, errorf(codes.InvalidArgument, "environment variable with an empty name")
		}
		env = append(env, kv.GetKey()+"="+string(kv.GetValue()))
	}
	env = dedupEnv(env)
	var skipped []string
	for _, m := range cfg.GetMounts() {
		// kubelet's own housekeeping files; a unikernel has no use for them.
		if m.GetContainerPath() == "/etc/hosts" || m.GetContainerPath() == "/dev/termination-log" {
			skipped = append(skipped, m.GetContainerPath())
			continue
		}
		return nil, errorf(codes.InvalidArgument, "container %q mounts %q; volumes for unikernel pods are not supported by this unilet version yet",
			cfg.GetMetadata().GetName(), m.GetContainerPath())
	}
	line, warnings, err := runtime.BuildCmdline(runtime.GuestConfig{KernelName: img.Kernel, Env: env, Args: args,
		Features: runtime.NewFeatures(img.Features)})
	var ce *runtime.CmdlineError
	if errors.As(err, &ce) {
		return nil, errorf(codes.InvalidArgument, "container %q: %v", cfg.GetMetadata().GetName(), err)
	}
	if err != nil {
		return nil, errorf(codes.Internal, "build guest command line: %v", err)
	}
	if len(skipped) > 0 {
		warnings = append(warnings, "kubelet-managed mounts not passed to the guest: "+strings.Join(skipped, ", "))
	}
	mem, vcpus, err := s.resources(cfg.GetLinux().GetResources())
	if err != nil {
		return nil, errorf(codes.InvalidArgument, "container %q: %v", cfg.GetMetadata().GetName(), err)
	}
	c := &container{
		id: newID(), sandboxID: sb.id, config: cfg, image: img, imageRef: cfg.GetImage().GetImage(),
		createdAt: time.Now(), state: runtimeapi.ContainerState_CONTAINER_CREATED, warnings: warnings,
	}
	if sb.config.GetLogDirectory() != "" && cfg.GetLogPath() != "" {
		c.logPath = filepath.Join(sb.config.GetLogDirectory(), cfg.GetLogPath())
	}
	c.vmDir = s.vmDir(c.id)
	md := sb.config.GetMetadata()
	c.machine = runtime.MachineConfig{
		Name:  fmt.Sprintf("%s_%s_%s", md.GetNamespace(), md.GetName(), cfg.GetMetadata().GetName()),
		Accel: s.cfg.Accel, Machine: runtime.MachinePC, MemoryMiB: mem, VCPUs: vcpus,
		Kernel: img.Kernel, Initrd: img.Initrd, Cmdline: line, QMPSocket: filepath.Join(c.vmDir, "qmp.sock"),
	}
	log := logrus.WithFields(logrus.Fields{"sandbox": sb.id, "container": c.id, "image": c.imageRef})
	for _, w := range warnings {
		log.Warn(w)
	}
	s.mu.Lock()
	s.containers[c.id] = c
	s.saveContainer(c)
	s.mu.Unlock()
	log.Debug("unikernel container created")
	return &runtimeapi.CreateContainerResponse{ContainerId: c.id}, nil
}

func dedupEnv(env []string) []string {
	last := map[string]int{}
	for i, kv := range env {
		last[strings.SplitN(kv, "=", 2)[0]] = i
	}
	var out []string
	for i, kv := range env {
		if last[strings.SplitN(kv, "=", 2)[0]] == i {
			out = append(out, kv)
		}
	}
	return out
}

// resources maps CRI resources to guest RAM (the memory limit, default
// DefaultMB) and vCPUs (ceil(quota/period), default 1).
func (s *Service) resources(res *runtimeapi.LinuxContainerResources) (int, int, error) {
	mem := s.cfg.DefaultMB
	if l := res.GetMemoryLimitInBytes(); l > 0 {
		mem = int((l + (1<<20 - 1)) >> 20)
		if mem < MinMemoryMiB {
			return 0, 0, fmt.Errorf("memory limit %d bytes is below the %d MiB a unikernel VM needs", l, MinMemoryMiB)
		}
	}
	vcpus := 1
	if q, p := res.GetCpuQuota(), res.GetCpuPeriod(); q > 0 && p > 0 {
		vcpus = int((q + p - 1) / p)
		if vcpus > MaxVCPUs {
			return 0, 0, fmt.Errorf("CPU limit asks for %d vCPUs; at most %d are supported", vcpus, MaxVCPUs)
		}
	}
	return mem, vcpus, nil
}

// StartContainer boots the VM. A VM that cannot start leaves nothing running
// and the container EXITED with reason StartError.
func (s *Service) StartContainer(ctx context.Context, r *runtimeapi.StartContainerRequest) (*runtimeapi.StartContainerResponse, error) {
	s.mu.Lock()
	c, err := s.containerLocked(r.GetContainerId())
	if err != nil {
		s.mu.Unlock()
		return nil, err
	}
	if c.state != runtimeapi.ContainerState_CONTAINER_CREATED {
		s.mu.Unlock()
		return nil, errorf(codes.FailedPrecondition, "container %s is %s, only a created container can be started", c.id, c.state)
	}
	c.state = runtimeapi.ContainerState_CONTAINER_UNKNOWN // starting
	s.saveContainer(c)                                    // a daemon restarting mid-start finds the shim
	s.mu.Unlock()

	vm, err := s.startVM(ctx, runtime.VMSpec{QEMU: s.cfg.QEMU, Machine: c.machine, StateDir: c.vmDir, LogPath: c.logPath})
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		_ = os.RemoveAll(c.vmDir)
		c.state = runtimeapi.ContainerState_CONTAINER_EXITED
		c.exit = runtime.ExitStatus{Code: 128, Reason: runtime.ReasonStartFailed, Message: err.Error(), FinishedAt: time.Now()}
		s.saveContainer(c)
		return nil, errorf(codes.Unknown, "start VM for container %s: %v", c.id, err)
	}
	c.vm = vm
	c.startedAt = vm.StartedAt()
	c.state = runtimeapi.ContainerState_CONTAINER_RUNNING
	s.saveContainer(c)
	logrus.WithFields(logrus.Fields{"sandbox": c.sandboxID, "container": c.id, "pid": vm.Pid(), "accel": s.cfg.Accel}).Info("unikernel VM started")
	return &runtimeapi.StartContainerResponse{}, nil
}

func (s *Service) startVM(ctx context.Context, spec runtime.VMSpec) (vmHandle, error) {
	if s.cfg.ShimBinary == "" {
		return nil, errors.New("no unilet-shim configured")
	}
	c, err := shim.Launch(ctx, s.cfg.ShimBinary, spec.StateDir, spec)
	if err != nil {
		return nil, err
	}
	h, err := shim.NewHandle(c)
	if err != nil {
		c.Close()
		return nil, err
	}
	return h, nil
}

// StopContainer powers the VM down, killing it after the timeout. Unknown IDs succeed.
func (s *Service) StopContainer(ctx context.Context, r *runtimeapi.StopContainerRequest) (*runtimeapi.StopContainerResponse, error) {
	s.mu.Lock()
	c, err := s.containerLocked(r.GetContainerId())
	if err != nil {
		s.mu.Unlock()
		if status.Code(err) == codes.NotFound {
			return &runtimeapi.StopContainerResponse{}, nil
		}
		return nil, err
	}
	s.refresh(c)
	vm := c.vm
	running := c.state == runtimeapi.ContainerState_CONTAINER_RUNNING
	if c.state == runtimeapi.ContainerState_CONTAINER_CREATED {
		c.state = runtimeapi.ContainerState_CONTAINER_EXITED
		c.exit = runtime.ExitStatus{Reason: "NeverStarted", FinishedAt: time.Now()}
		s.saveContainer(c)
	}
	s.mu.Unlock()
	if running && vm != nil {
		st := vm.Stop(time.Duration(r.GetTimeout()) * time.Second)
		s.mu.Lock()
		c.exit = st
		c.state = runtimeapi.ContainerState_CONTAINER_EXITED
		vm.Release()
		_ = os.RemoveAll(c.vmDir)
		s.saveContainer(c)
		s.mu.Unlock()
		logrus.WithFields(logrus.Fields{"container": c.id, "exitCode": st.Code, "reason": st.Reason}).Info("unikernel VM stopped")
	}
	return &runtimeapi.StopContainerResponse{}, nil
}

// RemoveContainer kills the VM if needed and forgets the container. Unknown IDs succeed.
func (s *Service) RemoveContainer(ctx context.Context, r *runtimeapi.RemoveContainerRequest) (*runtimeapi.RemoveContainerResponse, error) {
	if _, err := s.StopContainer(ctx, &runtimeapi.StopContainerRequest{ContainerId: r.GetContainerId()}); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	c, err := s.containerLocked(r.GetContainerId())
	if err != nil {
		return &runtimeapi.RemoveContainerResponse{}, nil
	}
	_ = os.RemoveAll(c.vmDir)
	delete(s.containers, c.id)
	s.forgetContainer(c.id)
	return &runtimeapi.RemoveContainerResponse{}, nil
}

// matches applies the ID-prefix, pod-prefix and label filters of CRI lists.
func (c *container) matches(idPrefix, podPrefix string, selector map[string]string) bool {
	return strings.HasPrefix(c.id, idPrefix) && strings.HasPrefix(c.sandboxID, podPrefix) && labelsMatch(c.config.GetLabels(), selector)
}

func (c *container) toAPI() *runtimeapi.Container {
	return &runtimeapi.Container{
		Id: c.id, PodSandboxId: c.sandboxID, Metadata: c.config.GetMetadata(),
		Image: c.config.GetImage(), ImageRef: c.image.ID, ImageId: c.image.ID, State: c.state, CreatedAt: c.createdAt.UnixNano(),
		Labels: c.config.GetLabels(), Annotations: c.config.GetAnnotations(),
	}
}

// ContainerStatus reports state, timestamps, exit code and reason.
func (s *Service) ContainerStatus(ctx context.Context, r *runtimeapi.ContainerStatusRequest) (*runtimeapi.ContainerStatusResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c, err := s.containerLocked(r.GetContainerId())
	if err != nil {
		return nil, err
	}
	s.refresh(c)
	st := &runtimeapi.ContainerStatus{
		Id: c.id, Metadata: c.config.GetMetadata(), State: c.state, CreatedAt: c.createdAt.UnixNano(),
		Image: c.config.GetImage(), ImageRef: c.image.ID, ImageId: c.image.ID,
		Labels: c.config.GetLabels(), Annotations: c.config.GetAnnotations(), LogPath: c.logPath,
	}
	if st.State == runtimeapi.ContainerState_CONTAINER_UNKNOWN {
		st.State = runtimeapi.ContainerState_CONTAINER_CREATED // start in progress
	}
	if !c.startedAt.IsZero() {
		st.StartedAt = c.startedAt.UnixNano()
	}
	if c.state == runtimeapi.ContainerState_CONTAINER_EXITED {
		st.FinishedAt = c.exit.FinishedAt.UnixNano()
		st.ExitCode = c.exit.Code
		st.Reason = c.exit.Reason
		st.Message = c.exit.Message
	}
	resp := &runtimeapi.ContainerStatusResponse{Status: st}
	if r.GetVerbose() {
		info := map[string]string{"accel": c.machine.Accel, "cmdline": c.machine.Cmdline,
			"memoryMiB": fmt.Sprint(c.machine.MemoryMiB), "vcpus": fmt.Sprint(c.machine.VCPUs)}
		if c.vm != nil {
			info["pid"] = fmt.Sprint(c.vm.Pid())
		}
		if len(c.warnings) > 0 {
			info["warnings"] = strings.Join(c.warnings, "; ")
		}
		resp.Info = info
	}
	return resp, nil
}

// ListContainers lists unikernel containers matching the filter.
func (s *Service) ListContainers(ctx context.Context, r *runtimeapi.ListContainersRequest) (*runtimeapi.ListContainersResponse, error) {
	f := r.GetFilter()
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []*runtimeapi.Container
	for _, c := range s.containers {
		s.refresh(c)
		if !c.matches(f.GetId(), f.GetPodSandboxId(), f.GetLabelSelector()) {
			continue
		}
		if f.GetState() != nil && f.GetState().GetState() != c.state {
			continue
		}
		out = append(out, c.toAPI())
	}
	return &runtimeapi.ListContainersResponse{Containers: out}, nil
}

// ReopenContainerLog reopens the CRI log after kubelet rotated it.
func (s *Service) ReopenContainerLog(ctx context.Context, r *runtimeapi.ReopenContainerLogRequest) (*runtimeapi.ReopenContainerLogResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c, err := s.containerLocked(r.GetContainerId())
	if err != nil {
		return nil, err
	}
	s.refresh(c)
	if c.state != runtimeapi.ContainerState_CONTAINER_RUNNING {
		return nil, errorf(codes.FailedPrecondition, "container %s is not running; its log cannot be reopened", c.id)
	}
	if err := c.vm.ReopenLog(); err != nil {
		return nil, errorf(codes.Internal, "reopen log: %v", err)
	}
	return &runtimeapi.ReopenContainerLogResponse{}, nil
}

const noExec = "unikernel pods run a single application in a VM with no shell or process model: %s is not possible. " +
	"Use the console (kubectl logs) instead"

// ExecSync is impossible in a unikernel.
func (s *Service) ExecSync(ctx context.Context, r *runtimeapi.ExecSyncRequest) (*runtimeapi.ExecSyncResponse, error) {
	return nil, errorf(codes.Unimplemented, noExec, "exec")
}

// Exec is impossible in a unikernel.
func (s *Service) Exec(ctx context.Context, r *runtimeapi.ExecRequest) (*runtimeapi.ExecResponse, error) {
	return nil, errorf(codes.Unimplemented, noExec, "exec")
}

// PortForward is not served yet for unikernel pods.
func (s *Service) PortForward(ctx context.Context, r *runtimeapi.PortForwardRequest) (*runtimeapi.PortForwardResponse, error) {
	return nil, errorf(codes.Unimplemented, "port-forward to unikernel pods is not supported by this unilet version yet (it needs pod networking)")
}
