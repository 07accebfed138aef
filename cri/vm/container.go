package vm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/sirupsen/logrus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/image"
	"github.com/unilet-dev/unilet/pkg/cgroups"
	"github.com/unilet-dev/unilet/runtime"
	"github.com/unilet-dev/unilet/runtime/shim"
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
	if other := s.runningInLocked(sb.id, ""); other != nil {
		s.mu.Unlock()
		return nil, errOneVM(sb.id, cfg.GetMetadata().GetName(), other)
	}
	s.mu.Unlock()
	name := cfg.GetMetadata().GetName()
	log := logrus.WithFields(logrus.Fields{"sandbox": sb.id, "image": cfg.GetImage().GetImage()})

	tuning, err := ParseTuning(sb.config.GetAnnotations(), s.cfg.Limits)
	if err != nil {
		return nil, errorf(codes.InvalidArgument, "container %q: %v", name, err)
	}
	minMiB := 0
	if v := img.Labels[LabelMinMemory]; v != "" {
		if minMiB, err = strconv.Atoi(v); err != nil {
			log.WithField("label", v).Warn("image label " + LabelMinMemory + " is not a number of MiB; ignored")
			minMiB = 0
		}
	}
	size, err := Size(cfg.GetLinux().GetResources(), tuning, minMiB, s.cfg.Limits)
	if err != nil {
		return nil, errorf(codes.InvalidArgument, "container %q: %v", name, err)
	}

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
	features := runtime.NewFeatures(img.Features)
	vols, err := PlanVolumes(cfg.GetMounts(), features, img.Initrd != "", statDir, s.cfg.Limits)
	if err != nil {
		return nil, errorf(codes.InvalidArgument, "container %q: %v", name, err)
	}
	params := append([]string{}, tuning.LibParams...)
	var warnings []string
	var nics []runtime.NIC
	if sb.net != nil {
		nics = []runtime.NIC{{Tap: TapName, NetNS: sb.netns, MAC: sb.mac}}
		if features.Has(FeatureNetdev) {
			p, err := NetdevParam(sb.net, sb.config.GetHostname(), sb.config.GetDnsConfig())
			if err != nil {
				return nil, errorf(codes.InvalidArgument, "container %q: %v", name, err)
			}
			params = append([]string{p}, params...)
		} else {
			warnings = append(warnings, "image lacks "+FeatureNetdev+"=y (no network stack): the guest is not told its pod IP")
		}
	}
	line, cmdWarnings, err := runtime.BuildCmdline(runtime.GuestConfig{KernelName: img.Kernel, Params: params, Fstab: vols.Fstab,
		Env: env, Args: args, Features: features})
	var ce *runtime.CmdlineError
	if errors.As(err, &ce) {
		return nil, errorf(codes.InvalidArgument, "container %q: %v", name, err)
	}
	if err != nil {
		return nil, errorf(codes.Internal, "build guest command line: %v", err)
	}
	warnings = append(append(warnings, cmdWarnings...), vols.Warnings...)
	machine := runtime.MachinePC
	if tuning.Machine != "" {
		machine = tuning.Machine
	}
	c := &container{
		id: newID(), sandboxID: sb.id, config: cfg, image: img, imageRef: cfg.GetImage().GetImage(),
		createdAt: time.Now(), state: runtimeapi.ContainerState_CONTAINER_CREATED, warnings: warnings, sizing: size,
	}
	if sb.config.GetLogDirectory() != "" && cfg.GetLogPath() != "" {
		c.logPath = filepath.Join(sb.config.GetLogDirectory(), cfg.GetLogPath())
	}
	c.vmDir = s.vmDir(c.id)
	md := sb.config.GetMetadata()
	c.machine = runtime.MachineConfig{
		Name:  fmt.Sprintf("%s_%s_%s", md.GetNamespace(), md.GetName(), name),
		Accel: s.cfg.Accel, Machine: machine, MemoryMiB: size.MemoryMiB, VCPUs: size.VCPUs,
		Kernel: img.Kernel, Initrd: img.Initrd, Cmdline: line, QMPSocket: filepath.Join(c.vmDir, "qmp.sock"),
		NICs: nics, Shares: vols.Shares,
	}
	if err := c.machine.Validate(); err != nil {
		return nil, errorf(codes.InvalidArgument, "container %q: %v", name, err)
	}
	if s.cfg.CgroupRoot != "" {
		if c.cgroup, err = cgroups.Path(sb.config.GetLinux().GetCgroupParent(), s.cfg.CgroupRoot, c.id); err != nil {
			return nil, errorf(codes.InvalidArgument, "container %q: %v", name, err)
		}
	}
	log = log.WithField("container", c.id)
	for _, w := range warnings {
		log.Warn(w)
	}
	s.mu.Lock()
	st := sb.staged
	sb.staged = nil
	s.mu.Unlock()
	if st != nil && c.cgroup != "" {
		// The staged shim's cgroup becomes this container's: no migration later.
		if err := cgroups.Rename(st.cgroup, c.cgroup); err == nil {
			c.staged = st.idle
		} else {
			log.WithError(err).Debug("using the staged shim failed; the VM starts without")
			dropStaged(st)
		}
	} else {
		dropStaged(st)
	}
	s.mu.Lock()
	s.containers[c.id] = c
	s.saveContainer(c)
	s.mu.Unlock()
	log.Debug("unikernel container created")
	return &runtimeapi.CreateContainerResponse{ContainerId: c.id}, nil
}

