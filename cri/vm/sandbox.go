package vm

import (
	"context"
	"errors"
	"net"
	"strings"
	"time"

	"github.com/sirupsen/logrus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/pkg/cgroups"
	"github.com/unilet-dev/unilet/pkg/cni"
	"github.com/unilet-dev/unilet/pkg/netns"
	"github.com/unilet-dev/unilet/pkg/vmnet"
	"github.com/unilet-dev/unilet/runtime/shim"
)

// TapName is the tap device of a pod's VM NIC inside the pod namespace.
const TapName = "tap0"

// RunPodSandbox creates the pod's network namespace, runs CNI ADD in it and
// prepares the tap the VM's NIC will use. There is no pause process.
func (s *Service) RunPodSandbox(ctx context.Context, r *runtimeapi.RunPodSandboxRequest) (*runtimeapi.RunPodSandboxResponse, error) {
	cfg := r.GetConfig()
	if cfg == nil || cfg.GetMetadata() == nil {
		return nil, errorf(codes.InvalidArgument, "sandbox config with metadata is required")
	}
	md := cfg.GetMetadata()
	if md.GetName() == "" || md.GetNamespace() == "" {
		return nil, errorf(codes.InvalidArgument, "sandbox metadata needs a name and a namespace")
	}
	if _, err := ParseTuning(cfg.GetAnnotations(), s.cfg.Limits); err != nil {
		return nil, errorf(codes.InvalidArgument, "pod %s/%s: %v", md.GetNamespace(), md.GetName(), err)
	}
	if cfg.GetLinux().GetSecurityContext().GetNamespaceOptions().GetNetwork() == runtimeapi.NamespaceMode_NODE {
		return nil, errorf(codes.InvalidArgument, "pod %s/%s asks for the host network; a unikernel VM owns its own NIC, so hostNetwork is not supported for unikernel pods",
			md.GetNamespace(), md.GetName())
	}
	if err := checkHostname(cfg.GetHostname()); err != nil {
		return nil, errorf(codes.InvalidArgument, "pod %s/%s: %v", md.GetNamespace(), md.GetName(), err)
	}
	s.mu.Lock()
	if err := s.checkUniqueLocked(md); err != nil {
		s.mu.Unlock()
		return nil, err
	}
	sb := &sandbox{id: newID(), config: cfg, handler: r.GetRuntimeHandler(), createdAt: time.Now(),
		state: runtimeapi.PodSandboxState_SANDBOX_NOTREADY}
	s.mu.Unlock()
	log := logrus.WithFields(logrus.Fields{"sandbox": sb.id, "pod": md.GetNamespace() + "/" + md.GetName()})

	// Stage a shim in the pod's next cgroup while CNI runs: moving a process
	// into a cgroup costs a kernel RCU grace period (measured 8–20 ms here),
	// which this takes off the start path.
	t0 := time.Now()
	staged := make(chan *stagedShim, 1)
	go func() { staged <- s.stageShim(sb) }()
	var steps netSteps
	if s.cfg.Network != nil {
		var err error
		if steps, err = s.setupNetwork(ctx, sb); err != nil {
			dropStaged(<-staged)
			return nil, err
		}
	}
	tNet := time.Now()
	sb.staged = <-staged
	stageWait := time.Since(tNet)
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.checkUniqueLocked(md); err != nil { // a twin request won the race
		dropStaged(sb.staged)
		go s.dropFailedSandbox(sb)
		return nil, err
	}
	sb.state = runtimeapi.PodSandboxState_SANDBOX_READY
	s.sandboxes[sb.id] = sb
	s.saveSandbox(sb)
	log.WithFields(logrus.Fields{"ip": sb.primaryIP(), "netnsMs": msec(steps.netns), "cniMs": msec(steps.cni), "tapMs": msec(steps.tap),
		"stageWaitMs": msec(stageWait), "totalMs": msec(time.Since(t0))}).Info("unikernel pod sandbox created")
	return &runtimeapi.RunPodSandboxResponse{PodSandboxId: sb.id}, nil
}

