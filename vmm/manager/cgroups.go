package manager

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"

	"github.com/sirupsen/logrus"

	"github.com/unilet-dev/unilet/pkg/cgroups"
	"github.com/unilet-dev/unilet/vmm/shim"
)

// The cgroup ledger: unilet removes only cgroups it made and recorded. Each
// cgroup it makes (a VM's, a pod's staging one) gets a file in
// StateDir/cgroups named by the cgroup's base name and holding its full
// path, written and synced before the cgroup is made and removed after the
// cgroup is gone. A pod's cgroup_parent may name anyone's cgroup (Docker's
// /docker, kubelet's pods): its other children are never touched, and a
// cgroup that exists already is never taken over. Processes left in a
// cgroup being removed are killed only when proven to be unilet's own (see
// owned).

// ErrForeignCgroup: the cgroup exists and unilet did not make it.
var ErrForeignCgroup = errors.New("the cgroup exists and is not unilet's")

func (m *Manager) ledgerDir() string { return filepath.Join(m.cfg.StateDir, "cgroups") }

// ledgerName is the ledger file of cgroup p: its base name when that is one
// of unilet's forms (64 hex digits, stage-<12 hex>, unilet-<64 hex>.scope).
func ledgerName(p string) (string, bool) {
	name := path.Base(p)
	id := strings.TrimSuffix(strings.TrimPrefix(name, "unilet-"), ".scope")
	if stage, ok := strings.CutPrefix(id, "stage-"); ok {
		return name, len(stage) == 12 && validID(stage+strings.Repeat("0", 52))
	}
	return name, validID(id)
}

// record writes p into the ledger (synced) before the cgroup is made.
func (m *Manager) record(p string) error {
	name, ok := ledgerName(p)
	if !ok || !path.IsAbs(p) || path.Clean(p) != p {
		return fmt.Errorf("cgroup %q is not of unilet's form", p)
	}
	if err := os.MkdirAll(m.ledgerDir(), 0o700); err != nil {
		return err
	}
	tmp := filepath.Join(m.ledgerDir(), "."+name+".tmp")
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	_, err = f.WriteString(p)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, filepath.Join(m.ledgerDir(), name))
	}
	if err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("record cgroup %s: %w", p, err)
	}
	return nil
}

// recorded reports whether the ledger holds exactly p.
func (m *Manager) recorded(p string) bool {
	name, ok := ledgerName(p)
	if !ok {
		return false
	}
	b, err := os.ReadFile(filepath.Join(m.ledgerDir(), name))
	return err == nil && string(b) == p
}

func (m *Manager) forget(p string) {
	if name, ok := ledgerName(p); ok && m.recorded(p) {
		_ = os.Remove(filepath.Join(m.ledgerDir(), name))
	}
}

// createCgroup records and makes the cgroup p. A cgroup at p that unilet
// did not record is someone else's: ErrForeignCgroup, nothing touched.
func (m *Manager) createCgroup(p string, r cgroups.Resources) (cgroups.Cgroup, error) {
	if cgroups.Exists(p) && !m.recorded(p) {
		return nil, fmt.Errorf("cgroup %s: %w", p, ErrForeignCgroup)
	}
	if err := m.record(p); err != nil {
		return nil, err
	}
	cg, err := cgroups.Create(p, r)
	if err != nil {
		m.forget(p)
		return nil, err
	}
	return cg, nil
}

// deleteCgroup removes the cgroup p if unilet recorded it, killing only
// processes proven to be its own that are still in it, then forgets it. A
// cgroup it did not record is left (logged).
func (m *Manager) deleteCgroup(p string) error {
	if !m.recorded(p) {
		if cgroups.Exists(p) {
			logrus.WithField("cgroup", p).Warn("not removing a cgroup unilet has no record of making")
		}
		return nil
	}
	if cg, err := cgroups.Load(p); err == nil && cgroups.Exists(p) {
		if err := cg.Delete(m.owned); err != nil {
			return err
		}
	}
	m.forget(p)
	return nil
}