// statDir reports whether a host path is a directory (following symlinks).
func statDir(p string) (bool, error) {
	fi, err := os.Stat(p)
	if err != nil {
		return false, err
	}
	return fi.IsDir(), nil
}

// runningInLocked returns a container of the sandbox (other than except)
// whose VM runs or is starting. Caller holds s.mu.
func (s *Service) runningInLocked(sandboxID, except string) *container {
	for _, c := range s.containers {
		if c.sandboxID != sandboxID || c.id == except {
			continue
		}
		s.refresh(c)
		if c.state == runtimeapi.ContainerState_CONTAINER_RUNNING || c.state == runtimeapi.ContainerState_CONTAINER_UNKNOWN {
			return c
		}
	}
	return nil
}

// errOneVM explains the one-VM-per-pod rule (docs/annotations.md).
func errOneVM(sandboxID, name string, running *container) error {
	return errorf(codes.FailedPrecondition,
		"container %q cannot run: unikernel pod %s already runs container %q (%s) and a unikernel pod runs one VM at a time, "+
			"because the pod IP belongs to that VM's NIC. Init containers run one after another; run sidecars in a separate pod",
		name, sandboxID, running.config.GetMetadata().GetName(), running.id)
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
	if other := s.runningInLocked(c.sandboxID, c.id); other != nil {
		s.mu.Unlock()
		return nil, errOneVM(c.sandboxID, c.config.GetMetadata().GetName(), other)
	}
	c.state = runtimeapi.ContainerState_CONTAINER_UNKNOWN // starting
	s.saveContainer(c)                                    // a daemon restarting mid-start finds the shim
	s.mu.Unlock()

	t0 := time.Now()
	var cg cgroups.Cgroup
	var err2 error
	if c.cgroup != "" {
		cg, err2 = cgroups.Create(c.cgroup, cgroups.Resources{MemoryLimit: c.sizing.MemoryLimit, CPUQuota: c.sizing.CPUQuota,
			CPUPeriod: uint64(max(c.sizing.CPUPeriod, 0)), CPUShares: uint64(max(c.sizing.CPUShares, 0))})
	}
	cgroupTime := time.Since(t0)
	var vm vmHandle
	var launch startTimes
	staged := c.staged
	c.staged = nil
	if err2 == nil {
		vm, launch, err2 = s.startVM(ctx, runtime.VMSpec{QEMU: s.cfg.QEMU, Machine: c.machine, StateDir: c.vmDir, LogPath: c.logPath}, cg, staged)
	} else if staged != nil {
		staged.Discard()
	}
	err = err2
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		if cg != nil {
			go dropCgroup(c.id, cg)
		}
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
	logrus.WithFields(logrus.Fields{"sandbox": c.sandboxID, "container": c.id, "pid": vm.Pid(), "accel": s.cfg.Accel,
		"cgroupMs": msec(cgroupTime), "shimMs": msec(launch.spawn), "bootMs": msec(launch.boot), "totalMs": msec(time.Since(t0))}).Info("unikernel VM started")
	return &runtimeapi.StartContainerResponse{}, nil
}

// startTimes is where a VM start spent its time: the shim's spawn until it
// answered, and its Start RPC (QEMU spawn to QMP ready).
type startTimes struct{ spawn, boot time.Duration }