func (s *Service) checkUniqueLocked(md *runtimeapi.PodSandboxMetadata) error {
	for _, sb := range s.sandboxes {
		m := sb.config.GetMetadata()
		if m.GetName() == md.GetName() && m.GetNamespace() == md.GetNamespace() && m.GetUid() == md.GetUid() && m.GetAttempt() == md.GetAttempt() {
			return errorf(codes.AlreadyExists, "pod sandbox %s/%s (uid %q, attempt %d) already exists as %s",
				md.GetNamespace(), md.GetName(), md.GetUid(), md.GetAttempt(), sb.id)
		}
	}
	return nil
}

func checkHostname(h string) error {
	if h == "" || dnsLabel.MatchString(h) {
		return nil
	}
	return errors.New("hostname " + quote(h) + " is not a DNS label (lower-case letters, digits and '-')")
}

func quote(s string) string { return "\"" + strings.ReplaceAll(s, "\"", "\\\"") + "\"" }

func (sb *sandbox) podInfo() cni.PodInfo {
	md := sb.config.GetMetadata()
	p := cni.PodInfo{ID: sb.id, Name: md.GetName(), Namespace: md.GetNamespace(), UID: md.GetUid()}
	for _, pm := range sb.config.GetPortMappings() {
		if pm.GetHostPort() <= 0 {
			continue
		}
		proto := strings.ToLower(pm.GetProtocol().String())
		p.PortMappings = append(p.PortMappings, cni.PortMapping{HostPort: pm.GetHostPort(), ContainerPort: pm.GetContainerPort(),
			Protocol: proto, HostIP: pm.GetHostIp()})
	}
	return p
}

// netSteps is where a pod's network set-up spent its time (logged).
type netSteps struct{ netns, cni, tap time.Duration }

// setupNetwork: netns, CNI ADD, tap. On failure nothing is left behind.
func (s *Service) setupNetwork(ctx context.Context, sb *sandbox) (netSteps, error) {
	var st netSteps
	if err := s.cfg.Network.Status(); err != nil {
		return st, errorf(codes.FailedPrecondition, "pod network is not ready: %v", err)
	}
	t := time.Now()
	lap := func(d *time.Duration) { now := time.Now(); *d = now.Sub(t); t = now }
	path, err := netns.Create(s.cfg.NetNSDir, "unilet-"+sb.id)
	if err != nil {
		return st, errorf(codes.Internal, "create network namespace: %v", err)
	}
	sb.netns = path
	// Recorded before ADD: a daemon dying mid-ADD leaves a record whose DEL
	// the next daemon retries.
	sb.netPending = true
	s.mu.Lock()
	s.saveSandbox(sb)
	s.mu.Unlock()
	lap(&st.netns)
	fail := func(code codes.Code, format string, a ...any) error {
		s.dropFailedSandbox(sb)
		return errorf(code, format, a...)
	}
	res, err := s.cfg.Network.Setup(ctx, sb.podInfo(), path)
	if err != nil {
		return st, fail(codes.Unknown, "set up pod network: %v", err)
	}
	lap(&st.cni)
	sb.net = res
	link, err := vmnet.SetupTap(path, cni.IfName, TapName)
	if err != nil {
		return st, fail(codes.Internal, "prepare the VM's tap device: %v", err)
	}
	lap(&st.tap)
	sb.mac = link.MAC
	return st, nil
}

// stageName names a pod's staging cgroup (a sibling of its VMs' cgroups).
func stageName(sandboxID string) string { return "stage-" + sandboxID[:12] }

// stageShim takes an idle shim and places it in the pod's staging cgroup;
// nil when there is no pool, no cgroups, cgroup v2 (no rename) or no idle shim.
func (s *Service) stageShim(sb *sandbox) *stagedShim {
	if s.cfg.ShimPool == nil || s.cfg.CgroupRoot == "" || cgroups.Unified() {
		return nil
	}
	path, err := cgroups.Path(sb.config.GetLinux().GetCgroupParent(), s.cfg.CgroupRoot, stageName(sb.id))
	if err != nil {
		return nil
	}
	if s.staged.Add(1) > maxStaged {
		s.staged.Add(-1)
		return nil
	}
	idle := s.cfg.ShimPool.Take()
	if idle == nil {
		s.staged.Add(-1)
		return nil
	}
	cg, err := cgroups.Create(path, cgroups.Resources{})
	if err == nil {
		if err = cg.Add(idle.Pid()); err != nil {
			_ = cg.Delete()
		}
	}
	if err != nil {
		logrus.WithError(err).WithField("sandbox", sb.id).Debug("staging a shim failed; the VM starts without")
		idle.Discard()
		s.staged.Add(-1)
		return nil
	}
	return &stagedShim{idle: s.countedIdle(idle), cgroup: path}
}

