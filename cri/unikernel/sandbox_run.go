package unikernel

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/sirupsen/logrus"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/cri/errdefs"
	"github.com/unilet-dev/unilet/cri/store"
	"github.com/unilet-dev/unilet/pkg/cni"
	"github.com/unilet-dev/unilet/pkg/metrics"
	"github.com/unilet-dev/unilet/pkg/netns"
	"github.com/unilet-dev/unilet/pkg/vmnet"
	"github.com/unilet-dev/unilet/vmm/manager"
)

// RunPodSandbox creates the pod's network namespace, runs CNI ADD in it and
// prepares the tap the VM's NIC will use. There is no pause process. The
// record (state Creating) is written before the namespace exists, so a
// daemon dying half-way leaves something the next one tears down.
func (s *Service) RunPodSandbox(ctx context.Context, r *runtimeapi.RunPodSandboxRequest) (*runtimeapi.RunPodSandboxResponse, error) {
	cfg := r.GetConfig()
	if cfg == nil || cfg.GetMetadata() == nil {
		return nil, errorf(errdefs.ErrInvalidArgument, "sandbox config with metadata is required")
	}
	md := cfg.GetMetadata()
	if md.GetName() == "" || md.GetNamespace() == "" {
		return nil, errorf(errdefs.ErrInvalidArgument, "sandbox metadata needs a name and a namespace")
	}
	if err := checkSandboxConfig(cfg); err != nil {
		return nil, errorf(errdefs.ErrInvalidArgument, "pod %.64q/%.64q: %v", md.GetNamespace(), md.GetName(), err)
	}
	tuning, err := ParseTuning(cfg.GetAnnotations(), s.cfg.Limits)
	if err != nil {
		return nil, errorf(errdefs.ErrInvalidArgument, "pod %s/%s: %v", md.GetNamespace(), md.GetName(), err)
	}
	if cfg.GetLinux().GetSecurityContext().GetNamespaceOptions().GetNetwork() == runtimeapi.NamespaceMode_NODE {
		return nil, errorf(errdefs.ErrInvalidArgument, "pod %s/%s asks for the host network; a unikernel VM owns its own NIC, so hostNetwork is not supported for unikernel pods",
			md.GetNamespace(), md.GetName())
	}
	if err := s.checkLogDir(cfg.GetLogDirectory()); err != nil {
		return nil, errorf(errdefs.ErrInvalidArgument, "pod %s/%s: %v", md.GetNamespace(), md.GetName(), err)
	}
	if err := checkHostname(cfg.GetHostname()); err != nil {
		return nil, errorf(errdefs.ErrInvalidArgument, "pod %s/%s: %v", md.GetNamespace(), md.GetName(), err)
	}
	id := newID()
	meta := sandboxMeta{Config: cfg, Handler: r.GetRuntimeHandler(), CreatedAt: time.Now(), rt: &sandboxRuntime{}}
	if s.cfg.Network != nil {
		meta.NetNS = s.netnsPath(id)
	}
	// The name is reserved while the record is written (no disk write
	// under the lock): a twin request meanwhile is AlreadyExists.
	key := fmt.Sprintf("%s/%s/%s/%d", md.GetNamespace(), md.GetName(), md.GetUid(), md.GetAttempt())
	// A network that is not ready fails the pod before anything is made.
	if s.cfg.Network != nil {
		if err := s.cfg.Network.Status(); err != nil {
			return nil, errorf(errdefs.ErrFailedPrecondition, "pod network is not ready: %v", err)
		}
	}
	s.podNames.Lock()
	err = s.checkUnique(md)
	if err == nil && s.podReserved[key] {
		err = errorf(errdefs.ErrAlreadyExists, "pod sandbox %s/%s (uid %q, attempt %d) is being created", md.GetNamespace(), md.GetName(), md.GetUid(), md.GetAttempt())
	}
	if err != nil {
		s.podNames.Unlock()
		return nil, err
	}
	s.podReserved[key] = true
	s.podNames.Unlock()
	// Teardown pending from the start: a daemon dying from here on leaves a
	// record whose CNI DEL (of a namespace that may not exist yet) the next
	// daemon runs.
	sb, err := s.sandboxes.Add(id, meta, sandboxStatus{State: store.SandboxCreating, NetPending: s.cfg.Network != nil})
	s.podNames.Lock()
	delete(s.podReserved, key)
	s.podNames.Unlock()
	if err != nil {
		return nil, err
	}
	log := logrus.WithFields(podFields(id, r.GetConfig()))

	// Stage a shim in the pod's next cgroup while CNI runs: moving a process
	// into a cgroup costs a kernel RCU grace period (measured 8–20 ms here),
	// which this takes off the start path.
	// A templated pod takes a warm clone of its template instead: its
	// namespace, its tap inside, becomes the pod's (setupNetwork), and its
	// processes move into the staging cgroup after CNI ADD — a migration
	// holds the kernel's fork lock for a grace period, which can stall
	// CNI's plugin execs — while the pod's start goes on (CreateContainer
	// waits).
	t0 := time.Now()
	var warm *warmClone
	if tuning.Template != "" && s.cfg.Network != nil {
		warm = s.warm.take(tuning.Template)
	}
	staged := make(chan *manager.Staged, 1)
	if warm == nil {
		go func() { staged <- s.vms.Stage(id, cfg.GetLinux().GetCgroupParent()) }()
	}
	var steps netSteps
	var res *cni.Result
	var guest *vmnet.Guest
	if s.cfg.Network != nil {
		if steps, res, guest, err = s.setupNetwork(ctx, sb, warm); err != nil {
			if warm != nil {
				warm.discard()
			} else {
				(<-staged).Drop()
			}
			s.dropFailedSandbox(sb)
			return nil, err
		}
	}
	if warm != nil && steps.warmLost != nil {
		log.WithError(steps.warmLost).Warn("the warm clone could not join the pod; its container restores the template at start")
		warm.discard()
		warm = nil
		staged <- nil
	}
	var stagedLater chan *manager.Staged
	if warm != nil {
		stagedLater = make(chan *manager.Staged, 1)
		go func() { stagedLater <- s.vms.StageWarm(id, cfg.GetLinux().GetCgroupParent(), warm.Warm) }()
	}
	tNet := time.Now()
	var st *manager.Staged
	if stagedLater == nil {
		st = <-staged
	}
	stageWait := time.Since(tNet)
	sb.Lifecycle.Lock()
	defer sb.Lifecycle.Unlock()
	err = sb.Update(func(cur sandboxStatus) (sandboxStatus, error) {
		if err := cur.State.Check(store.SandboxReady); err != nil {
			return cur, err // stopped or removed while being created
		}
		cur.State, cur.Net = store.SandboxReady, res
		if guest != nil {
			cur.Guest, cur.MAC = guest, guest.MAC
		}
		return cur, nil
	})
	if err != nil {
		if stagedLater != nil {
			st = <-stagedLater
		}
		st.Drop()
		go s.dropFailedSandbox(sb)
		return nil, err
	}
	meta.rt.staged, meta.rt.stagedLater = st, stagedLater
	if warm != nil {
		meta.rt.warmID, meta.rt.warmDigest = warm.ID, warm.digest
	}
	if guest != nil {
		single := vmnet.Single
		meta.rt.routes = &single // what SetupRouted installed
	}
	metrics.ObservePhase(metrics.PhaseNetNS, steps.netns)
	metrics.ObservePhase(metrics.PhaseCNI, steps.cni)
	metrics.ObservePhase(metrics.PhaseTap, steps.tap)
	metrics.ObservePhase(metrics.PhaseSandbox, time.Since(t0))
	log.WithFields(logrus.Fields{"ip": primaryIP(res), "netnsMs": msec(steps.netns), "cniMs": msec(steps.cni), "tapMs": msec(steps.tap),
		"stageWaitMs": msec(stageWait), "warm": warm != nil, "totalMs": msec(time.Since(t0))}).Info("unikernel pod sandbox created")
	return &runtimeapi.RunPodSandboxResponse{PodSandboxId: id}, nil
}

