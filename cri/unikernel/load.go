package unikernel

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/sirupsen/logrus"
	"google.golang.org/protobuf/proto"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/cri/store"
	"github.com/unilet-dev/unilet/image"
	"github.com/unilet-dev/unilet/pkg/metrics"
	"github.com/unilet-dev/unilet/pkg/netns"
	"github.com/unilet-dev/unilet/vmm"
	"github.com/unilet-dev/unilet/vmm/manager"
)

// ReasonVMLost is reported for a container whose VM was running when the
// daemon went away and which neither runs any more nor left an exit status.
const ReasonVMLost = "VMLost"

// Load restores sandboxes and containers recorded by an earlier daemon and
// reconciles them with what runs: live VMs are reconnected, VMs that ended
// meanwhile report their recorded exit, removals and stops the earlier
// daemon did not finish are finished, and VM directories no record claims
// are ended and removed. Nothing read from disk is trusted with the host: a
// record that does not decode or validate is quarantined (kept in meta.db
// for the operator, logged) and the rest still loads.
func (s *Service) Load() error {
	err := s.load()
	if err == nil && s.warm != nil {
		s.warm.start() // after the sweep ended an earlier daemon's clones
	}
	return err
}

func (s *Service) load() error {
	if s.meta == nil {
		return nil
	}
	if why := s.meta.Recovered(); why != "" {
		s.rebuildFromVMDirs(why)
	}
	if err := s.meta.EachSandbox(func(k, v []byte) error {
		if err := s.loadSandbox(k, v); err != nil {
			s.quarantine("pod sandbox", k, v, err, s.meta.QuarantineSandbox)
		}
		return nil
	}); err != nil {
		return fmt.Errorf("load pod sandboxes: %w", err)
	}
	var lost []*container
	if err := s.meta.EachContainer(func(k, v []byte) error {
		c, err := s.loadContainer(k, v)
		if err != nil {
			s.quarantine("container", k, v, err, s.meta.QuarantineContainer)
			return nil
		}
		if c != nil {
			lost = append(lost, c)
		}
		return nil
	}); err != nil {
		return fmt.Errorf("load containers: %w", err)
	}
	s.reconcile(lost)
	logrus.WithFields(logrus.Fields{"sandboxes": len(s.sandboxes.List()), "containers": len(s.containers.List())}).Debug("restored unikernel pod state")
	return nil
}

func (s *Service) quarantine(kind string, k, v []byte, why error, move func(k, v []byte, reason string) error) {
	log := logrus.WithFields(logrus.Fields{"kind": kind, "key": fmt.Sprintf("%q", k), "problem": why.Error()})
	if err := move(k, v, why.Error()); err != nil {
		log.WithError(err).Error("a stored record is unusable and could not be quarantined; it is ignored")
		return
	}
	log.Error("a stored record is unusable: quarantined it (kept in meta.db, bucket \"quarantine\") and ignored it; " +
		"see docs/troubleshooting.md")
}