// countedIdle wraps a staged shim so that using or discarding it frees its slot.
func (s *Service) countedIdle(i *shim.Idle) *shim.Idle {
	return i.OnRelease(func() { s.staged.Add(-1) })
}

// dropStaged ends a staged shim and removes its cgroup.
func dropStaged(st *stagedShim) {
	if st == nil {
		return
	}
	st.idle.Discard()
	if cg, err := cgroups.Load(st.cgroup); err == nil {
		_ = cg.Delete()
	}
}

// dropFailedSandbox undoes a half-made sandbox. If its network cannot be torn
// down now, the sandbox stays listed as NOTREADY so that kubelet's removal
// (or the next daemon) retries the CNI DEL.
func (s *Service) dropFailedSandbox(sb *sandbox) {
	sb.netMu.Lock()
	err := s.teardownNetwork(context.Background(), sb)
	sb.netMu.Unlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		logrus.WithError(err).WithField("sandbox", sb.id).Warn("could not tear down the network of a failed pod sandbox; it stays NOTREADY until removed")
		sb.state = runtimeapi.PodSandboxState_SANDBOX_NOTREADY
		s.sandboxes[sb.id] = sb
		s.saveSandbox(sb)
		return
	}
	s.forgetSandbox(sb.id)
}

// teardownNetwork runs CNI DEL and removes the namespace; both are
// idempotent. It returns the first error, leaving the sandbox marked for a retry.
func (s *Service) teardownNetwork(ctx context.Context, sb *sandbox) error {
	if s.cfg.Network == nil || !sb.netPending {
		return nil
	}
	if err := s.cfg.Network.Teardown(ctx, sb.podInfo(), sb.netns); err != nil {
		return err
	}
	if sb.netns != "" {
		if err := netns.Remove(sb.netns); err != nil {
			return err
		}
	}
	sb.netPending = false
	return nil
}

// StopPodSandbox stops every VM of the pod and tears its network down.
// Unknown IDs succeed (idempotent).
func (s *Service) StopPodSandbox(ctx context.Context, r *runtimeapi.StopPodSandboxRequest) (*runtimeapi.StopPodSandboxResponse, error) {
	s.mu.Lock()
	sb, err := s.sandboxLocked(r.GetPodSandboxId())
	if err != nil {
		s.mu.Unlock()
		if status.Code(err) == codes.NotFound {
			return &runtimeapi.StopPodSandboxResponse{}, nil
		}
		return nil, err
	}
	ids := s.containerIDsOf(sb.id)
	s.mu.Unlock()
	for _, id := range ids {
		if _, err := s.StopContainer(ctx, &runtimeapi.StopContainerRequest{ContainerId: id, Timeout: 0}); err != nil {
			return nil, err
		}
	}
	s.mu.Lock()
	sb.state = runtimeapi.PodSandboxState_SANDBOX_NOTREADY
	st := sb.staged
	sb.staged = nil
	s.saveSandbox(sb)
	s.mu.Unlock()
	dropStaged(st)
	sb.netMu.Lock()
	err = s.teardownNetwork(ctx, sb)
	sb.netMu.Unlock()
	s.mu.Lock()
	s.saveSandbox(sb)
	s.mu.Unlock()
	if err != nil {
		return nil, errorf(codes.Unknown, "tear down the network of pod %s: %v (kubelet retries)", sb.id, err)
	}
	return &runtimeapi.StopPodSandboxResponse{}, nil
}