// checkUnique refuses a second sandbox for the same pod attempt; the
// caller holds s.podNames.
func (s *Service) checkUnique(md *runtimeapi.PodSandboxMetadata) error {
	for _, sb := range s.sandboxes.List() {
		m := sb.Meta().Config.GetMetadata()
		if m.GetName() == md.GetName() && m.GetNamespace() == md.GetNamespace() && m.GetUid() == md.GetUid() && m.GetAttempt() == md.GetAttempt() {
			return errorf(errdefs.ErrAlreadyExists, "pod sandbox %s/%s (uid %q, attempt %d) already exists as %s",
				md.GetNamespace(), md.GetName(), md.GetUid(), md.GetAttempt(), sb.ID())
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

func podInfo(id string, cfg *runtimeapi.PodSandboxConfig) cni.PodInfo {
	md := cfg.GetMetadata()
	p := cni.PodInfo{ID: id, Name: md.GetName(), Namespace: md.GetNamespace(), UID: md.GetUid()}
	for _, pm := range cfg.GetPortMappings() {
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
type netSteps struct {
	netns, cni, tap time.Duration
	warmLost        error // the warm clone's namespace could not become the pod's
}

// setupNetwork: netns, CNI ADD, tap. The caller tears down on failure.
func (s *Service) setupNetwork(ctx context.Context, sb *sandbox, warm *warmClone) (netSteps, *cni.Result, *vmnet.Guest, error) {
	var st netSteps
	t := time.Now()
	lap := func(d *time.Duration) { now := time.Now(); *d = now.Sub(t); t = now }
	path := sb.Meta().NetNS
	// A warm clone's namespace, its tap inside, becomes the pod's (the
	// routed setup then configures the tap): a bind mount, where moving
	// the tap would wait for RCU grace periods (15–40 ms here).
	if warm != nil {
		st.warmLost = warm.giveNetNS(s.cfg.NetNSDir, "unilet-"+sb.ID())
	}
	if warm == nil || st.warmLost != nil {
		if _, err := netns.Create(s.cfg.NetNSDir, "unilet-"+sb.ID()); err != nil {
			return st, nil, nil, errorf(errdefs.ErrInternal, "create network namespace: %v", err)
		}
	}
	lap(&st.netns)
	res, err := s.cfg.Network.Setup(ctx, podInfo(sb.ID(), sb.Meta().Config), path)
	if err != nil {
		return st, nil, nil, errorf(errdefs.ErrUnknown, "set up pod network: %v", err)
	}
	lap(&st.cni)
	guest := s.cfg.GuestNet
	if _, err := vmnet.SetupRouted(path, cni.IfName, guest); err != nil {
		return st, nil, nil, errorf(errdefs.ErrInternal, "prepare the VM's routed tap device: %v", err)
	}
	lap(&st.tap)
	return st, res, &guest, nil
}

// dropFailedSandbox undoes a half-made sandbox. If its network cannot be
// torn down now, the sandbox stays listed as NOTREADY so that kubelet's
// removal (or the next daemon) retries the CNI DEL.
func (s *Service) dropFailedSandbox(sb *sandbox) {
	sb.Lifecycle.Lock()
	defer sb.Lifecycle.Unlock()
	_ = sb.Update(func(cur sandboxStatus) (sandboxStatus, error) {
		if cur.State == store.SandboxCreating {
			cur.State = store.SandboxNotReady
		}
		return cur, nil
	})
	if err := s.teardownNetwork(context.Background(), sb, false); err != nil {
		logrus.WithError(err).WithField("sandbox", sb.ID()).Warn("could not tear down the network of a failed pod sandbox; it stays NOTREADY until removed")
		return
	}
	if err := s.sandboxes.Delete(sb); err != nil {
		logrus.WithError(err).WithField("sandbox", sb.ID()).Error("forget a failed pod sandbox")
	}
}

// teardownNetwork runs CNI DEL and removes the namespace (both idempotent)
// and records that; the caller holds sb.Lifecycle. The first error is
// returned and the sandbox stays marked for a retry — but when the pod is
// being removed, a failing CNI DEL is logged and the namespace removed
// anyway, so no pod is kept forever by a plugin that refuses it.
func (s *Service) teardownNetwork(ctx context.Context, sb *sandbox, removing bool) error {
	if s.cfg.Network == nil || !sb.Status().NetPending {
		return nil
	}
	path := sb.Meta().NetNS
	if path != "" {
		if err := s.cfg.Network.Teardown(ctx, podInfo(sb.ID(), sb.Meta().Config), path); err != nil {
			if !removing {
				return err
			}
			// A CNI DEL that keeps failing must not keep a pod forever:
			// its namespace goes anyway; the plugin may keep state (an IP).
			logrus.WithError(err).WithField("sandbox", sb.ID()).Warn("CNI DEL failed while removing the pod; its network namespace is removed anyway (the CNI plugin may keep its address allocation)")
		}
		if err := netns.Remove(path); err != nil {
			return err
		}
	}
	return sb.Update(func(cur sandboxStatus) (sandboxStatus, error) {
		cur.NetPending = false
		return cur, nil
	})
}