// loadSandbox restores one sandbox record.
func (s *Service) loadSandbox(k, v []byte) error {
	var rec sandboxRecord
	if err := json.Unmarshal(v, &rec); err != nil {
		return fmt.Errorf("undecodable record: %w", err)
	}
	if !store.ValidID(rec.ID) || string(k) != rec.ID {
		return fmt.Errorf("record key %q / ID %q is not a unilet sandbox ID", k, rec.ID)
	}
	cfg := &runtimeapi.PodSandboxConfig{}
	if err := proto.Unmarshal(rec.Config, cfg); err != nil {
		return fmt.Errorf("undecodable sandbox config: %w", err)
	}
	if cfg.GetMetadata().GetName() == "" || cfg.GetMetadata().GetNamespace() == "" {
		return errors.New("sandbox config without metadata (name, namespace)")
	}
	state := store.SandboxState(rec.Phase)
	if rec.Phase == "" {
		state = store.SandboxNotReady
		if runtimeapi.PodSandboxState(rec.State) == runtimeapi.PodSandboxState_SANDBOX_READY {
			state = store.SandboxReady
		}
	}
	if !state.Valid() {
		return fmt.Errorf("unknown sandbox state %q", rec.Phase)
	}
	meta := sandboxMeta{Config: cfg, Handler: rec.Handler, CreatedAt: rec.CreatedAt, rt: &sandboxRuntime{}}
	if rec.NetNS != "" || rec.NetPending {
		// The namespace's path follows from the ID; a record naming another
		// path is not followed.
		meta.NetNS = s.netnsPath(rec.ID)
		if rec.NetNS != "" && filepath.Clean(rec.NetNS) != meta.NetNS {
			logrus.WithFields(logrus.Fields{"sandbox": rec.ID, "recorded": rec.NetNS, "used": meta.NetNS}).Warn(
				"a sandbox record names a network namespace outside unilet's --netns-dir; using unilet's own path")
		}
	}
	if rec.Guest != nil {
		if err := rec.Guest.Validate(); err != nil {
			return err
		}
		if rec.MAC != rec.Guest.MAC {
			return fmt.Errorf("the guest NIC's MAC %q is not the routed guest network's %q", rec.MAC, rec.Guest.MAC)
		}
	}
	s.sandboxes.Restore(rec.ID, meta, sandboxStatus{State: state, Net: rec.Net, MAC: rec.MAC, NetPending: rec.NetPending, Guest: rec.Guest})
	return nil
}

// loadContainer restores one container record. It returns the container
// when its VM must be reconciled (it was live, or being removed).
func (s *Service) loadContainer(k, v []byte) (*container, error) {
	var rec containerRecord
	if err := json.Unmarshal(v, &rec); err != nil {
		return nil, fmt.Errorf("undecodable record: %w", err)
	}
	if !store.ValidID(rec.ID) || string(k) != rec.ID {
		return nil, fmt.Errorf("record key %q / ID %q is not a unilet container ID", k, rec.ID)
	}
	cfg := &runtimeapi.ContainerConfig{}
	if err := proto.Unmarshal(rec.Config, cfg); err != nil {
		return nil, fmt.Errorf("undecodable container config: %w", err)
	}
	if cfg.GetMetadata().GetName() == "" || rec.ImageID == "" {
		return nil, errors.New("container record without metadata (name) or image")
	}
	state := store.ContainerState(rec.Phase)
	if rec.Phase == "" {
		state = store.ContainerStateFromCRI(runtimeapi.ContainerState(rec.State))
	}
	if !state.Valid() {
		return nil, fmt.Errorf("unknown container state %q", rec.Phase)
	}
	img, err := s.images.Get(rec.ImageID)
	if err != nil {
		img = &image.Image{ID: rec.ImageID}
	}
	meta := containerMeta{SandboxID: rec.SandboxID, Config: cfg, Image: img, ImageRef: rec.ImageRef, CreatedAt: rec.CreatedAt, Machine: rec.Machine,
		Template: rec.Template, Idle: rec.Idle}
	st := containerStatus{State: state, StartedAt: rec.StartedAt, Exit: rec.Exit, Pid: rec.Pid, Sizing: rec.Sizing, Warnings: rec.Warnings}
	sb, err := s.sandboxes.Get(rec.SandboxID)
	if err != nil || sb.ID() != rec.SandboxID {
		sb = nil
		// Its pod is gone: the container is removed (its VM ended first).
		st.State = store.ContainerRemoving
		logrus.WithFields(logrus.Fields{"container": rec.ID, "sandbox": rec.SandboxID}).Warn("a container record has no pod sandbox; removing it")
	} else {
		// Host paths follow from the pod and the ID, never from the record.
		sbCfg := sb.Meta().Config
		if meta.LogPath, err = s.containerLogPath(sbCfg.GetLogDirectory(), cfg.GetLogPath()); err != nil {
			return nil, err
		}
		if meta.Cgroup, err = s.vms.CgroupPath(sbCfg.GetLinux().GetCgroupParent(), rec.ID); err != nil {
			return nil, err
		}
		if rec.Cgroup != "" && rec.Cgroup != meta.Cgroup {
			logrus.WithFields(logrus.Fields{"container": rec.ID, "recorded": rec.Cgroup, "used": meta.Cgroup}).Warn(
				"a container record names another cgroup than its pod gives it; using the pod's")
		} else if rec.Cgroup != "" {
			// Made by a unilet that kept no cgroup ledger yet.
			s.vms.AdoptCgroup(sbCfg.GetLinux().GetCgroupParent(), rec.ID)
		}
	}
	if st.State == store.ContainerCreated && sb != nil {
		// Its VM is yet to boot: rebuild it from the CRI config as a create
		// would (kernel and volumes checked anew), never from the record.
		fresh, _, _, err := s.containerSpec(rec.ID, sb, cfg, img)
		if err != nil {
			st.State = store.ContainerExited
			st.Exit = vmm.ExitStatus{Code: 128, Reason: vmm.ReasonStartFailed, FinishedAt: time.Now(),
				Message: "the container could not be restored after a daemon restart: " + err.Error()}
		} else {
			fresh.CreatedAt = meta.CreatedAt
			meta.Machine, meta.Template, meta.Idle = fresh.Machine, fresh.Template, fresh.Idle
		}
	}
	c := s.containers.Restore(rec.ID, meta, st)
	if state.Live() || state == store.ContainerRemoving {
		return c, nil
	}
	return nil, nil
}