// RemovePodSandbox stops and removes the pod and its containers. Unknown IDs succeed.
func (s *Service) RemovePodSandbox(ctx context.Context, r *runtimeapi.RemovePodSandboxRequest) (*runtimeapi.RemovePodSandboxResponse, error) {
	if _, err := s.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: r.GetPodSandboxId()}); err != nil {
		return nil, err
	}
	s.mu.Lock()
	sb, err := s.sandboxLocked(r.GetPodSandboxId())
	if err != nil {
		s.mu.Unlock()
		return &runtimeapi.RemovePodSandboxResponse{}, nil
	}
	ids := s.containerIDsOf(sb.id)
	s.mu.Unlock()
	for _, id := range ids {
		if _, err := s.RemoveContainer(ctx, &runtimeapi.RemoveContainerRequest{ContainerId: id}); err != nil {
			return nil, err
		}
	}
	s.mu.Lock()
	delete(s.sandboxes, sb.id)
	s.forgetSandbox(sb.id)
	s.mu.Unlock()
	logrus.WithField("sandbox", sb.id).Info("unikernel pod sandbox removed")
	return &runtimeapi.RemovePodSandboxResponse{}, nil
}

func (sb *sandbox) toAPI() *runtimeapi.PodSandbox {
	return &runtimeapi.PodSandbox{
		Id: sb.id, Metadata: sb.config.GetMetadata(), State: sb.state, CreatedAt: sb.createdAt.UnixNano(),
		Labels: sb.config.GetLabels(), Annotations: sb.config.GetAnnotations(), RuntimeHandler: sb.handler,
	}
}

// ips returns the pod's addresses without prefix length, primary first.
func (sb *sandbox) ips() []string {
	if sb.net == nil {
		return nil
	}
	var out []string
	for _, c := range sb.net.IPs {
		if ip, _, err := net.ParseCIDR(c); err == nil {
			out = append(out, ip.String())
		}
	}
	return out
}

func (sb *sandbox) primaryIP() string {
	if ips := sb.ips(); len(ips) > 0 {
		return ips[0]
	}
	return ""
}

// PodSandboxStatus reports the pod and its IP addresses.
func (s *Service) PodSandboxStatus(ctx context.Context, r *runtimeapi.PodSandboxStatusRequest) (*runtimeapi.PodSandboxStatusResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sb, err := s.sandboxLocked(r.GetPodSandboxId())
	if err != nil {
		return nil, err
	}
	netStatus := &runtimeapi.PodSandboxNetworkStatus{}
	if ips := sb.ips(); len(ips) > 0 && sb.state == runtimeapi.PodSandboxState_SANDBOX_READY {
		netStatus.Ip = ips[0]
		for _, ip := range ips[1:] {
			netStatus.AdditionalIps = append(netStatus.AdditionalIps, &runtimeapi.PodIP{Ip: ip})
		}
	}
	st := &runtimeapi.PodSandboxStatus{
		Id: sb.id, Metadata: sb.config.GetMetadata(), State: sb.state, CreatedAt: sb.createdAt.UnixNano(),
		Network: netStatus,
		Linux:   &runtimeapi.LinuxPodSandboxStatus{Namespaces: &runtimeapi.Namespace{Options: sb.config.GetLinux().GetSecurityContext().GetNamespaceOptions()}},
		Labels:  sb.config.GetLabels(), Annotations: sb.config.GetAnnotations(), RuntimeHandler: sb.handler,
	}
	resp := &runtimeapi.PodSandboxStatusResponse{Status: st}
	if r.GetVerbose() {
		resp.Info = map[string]string{"runtime": "unilet-vm", "logDirectory": sb.config.GetLogDirectory(), "netns": sb.netns, "mac": sb.mac}
	}
	return resp, nil
}

// ListPodSandbox lists unikernel pods matching the filter.
func (s *Service) ListPodSandbox(ctx context.Context, r *runtimeapi.ListPodSandboxRequest) (*runtimeapi.ListPodSandboxResponse, error) {
	f := r.GetFilter()
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []*runtimeapi.PodSandbox
	for _, sb := range s.sandboxes {
		if !sb.matches(f.GetId(), f.GetLabelSelector()) || (f.GetState() != nil && f.GetState().GetState() != sb.state) {
			continue
		}
		out = append(out, sb.toAPI())
	}
	return &runtimeapi.ListPodSandboxResponse{Items: out}, nil
}

// matches applies the ID-prefix and label filters of CRI lists.
func (sb *sandbox) matches(idPrefix string, selector map[string]string) bool {
	return strings.HasPrefix(sb.id, idPrefix) && labelsMatch(sb.config.GetLabels(), selector)
}

func labelsMatch(labels, selector map[string]string) bool {
	for k, v := range selector {
		if labels[k] != v {
			return false
		}
	}
	return true
}
