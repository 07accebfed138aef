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
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/cri/errdefs"
	"github.com/unilet-dev/unilet/cri/store"
	"github.com/unilet-dev/unilet/pkg/metrics"
	"github.com/unilet-dev/unilet/vmm"
	"github.com/unilet-dev/unilet/vmm/manager"
)

// StartContainer boots the VM. Starting is recorded before the shim is
// launched; a stop or remove meanwhile cancels the start and waits for it.
// A VM that cannot start leaves nothing running and the container EXITED
// with reason StartError.
func (s *Service) StartContainer(ctx context.Context, r *runtimeapi.StartContainerRequest) (*runtimeapi.StartContainerResponse, error) {
	c, err := s.getContainer(r.GetContainerId())
	if err != nil {
		return nil, err
	}
	c.Lifecycle.Lock()
	defer c.Lifecycle.Unlock()
	m := c.Meta()
	sb, err := s.sandboxes.Get(m.SandboxID)
	if err != nil {
		return nil, errorf(errdefs.ErrFailedPrecondition, "container %s has no pod sandbox %s", c.ID(), m.SandboxID)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var staged = c.Status().staged
	// The pod's checks and the transition to Starting are one step under
	// the sandbox's lock (two VMs cannot both start on one tap).
	sb.Lifecycle.Lock()
	err = func() error {
		if sb.Status().State != store.SandboxReady {
			return errorf(errdefs.ErrFailedPrecondition, "pod sandbox %s is not ready", sb.ID())
		}
		if holder := s.tapHolder(sb, c); holder != nil {
			return errTapBusy(sb, c, holder)
		}
		return c.Update(func(st containerStatus) (containerStatus, error) {
			if st.State != store.ContainerCreated {
				return st, errorf(errdefs.ErrFailedPrecondition, "container %s is %s, only a created container can be started", c.ID(), st.State)
			}
			st.State, st.cancelStart, st.staged = store.ContainerStarting, cancel, nil
			return st, nil
		})
	}()
	sb.Lifecycle.Unlock()
	if err != nil {
		return nil, err
	}

	t0 := time.Now()
	sz := c.Status().Sizing
	vm, tm, err := s.startVM(ctx, c, manager.StartSpec{ID: c.ID(), Machine: m.Machine, LogPath: m.LogPath, Cgroup: m.Cgroup, Staged: staged, Idle: m.Idle,
		Pod: sb.ID(),
		Groups: jailGroups(sb.Meta().Config.GetLinux().GetSecurityContext().GetSupplementalGroups(),
			m.Config.GetLinux().GetSecurityContext().GetSupplementalGroups()),
		Resources: manager.Resources{MemoryLimit: sz.MemoryLimit, CPUQuota: sz.CPUQuota,
			CPUPeriod: uint64(max(sz.CPUPeriod, 0)), CPUShares: uint64(max(sz.CPUShares, 0))}})
	if err != nil {
		msg := err.Error()
		if ctx.Err() != nil {
			msg = "the start was cancelled (the container was stopped or removed, or the client gave up): " + msg
		}
		uerr := c.Update(func(st containerStatus) (containerStatus, error) {
			st.State, st.cancelStart = store.ContainerExited, nil
			st.Exit = vmm.ExitStatus{Code: 128, Reason: vmm.ReasonStartFailed, Message: msg, FinishedAt: time.Now()}
			return st, nil
		})
		if uerr != nil {
			logrus.WithError(uerr).WithField("container", c.ID()).Error("record a failed start")
		} else {
			s.emit(c, runtimeapi.ContainerEventType_CONTAINER_STOPPED_EVENT)
		}
		if ctx.Err() != nil {
			return nil, errorf(errdefs.ErrCanceled, "start VM for container %s: %s", c.ID(), msg)
		}
		return nil, errorf(errdefs.ErrUnknown, "start VM for container %s: %v", c.ID(), err)
	}
	s.writeOwner(c, sb)
	err = c.Update(func(st containerStatus) (containerStatus, error) {
		st.State, st.cancelStart = store.ContainerRunning, nil
		st.vm, st.Pid, st.StartedAt = vm, vm.Pid(), vm.StartedAt()
		return st, nil
	})
	if err != nil {
		// A VM that cannot be recorded must not run: nobody would know of it.
		sctx, scancel := context.WithTimeout(context.Background(), manager.StopGrace)
		_, _ = vm.Stop(sctx, 0)
		scancel()
		_ = s.vms.Release(c.ID(), vm, m.Cgroup)
		return nil, errorf(errdefs.ErrInternal, "record the started VM of container %s (it was stopped): %v", c.ID(), err)
	}
	go s.watchExit(c, vm)
	s.reroute(m.SandboxID) // the pod's default VM may be this one now
	s.emit(c, runtimeapi.ContainerEventType_CONTAINER_STARTED_EVENT)
	metrics.ObservePhase(metrics.PhaseCgroup, tm.Cgroup)
	metrics.ObservePhase(metrics.PhaseShim, tm.Spawn)
	metrics.ObservePhase(metrics.PhaseQEMUToQMP, tm.Boot)
	metrics.ObservePhase(metrics.PhaseContainer, time.Since(t0))
	go observeFirstOutput(vm, t0)
	s.ctrLog(c).WithFields(logrus.Fields{"pid": vm.Pid(), "accel": s.cfg.Accel,
		"cgroupMs": msec(tm.Cgroup), "shimMs": msec(tm.Spawn), "bootMs": msec(tm.Boot), "totalMs": msec(time.Since(t0))}).Info("unikernel VM started")
	return &runtimeapi.StartContainerResponse{}, nil
}

func msec(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// writeOwner leaves a copy of the pod's and container's records in the VM
// directory: a daemon that finds meta.db corrupted rebuilds them from it.
func (s *Service) writeOwner(c *container, sb *sandbox) {
	srec, err1 := sandboxToRecord(sb.ID(), sb.Meta(), sb.Status())
	st := c.Status()
	st.State = store.ContainerRunning
	crec, err2 := containerToRecord(c.ID(), c.Meta(), st)
	if err := errors.Join(err1, err2); err != nil {
		return
	}
	sj, _ := json.Marshal(srec)
	cj, _ := json.Marshal(crec)
	b, _ := json.Marshal(ownerRecord{Sandbox: sj, Container: cj})
	if err := s.vms.WriteOwner(c.ID(), b); err != nil {
		logrus.WithError(err).WithField("container", c.ID()).Debug("keep a copy of the records in the VM directory")
	}
}

// watchExit records the end of a VM nobody stopped (it powered off,
// crashed or was killed) and releases what it held.
func (s *Service) watchExit(c *container, vm manager.VM) {
	<-vm.Done()
	c.Lifecycle.Lock()
	defer c.Lifecycle.Unlock()
	s.finishExit(c, vm, vm.Exit())
}

// finishExit records that vm ended with ex (disk first), then ends its
// shim and removes its directory and cgroup. If the exit cannot be
// recorded, the VM directory (with the shim's exit.json) stays, so the next
// daemon still reports the true exit code. The caller holds c.Lifecycle.
func (s *Service) finishExit(c *container, vm manager.VM, ex vmm.ExitStatus) {
	err := c.Update(func(st containerStatus) (containerStatus, error) {
		if st.vm != vm || !st.State.Live() {
			return st, errAlreadyDone
		}
		st.State, st.Exit, st.vm = store.ContainerExited, ex, nil
		return st, nil
	})
	if errors.Is(err, errAlreadyDone) || errors.Is(err, store.ErrDeleted) {
		return
	}
	log := s.ctrLog(c).WithFields(logrus.Fields{"exitCode": ex.Code, "reason": ex.Reason})
	if err != nil {
		log.WithError(err).Error("could not record the VM's exit; its directory is kept for the next daemon")
		return
	}
	s.emit(c, runtimeapi.ContainerEventType_CONTAINER_STOPPED_EVENT)
	metrics.VMExits.WithLabelValues(ex.Reason).Inc()
	if err := s.vms.Release(c.ID(), vm, c.Meta().Cgroup); err != nil {
		log.WithError(err).Warn("clean up after the VM ended; RemoveContainer retries")
	}
	s.reroute(c.Meta().SandboxID) // undeclared ports move to a VM that runs
	log.Info("unikernel VM ended")
}

var errAlreadyDone = errors.New("already recorded")

// jailGroups are the supplementary groups a jailed QEMU keeps: the pod's
// and the container's (kubelet puts fsGroup there), so volumes shared
// through them stay readable; never group 0.
func jailGroups(lists ...[]int64) []uint32 {
	var out []uint32
	seen := map[int64]bool{}
	for _, l := range lists {
		for _, g := range l {
			if g > 0 && g < 1<<32-1 && !seen[g] {
				seen[g] = true
				out = append(out, uint32(g))
			}
		}
	}
	return out
}

// startVM starts c's VM: restored from its template when it has one —
// falling back to a cold boot, with a warning in its log, when the template
// cannot be restored (removed, changed, made by another QEMU) — else booted.
func (s *Service) startVM(ctx context.Context, c *container, spec manager.StartSpec) (manager.VM, manager.Timings, error) {
	m := c.Meta()
	if m.Template == "" {
		return s.vms.Start(ctx, spec)
	}
	log := s.ctrLog(c).WithField("template", m.Template)
	warm := spec.Staged.WarmID() != ""
	rs, why := s.restoreSpec(m, spec, !warm) // a warm clone has its state loaded
	if why == nil {
		vm, tm, err := s.vms.Start(ctx, rs)
		if err == nil || ctx.Err() != nil {
			s.templateUsed(m.Template, err)
			return vm, tm, err
		}
		if warm { // the warm clone failed: restore afresh
			log.WithError(err).Warn("the warm clone could not run; restoring the template")
			spec.Staged = nil
			if rs, err = s.restoreSpec(m, spec, true); err == nil {
				vm, tm, err = s.vms.Start(ctx, rs)
				if err == nil || ctx.Err() != nil {
					s.templateUsed(m.Template, err)
					return vm, tm, err
				}
			}
		}
		spec.Staged = nil // the attempts used it up
		why = err
	} else if warm {
		spec.Staged.Drop() // a clone of what cannot be restored
		spec.Staged = nil
	}
	msg := fmt.Sprintf("template %q could not be restored (%v); the VM boots cold instead", m.Template, why)
	log.Warn(msg)
	noteInLog(m.LogPath, "unilet: "+msg)
	if err := c.Update(func(st containerStatus) (containerStatus, error) {
		st.Warnings = appendOnce(st.Warnings, msg)
		return st, nil
	}); err != nil {
		return nil, manager.Timings{}, err
	}
	return s.vms.Start(ctx, spec)
}

// templateUsed counts a clone started from template name.
func (s *Service) templateUsed(name string, err error) {
	if err == nil {
		s.cfg.Templates.Used(name)
	}
}

// restoreSpec is spec turned into a restore of m's template: the
// template's machine with the pod's NIC, RAM mapped private from the
// template's sealed memfd, state loaded instead of a boot. Without
// prepare (a warm clone, restored already) the template's files are not
// verified again nor its RAM holder asked.
func (s *Service) restoreSpec(m containerMeta, spec manager.StartSpec, prepare bool) (manager.StartSpec, error) {
	if s.cfg.Templates == nil {
		return spec, errors.New("templates are off on this node")
	}
	t, err := s.cfg.Templates.Get(m.Template)
	if err != nil {
		return spec, err
	}
	if t.Machine.Accel != m.Machine.Accel {
		return spec, fmt.Errorf("it was made under %s, this node runs VMs under %s", t.Machine.Accel, m.Machine.Accel)
	}
	if t.ImageID != m.Image.ID {
		return spec, fmt.Errorf("it was made from image %s, the container runs %s", t.ImageID, m.Image.ID)
	}
	rs := &vmm.RestoreSpec{}
	if prepare {
		if rs, err = s.cfg.Templates.Prepare(t); err != nil {
			return spec, err
		}
	}
	machine := t.Machine
	machine.Name, machine.NICs = m.Machine.Name, m.Machine.NICs
	machine.RAM, machine.Incoming = &vmm.RAMBacking{}, true
	spec.Machine, spec.Restore = machine, rs
	return spec, nil
}

// noteInLog appends a line of unilet's own to a container's CRI log (none
// of its VM's writers is running).
func noteInLog(path, msg string) {
	if path == "" {
		return
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
	if err != nil {
		return
	}
	defer f.Close()
	_, _ = fmt.Fprintf(f, "%s stderr F %s\n", time.Now().UTC().Format(time.RFC3339Nano), strings.ReplaceAll(msg, "\n", " "))
}

// observeFirstOutput records how long after StartContainer was called the
// VM's console gave its first bytes: it asks the shim, less and less often,
// until the console spoke, the VM ended or a minute passed.
func observeFirstOutput(vm manager.VM, since time.Time) {
	for wait := 5 * time.Millisecond; time.Since(since) < time.Minute; wait = min(2*wait, time.Second) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		t, err := vm.FirstOutput(ctx)
		cancel()
		if err != nil {
			return // ended, or its shim is gone
		}
		if !t.IsZero() {
			metrics.ObservePhase(metrics.PhaseFirstConsole, max(t.Sub(since), 0))
			return
		}
		select {
		case <-vm.Done():
			return
		case <-time.After(wait):
		}
	}
}