// reconcile brings restored containers in line with what runs, then ends
// what no container claims. It runs before the daemon serves, for at most
// about AdoptWait: containers whose shim has not answered by then are
// adopted in the background (adopt.go), and so are their pods' own
// unfinished stops and removals.
func (s *Service) reconcile(pending []*container) {
	waits := map[string][]chan struct{}{} // by sandbox
	for _, c := range pending {
		ad := s.adopting.begin(c.ID())
		waits[c.Meta().SandboxID] = append(waits[c.Meta().SandboxID], ad.done)
		go s.adopt(c)
	}
	deadline := time.After(AdoptWait)
wait:
	for _, chans := range waits {
		for _, ch := range chans {
			select {
			case <-ch:
			case <-deadline:
				break wait
			}
		}
	}
	live := map[string]bool{}
	for _, c := range s.containers.List() {
		if c.Status().vm != nil || s.adopting.get(c.ID()) != nil {
			live[c.ID()[:16]] = true
		}
	}
	s.vms.Sweep(func(name string) bool { return live[name] })
	for _, sb := range s.sandboxes.List() {
		if s.adoptingIn(sb.ID()) {
			go func(sb *sandbox, chans []chan struct{}) {
				for _, ch := range chans {
					<-ch
				}
				s.reconcileSandbox(sb)
			}(sb, waits[sb.ID()])
			continue
		}
		s.reconcileSandbox(sb)
	}
	// Recorded cgroups no container claims. Staging cgroups (12-character
	// sandbox ID prefixes) are never claimed: the idle shims they held ended
	// with the earlier daemon.
	s.vms.SweepCgroups(func(id string) bool { return len(id) == 64 && s.containers.Has(id) })
	s.sweepNetNS()
}

// adoptingIn reports whether a container of the sandbox is still being adopted.
func (s *Service) adoptingIn(sandboxID string) bool {
	for _, c := range s.containersOf(sandboxID) {
		if s.adopting.get(c.ID()) != nil {
			return true
		}
	}
	return false
}

