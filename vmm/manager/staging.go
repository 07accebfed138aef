package manager

import (
	"github.com/sirupsen/logrus"

	"github.com/unilet-dev/unilet/pkg/cgroups"
	"github.com/unilet-dev/unilet/vmm/shim"
)

// Staged is a pre-forked shim waiting in a pod's staging cgroup; the
// staging cgroup becomes the container's cgroup by a rename, so no process
// migration (a kernel RCU grace period, 8–20 ms here) sits on the start path.
type Staged struct {
	m       *Manager
	idle    *shim.Idle
	warm    *Warm  // a warm clone instead of an idle shim (StageWarm)
	cgroup  string // "" for a warm clone staged without a cgroup
	claimed bool   // its cgroup is a container's now (removed with the container)
}

// stageName names a pod's staging cgroup (a sibling of its VMs' cgroups).
func stageName(sandboxID string) string { return "stage-" + sandboxID[:12] }

// Stage takes an idle shim and places it in the staging cgroup of pod
// sandboxID (cgroup parent parent); nil when there is no pool, no cgroups,
// cgroup v2 (no rename), no idle shim or MaxStaged are waiting already.
func (m *Manager) Stage(sandboxID, parent string) *Staged {
	if m.cfg.Pool == nil || m.cfg.CgroupRoot == "" || cgroups.Unified() || len(sandboxID) < 12 {
		return nil
	}
	path, err := cgroups.Path(parent, m.cfg.CgroupRoot, stageName(sandboxID))
	if err != nil {
		return nil
	}
	if m.staged.Add(1) > MaxStaged {
		m.staged.Add(-1)
		return nil
	}
	idle := m.cfg.Pool.Take()
	if idle == nil {
		m.staged.Add(-1)
		return nil
	}
	cg, err := m.createCgroup(path, cgroups.Resources{})
	if err == nil {
		if err = cg.Add(idle.Pid()); err != nil {
			_ = m.deleteCgroup(path)
		}
	}
	if err != nil {
		logrus.WithError(err).WithField("sandbox", sandboxID).Debug("staging a shim failed; the VM starts without")
		idle.Discard()
		m.staged.Add(-1)
		return nil
	}
	// Using or discarding it frees its slot.
	return &Staged{m: m, idle: idle.OnRelease(func() { m.staged.Add(-1) }), cgroup: path}
}

// Claim turns a staged shim's cgroup into cgroup (the container's) and
// returns it claimed, for StartSpec.Staged; nil (and the staged shim ended)
// when that fails or st is nil.
func (m *Manager) Claim(st *Staged, cgroup string) *Staged {
	if st == nil {
		return nil
	}
	if st.warm != nil && st.cgroup == "" { // Start moves it into cgroup
		return st
	}
	if cgroup == "" {
		st.Drop()
		return nil
	}
	if err := st.m.renameCgroup(st.cgroup, cgroup); err != nil {
		logrus.WithError(err).Debug("using the staged shim failed; the VM starts without")
		st.Drop()
		return nil
	}
	return &Staged{m: st.m, idle: st.idle, warm: st.warm, cgroup: cgroup, claimed: true}
}

// Drop ends a staged shim and removes its staging cgroup; a claimed one's
// cgroup is the container's and stays for its cleanup (nil: nothing to do).
func (st *Staged) Drop() {
	if st == nil {
		return
	}
	st.idle.Discard()
	st.warm.Discard()
	if !st.claimed && st.cgroup != "" {
		_ = st.m.deleteCgroup(st.cgroup)
	}
}

// DropStaging removes the staging cgroup of pod sandboxID left by an
// earlier daemon (its idle shim did not survive: the pool ends idle shims).
func (m *Manager) DropStaging(sandboxID, parent string) {
	if m.cfg.CgroupRoot == "" || len(sandboxID) < 12 {
		return
	}
	if p, err := cgroups.Path(parent, m.cfg.CgroupRoot, stageName(sandboxID)); err == nil {
		_ = m.deleteCgroup(p)
	}
}