func msec(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func (s *Service) startVM(ctx context.Context, spec runtime.VMSpec, cg cgroups.Cgroup, staged *shim.Idle) (vmHandle, startTimes, error) {
	if s.cfg.ShimBinary == "" {
		return nil, startTimes{}, errors.New("no unilet-shim configured")
	}
	if staged != nil { // already in its cgroup
		c, err := staged.Start(ctx, spec.StateDir, spec, nil)
		if err == nil {
			return s.handle(c)
		}
		if !shim.IsAdoptError(err) {
			return nil, startTimes{}, err
		}
		logrus.WithError(err).Warn("the staged shim could not be adopted; starting another")
	}
	var join func(int) error
	if cg != nil {
		join = func(pid int) error {
			if err := cg.Add(pid); err != nil {
				return fmt.Errorf("place the VM in cgroup %s: %w", cg.Path(), err)
			}
			return nil
		}
	}
	var c *shim.Client
	var err error
	if s.cfg.ShimPool != nil {
		c, err = s.cfg.ShimPool.Launch(ctx, spec.StateDir, spec, join)
	} else {
		c, err = shim.Launch(ctx, s.cfg.ShimBinary, spec.StateDir, spec, join)
	}
	if err != nil {
		return nil, startTimes{}, err
	}
	return s.handle(c)
}

func (s *Service) handle(c *shim.Client) (vmHandle, startTimes, error) {
	h, err := shim.NewHandle(c)
	if err != nil {
		c.Close()
		return nil, startTimes{}, err
	}
	return h, startTimes{spawn: c.Spawn, boot: c.Boot}, nil
}

// releaseCgroup removes the cgroup of an ended VM once its shim has gone
// (in the background: the shim leaves shortly after its VM).
func (s *Service) releaseCgroup(c *container) {
	if c.cgroup == "" {
		return
	}
	if cg, err := cgroups.Load(c.cgroup); err == nil {
		go dropCgroup(c.id, cg)
	}
}

func dropCgroup(id string, cg cgroups.Cgroup) {
	if err := cg.Delete(); err != nil {
		logrus.WithError(err).WithField("container", id).Warn("remove the VM's cgroup")
	}
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
		s.releaseCgroup(c)
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
	if c.staged != nil { // created, never started
		c.staged.Discard()
		c.staged = nil
	}
	if c.cgroup != "" {
		if cg, err := cgroups.Load(c.cgroup); err == nil {
			if err := cg.Delete(); err != nil {
				logrus.WithError(err).WithField("container", c.id).Warn("remove the VM's cgroup")
			}
		}
	}
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
	c, err := s.currentLocked(r.GetContainerId())
	if err != nil {
		return nil, err
	}
	st := &runtimeapi.ContainerStatus{
		Id: c.id, Metadata: c.config.GetMetadata(), State: c.state, CreatedAt: c.createdAt.UnixNano(),
		Image: c.config.GetImage(), ImageRef: c.image.ID, ImageId: c.image.ID,
		Labels: c.config.GetLabels(), Annotations: c.config.GetAnnotations(), LogPath: c.logPath,
		Resources: &runtimeapi.ContainerResources{Linux: &runtimeapi.LinuxContainerResources{
			CpuQuota: c.sizing.CPUQuota, CpuPeriod: c.sizing.CPUPeriod, CpuShares: c.sizing.CPUShares, MemoryLimitInBytes: c.sizing.MemoryLimit}},
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
	c, err := s.currentLocked(r.GetContainerId())
	if err != nil {
		return nil, err
	}
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

// PortForward returns a streaming URL that forwards to the pod IP.
func (s *Service) PortForward(ctx context.Context, r *runtimeapi.PortForwardRequest) (*runtimeapi.PortForwardResponse, error) {
	if _, err := s.podIP(r.GetPodSandboxId()); err != nil {
		return nil, err
	}
	if s.stream == nil {
		return nil, errorf(codes.Unavailable, "the streaming server is not running")
	}
	for _, p := range r.GetPort() {
		if p <= 0 || p > 65535 {
			return nil, errorf(codes.InvalidArgument, "invalid port %d", p)
		}
	}
	return s.stream.GetPortForward(r)
}

// podIP returns the IP of a ready unikernel pod.
func (s *Service) podIP(id string) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sb, err := s.sandboxLocked(id)
	if err != nil {
		return "", err
	}
	if sb.state != runtimeapi.PodSandboxState_SANDBOX_READY {
		return "", errorf(codes.FailedPrecondition, "pod %s is not ready", sb.id)
	}
	ip := sb.primaryIP()
	if ip == "" {
		return "", errorf(codes.FailedPrecondition, "pod %s has no IP address (no pod network)", sb.id)
	}
	return ip, nil
}