// sweepNetNS tears down network namespaces of unilet's form
// (unilet-<ID>) that no sandbox claims: left by a daemon killed before its
// record existed, or by a record that had to be quarantined.
func (s *Service) sweepNetNS() {
	if s.cfg.Network == nil {
		return
	}
	ents, _ := os.ReadDir(s.cfg.NetNSDir)
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), "unilet-template-") || strings.HasPrefix(e.Name(), warmNetNSPrefix) {
			// A template creation the earlier daemon did not finish, or a
			// warm clone of its (swept with the VM directories).
			_ = netns.Remove(filepath.Join(s.cfg.NetNSDir, e.Name()))
			continue
		}
		id, ok := strings.CutPrefix(e.Name(), "unilet-")
		if !ok || !store.ValidID(id) || s.sandboxes.Has(id) {
			continue
		}
		path := filepath.Join(s.cfg.NetNSDir, e.Name())
		log := logrus.WithFields(logrus.Fields{"sandbox": id, "netns": path})
		if err := s.cfg.Network.Teardown(context.Background(), podInfo(id, &runtimeapi.PodSandboxConfig{}), path); err != nil {
			log.WithError(err).Warn("CNI DEL of a network namespace no sandbox claims failed; removing the namespace anyway")
		}
		if err := netns.Remove(path); err != nil {
			log.WithError(err).Warn("remove a network namespace no sandbox claims")
			continue
		}
		log.Info("removed a network namespace no sandbox claims")
	}
}

// reconcileContainer settles a restored container with what reconnecting
// to its shim found (vm, or err): adopted, found ended, or its removal
// finished. The caller holds c.Lifecycle.
func (s *Service) reconcileContainer(c *container, vm manager.VM, err error) {
	log := logrus.WithFields(logrus.Fields{"sandbox": c.Meta().SandboxID, "container": c.ID()})
	st := c.Status()
	if st.State == store.ContainerRemoving {
		// A removal the earlier daemon did not finish: finish it.
		if vm != nil {
			sctx, scancel := context.WithTimeout(context.Background(), manager.StopGrace)
			if _, err := vm.Stop(sctx, 0); err != nil {
				_ = vm.KillShim()
			}
			scancel()
			rctx, rcancel := context.WithTimeout(context.Background(), manager.CallTimeout)
			_ = vm.Release(rctx)
			rcancel()
		} else if st.Pid > 0 {
			s.vms.KillStray(c.ID(), st.Pid)
		}
		if err := s.vms.Cleanup(c.ID(), c.Meta().Cgroup); err != nil {
			log.WithError(err).Error("finish removing a container; RemoveContainer retries")
			return
		}
		if err := s.containers.Delete(c); err != nil {
			log.WithError(err).Error("finish removing a container")
			return
		}
		log.Info("finished removing a container the earlier daemon was removing")
		return
	}
	if err == nil {
		// Running (or a start or stop the earlier daemon did not finish): it runs.
		uerr := c.Update(func(cur containerStatus) (containerStatus, error) {
			cur.State, cur.vm, cur.Pid, cur.StartedAt = store.ContainerRunning, vm, vm.Pid(), vm.StartedAt()
			return cur, nil
		})
		if uerr != nil {
			log.WithError(uerr).Error("record a reconnected VM; stopping it")
			sctx, scancel := context.WithTimeout(context.Background(), manager.StopGrace)
			_, _ = vm.Stop(sctx, 0)
			scancel()
			_ = s.vms.Release(c.ID(), vm, c.Meta().Cgroup)
			return
		}
		go s.watchExit(c, vm)
		log.WithField("pid", vm.Pid()).Info("reconnected to running VM")
		return
	}
	ex, ok := s.vms.ReadExit(c.ID())
	switch {
	case ok:
		// The VM ended (and its shim went away) while the daemon was down.
	case errors.Is(err, manager.ErrNeverStarted) || (st.State == store.ContainerStarting && st.Pid == 0):
		if st.Pid > 0 {
			s.vms.KillStray(c.ID(), st.Pid)
		}
		ex = vmm.ExitStatus{Code: 128, Reason: vmm.ReasonStartFailed, FinishedAt: time.Now(),
			Message: "unilet restarted while this VM was being started, before it ran; the start was abandoned"}
	default:
		if st.Pid > 0 && s.vms.KillStray(c.ID(), st.Pid) {
			log.WithField("pid", st.Pid).Warn("stopped a VM left running without its supervisor")
		}
		ex = vmm.ExitStatus{Code: 255, Reason: ReasonVMLost, FinishedAt: time.Now(),
			Message: "the VM's supervisor (unilet-shim) was gone when unilet restarted and left no exit status; the VM was stopped"}
	}
	if uerr := c.Update(func(cur containerStatus) (containerStatus, error) {
		cur.State, cur.Exit = store.ContainerExited, ex
		return cur, nil
	}); uerr != nil {
		log.WithError(uerr).Error("record the exit of a VM that ended while the daemon was away")
		return
	}
	if err := s.vms.Cleanup(c.ID(), c.Meta().Cgroup); err != nil {
		log.WithError(err).Warn("clean up a VM that ended while the daemon was away; RemoveContainer retries")
	}
	metrics.VMExits.WithLabelValues(ex.Reason).Inc()
	log.WithFields(logrus.Fields{"exitCode": ex.Code, "reason": ex.Reason}).Warn("container's VM ended while the daemon was away; reported as exited")
}

