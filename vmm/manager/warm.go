package manager

import (
	"context"
	"errors"
	"fmt"

	"github.com/sirupsen/logrus"

	"github.com/unilet-dev/unilet/pkg/cgroups"
	"github.com/unilet-dev/unilet/vmm/shim"
)

// Warm is a warm clone: a VM restored from a template ahead of any pod
// (RestoreSpec.Hold), paused, with no log, in no cgroup but the daemon's.
// It is made for a container ID of its own — its VM directory, jail uid
// and QEMU's proof of ownership (vmm.MarkerEnv) are that container's
// from the start — so a pod start that claims it only moves it (its
// namespace becomes the pod's, its processes move into the pod's cgroup)
// and runs it: no QEMU start, no state load on the path. A daemon that dies finds
// an unclaimed one as a VM directory no record claims, and sweeps it.
type Warm struct {
	ID string // the container ID it serves once claimed
	m  *Manager
	h  *shim.Handle
}

// StartWarm starts a warm clone: s must restore with Hold and have no
// cgroup and no log.
func (m *Manager) StartWarm(ctx context.Context, s StartSpec) (*Warm, error) {
	if s.Restore == nil || !s.Restore.Hold || s.Cgroup != "" || s.LogPath != "" || s.Staged != nil {
		return nil, errors.New("a warm clone restores held, with no cgroup, log or staged shim")
	}
	vm, _, err := m.Start(ctx, s)
	if err != nil {
		return nil, err
	}
	return &Warm{ID: s.ID, m: m, h: vm.(*shim.Handle)}, nil
}

// Pids are the warm clone's shim and QEMU.
func (w *Warm) Pids() []int { return []int{w.h.ShimPid(), w.h.Pid()} }

// Alive reports whether its VM still runs.
func (w *Warm) Alive() bool {
	select {
	case <-w.h.Done():
		return false
	default:
		return true
	}
}

// Discard ends the warm clone and removes its directory (nil: nothing).
func (w *Warm) Discard() {
	if w == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), StopGrace)
	_, err := w.h.Stop(ctx, 0)
	cancel()
	if err != nil {
		_ = w.h.KillShim() // pinned when connecting
	}
	if err := w.m.Release(w.ID, w.h, ""); err != nil {
		logrus.WithError(err).WithField("container", w.ID).Warn("remove a warm clone's VM directory")
	}
}

// StageWarm stages a warm clone for pod sandboxID like Stage stages a
// shim: its processes move into the pod's staging cgroup now (the caller
// runs it after CNI ADD: a migration blocks forks for a grace period),
// which CreateContainer renames into the container's. Where there
// is no staging (no cgroups, cgroup v2) it is staged without a cgroup
// and Start moves it into the container's.
func (m *Manager) StageWarm(sandboxID, parent string, w *Warm) *Staged {
	st := &Staged{m: m, warm: w}
	if m.cfg.CgroupRoot == "" || cgroups.Unified() || len(sandboxID) < 12 {
		return st
	}
	path, err := cgroups.Path(parent, m.cfg.CgroupRoot, stageName(sandboxID))
	if err != nil {
		return st
	}
	cg, err := m.createCgroup(path, cgroups.Resources{})
	if err == nil {
		err = addAll(cg, w.Pids())
		if err != nil {
			_ = m.deleteCgroup(path)
		}
	}
	if err != nil {
		logrus.WithError(err).WithField("sandbox", sandboxID).Debug("staging a warm clone's cgroup failed; its start moves it")
		return st
	}
	st.cgroup = path
	return st
}

func addAll(cg cgroups.Cgroup, pids []int) error {
	for _, pid := range pids {
		if err := cg.Add(pid); err != nil {
			return fmt.Errorf("place pid %d in cgroup %s: %w", pid, cg.Path(), err)
		}
	}
	return nil
}

// WarmID is the container ID of the warm clone st carries ("": none).
func (st *Staged) WarmID() string {
	if st == nil || st.warm == nil {
		return ""
	}
	return st.warm.ID
}

// startWarm runs the warm clone st carries as the VM of s (s.ID is its
// ID): it joins the container's cgroup unless staged there, and gets the
// container's spec. On error the caller's cleanup stack ends it.
func (m *Manager) startWarm(ctx context.Context, s StartSpec, st *Staged, cg cgroups.Cgroup) (*shim.Handle, error) {
	w := st.warm
	if w.ID != s.ID {
		return nil, fmt.Errorf("the warm clone was made for container %s, not %s", w.ID, s.ID)
	}
	if !w.Alive() {
		return nil, errors.New("the warm clone ended")
	}
	if cg != nil && !(st.claimed && st.cgroup == s.Cgroup) {
		if err := addAll(cg, w.Pids()); err != nil {
			return nil, err
		}
	}
	dir, err := m.Dir(s.ID)
	if err != nil {
		return nil, err
	}
	spec, err := shim.ReadSpec(dir)
	if err != nil {
		return nil, err
	}
	spec.Machine.NICs, spec.LogPath, spec.Idle = s.Machine.NICs, s.LogPath, s.Idle
	spec.Restore.Hold = false
	if spec.Jail != nil { // made before its pod: its id becomes the pod's
		spec.Jail.Pod = s.Pod
		m.ids.join(m.vmRoot, dirName(s.ID), s.Pod, spec.Jail.UID)
	}
	cctx, cancel := context.WithTimeout(ctx, CallTimeout)
	defer cancel()
	if err := w.h.Claim(cctx, spec); err != nil {
		return nil, fmt.Errorf("run the warm clone: %w", err)
	}
	return w.h, nil
}
