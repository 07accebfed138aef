package manager

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/unilet-dev/unilet/pkg/cgroups"
	"github.com/unilet-dev/unilet/vmm/shim"
)

// Resources are a VM cgroup's limits.
type Resources = cgroups.Resources

// Usage is what a running VM uses: from its cgroup when it has one (what
// kubelet evicts on), else QEMU's own CPU time and resident memory.
type Usage = cgroups.Stats

// ErrNeverStarted marks a shim that was alive but never booted its VM
// (Reconnect ends it).
var ErrNeverStarted = shim.ErrNeverStarted

// Usage reads the usage of vm, whose cgroup is cgroup ("" = none): the
// cgroup's counters, else the shim's within StatsTimeout (a stuck shim
// gives an error, not a stuck call).
func (m *Manager) Usage(ctx context.Context, vm VM, cgroup string) (Usage, error) {
	if cgroup != "" {
		if cg, err := cgroups.Load(cgroup); err == nil {
			if st, err := cg.Stats(); err == nil {
				return st, nil
			}
		}
	}
	ctx, cancel := context.WithTimeout(ctx, StatsTimeout)
	defer cancel()
	vs, err := vm.Stats(ctx)
	if err != nil {
		return Usage{}, err
	}
	return Usage{Timestamp: vs.Timestamp, CPUNanos: vs.CPUNanos, WorkingSet: vs.RSSBytes, RSS: vs.RSSBytes, MemoryUsage: vs.RSSBytes}, nil
}

// UpdateResources sets new limits on the cgroup of a running VM.
func (m *Manager) UpdateResources(cgroup string, r Resources) error {
	if !m.recorded(cgroup) {
		return fmt.Errorf("cgroup %s: unilet has no record of making it", cgroup)
	}
	cg, err := cgroups.Load(cgroup)
	if err != nil {
		return fmt.Errorf("open the VM's cgroup %s: %w", cgroup, err)
	}
	if err := cg.Update(r); err != nil {
		return fmt.Errorf("update the VM's cgroup %s: %w", cgroup, err)
	}
	return nil
}

// ownerFile is a copy of a running VM's records in its directory: what a
// daemon that finds its database corrupted rebuilds them from.
const ownerFile = "owner.json"

// WriteOwner leaves b (the records of container id and its pod) in the VM's
// directory, replacing what was there.
func (m *Manager) WriteOwner(id string, b []byte) error {
	dir, err := m.Dir(id)
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, ownerFile+".tmp")
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(dir, ownerFile))
}

// Owners calls fn with the name of each VM directory and the records
// WriteOwner left there.
func (m *Manager) Owners(fn func(dirName string, b []byte)) {
	ents, _ := os.ReadDir(m.vmRoot)
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		b, err := os.ReadFile(filepath.Join(m.vmRoot, e.Name(), ownerFile))
		if err != nil {
			continue
		}
		fn(e.Name(), b)
	}
}