// reconcileSandbox finishes what the earlier daemon left: a sandbox being
// created (its client never got the ID) is torn down and forgotten, a
// removal is finished, a network teardown is retried.
func (s *Service) reconcileSandbox(sb *sandbox) {
	log := logrus.WithField("sandbox", sb.ID())
	switch sb.Status().State {
	case store.SandboxCreating:
		s.dropFailedSandbox(sb)
		log.Info("removed a pod sandbox the earlier daemon was still creating")
	case store.SandboxRemoving:
		if err := s.removeSandbox(context.Background(), sb); err != nil {
			log.WithError(err).Warn("finishing the removal of a pod sandbox failed; RemovePodSandbox retries it")
			return
		}
		log.Info("finished removing a pod sandbox the earlier daemon was removing")
	case store.SandboxReady:
		// The routing is installed anew: what the earlier daemon left may
		// be older than this daemon's (a pod made before several VMs).
		s.reroute(sb.ID())
	case store.SandboxNotReady:
		if !sb.Status().NetPending {
			return
		}
		// A stop the earlier daemon did not finish: its VMs first, then the network.
		if err := s.stopSandbox(context.Background(), sb, false); err != nil {
			log.WithError(err).Warn("retrying the network teardown of a stopped pod failed; StopPodSandbox retries it")
			return
		}
		log.Info("finished the network teardown of a pod stopped before the restart")
	}
}

// rebuildFromVMDirs restores, after meta.db was found corrupted, the pods
// and containers of the VMs that still run, from the copies of their
// records each VM directory holds. What is not rebuilt is swept later.
func (s *Service) rebuildFromVMDirs(why string) {
	n := 0
	s.vms.Owners(func(dirName string, b []byte) {
		var own ownerRecord
		if json.Unmarshal(b, &own) != nil {
			return
		}
		var srec sandboxRecord
		var crec containerRecord
		if json.Unmarshal(own.Sandbox, &srec) != nil || json.Unmarshal(own.Container, &crec) != nil ||
			!store.ValidID(crec.ID) || crec.ID[:16] != dirName || crec.SandboxID != srec.ID {
			return
		}
		if s.meta.PutSandbox(srec.ID, srec) != nil || s.meta.PutContainer(crec.ID, crec) != nil {
			return
		}
		n++
	})
	logrus.WithFields(logrus.Fields{"problem": why, "containersRebuilt": n}).Error(
		"meta.db was corrupted: rebuilt the records of running VMs from their directories")
}