// renameCgroup turns the recorded cgroup from into to (same parent): to is
// recorded first, from forgotten after.
func (m *Manager) renameCgroup(from, to string) error {
	if !m.recorded(from) {
		return fmt.Errorf("cgroup %s: unilet has no record of making it", from)
	}
	if cgroups.Exists(to) && !m.recorded(to) {
		return fmt.Errorf("cgroup %s: %w", to, ErrForeignCgroup)
	}
	if err := m.record(to); err != nil {
		return err
	}
	if err := cgroups.Rename(from, to); err != nil {
		m.forget(to)
		return err
	}
	m.forget(from)
	return nil
}

// AdoptCgroup records the cgroup p of container id that an earlier unilet
// made before it kept a ledger: p must be the path derived from the pod's
// parent and the container's ID (the caller's record proves the ID ours).
func (m *Manager) AdoptCgroup(parent, id string) {
	p, err := m.CgroupPath(parent, id)
	if err != nil || p == "" || m.recorded(p) || !cgroups.Exists(p) {
		return
	}
	if err := m.record(p); err != nil {
		logrus.WithError(err).WithField("container", id).Warn("recording the cgroup of a restored container")
	}
}

// owned proves pid to be one of unilet's own processes, as a cgroup's last
// occupant may be: a QEMU serving a VM directory of this state directory
// (shim.IsQEMUOf), or a unilet-shim of the configured binary serving a
// directory inside it.
func (m *Manager) owned(pid int) bool {
	if dir, ok := m.dirOf(pid); ok && shim.IsQEMUOf(pid, dir) {
		return true
	}
	return shim.IsShimUnder(pid, m.cfg.ShimBinary, m.cfg.StateDir)
}

// dirOf returns the VM directory a QEMU's marker names, if it is one of
// this manager's.
func (m *Manager) dirOf(pid int) (string, bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	if err != nil {
		return "", false
	}
	for _, kv := range bytes.Split(b, []byte{0}) {
		if dir, ok := strings.CutPrefix(string(kv), shim.MarkerEnvPrefix); ok &&
			filepath.Dir(dir) == m.vmRoot && len(filepath.Base(dir)) == 16 {
			return dir, true
		}
	}
	return "", false
}

// ledgerEntry validates a ledger file (its name and content): the cgroup
// path it records, which must be clean, absolute and end in the file's
// name, one of unilet's forms; and the ID that claims it (a container ID,
// or a 12-digit sandbox ID prefix for a staging cgroup).
func ledgerEntry(file string, content []byte) (p, id string, ok bool) {
	p = string(content)
	name, ok := ledgerName(p)
	if !ok || name != file || !path.IsAbs(p) || path.Clean(p) != p || strings.ContainsRune(p, 0) {
		return "", "", false
	}
	id = strings.TrimSuffix(strings.TrimPrefix(name, "unilet-"), ".scope")
	return p, strings.TrimPrefix(id, "stage-"), true
}

// SweepCgroups removes every recorded cgroup that no live object claims
// (claimed gets a container ID, or a 12-digit sandbox ID prefix for a
// staging cgroup): a daemon killed between making a cgroup and recording
// its container, or between removing a record and its cgroup. Cgroups
// unilet has no record of are never touched, whatever their name.
func (m *Manager) SweepCgroups(claimed func(id string) bool) {
	ents, err := os.ReadDir(m.ledgerDir())
	if err != nil {
		return
	}
	for _, e := range ents {
		file := filepath.Join(m.ledgerDir(), e.Name())
		if strings.HasPrefix(e.Name(), ".") {
			_ = os.Remove(file) // a record never completed: its cgroup was not made
			continue
		}
		b, err := os.ReadFile(file)
		p, id, ok := ledgerEntry(e.Name(), b)
		if err != nil || !ok {
			logrus.WithField("path", file).Warn("unexpected entry in the cgroup ledger; left alone")
			continue
		}
		if claimed(id) {
			continue
		}
		if err := m.deleteCgroup(p); err != nil {
			logrus.WithError(err).WithField("cgroup", p).Warn("remove a cgroup no container claims")
			continue
		}
		logrus.WithField("cgroup", p).Info("removed a cgroup no container claims")
	}
}
