package unikernel

import (
	"context"

	"github.com/unilet-dev/unilet/vmm"
	"github.com/unilet-dev/unilet/vmm/manager"
)

// VMs is the only door from the CRI translation to VMs: vmm/manager
// satisfies it in the daemon, a fake in this package's unit tests. Shims,
// cgroups, QEMU and the VM directories stay behind it; the verbs and the
// restart reconciliation see only these calls and manager.VM handles.
type VMs interface {
	// Dir is the VM directory of container id (an error for an ID not of
	// unilet's form); CgroupPath its cgroup in a pod whose cgroup parent is
	// parent ("" when cgroups are off).
	Dir(id string) (string, error)
	// QEMUOf reads a container's QEMU command line, once proven its own.
	QEMUOf(id string, pid int) (argv []string, shimPid int, ok bool)
	CgroupPath(parent, id string) (string, error)

	// Stage places an idle shim in a new pod's staging cgroup (nil: none);
	// Claim makes it a container's; DropStaging removes a staging cgroup an
	// earlier daemon left.
	Stage(sandboxID, parent string) *manager.Staged
	Claim(st *manager.Staged, cgroup string) *manager.Staged
	DropStaging(sandboxID, parent string)
	// StartWarm starts a warm clone (a template restored, held paused, for
	// a container ID of its own); StageWarm stages one for a new pod.
	StartWarm(ctx context.Context, s manager.StartSpec) (*manager.Warm, error)
	StageWarm(sandboxID, parent string, w *manager.Warm) *manager.Staged

	// Start boots a VM; on error nothing is left.
	Start(ctx context.Context, s manager.StartSpec) (manager.VM, manager.Timings, error)
	// Usage reads a running VM's usage; UpdateResources sets its cgroup's limits.
	Usage(ctx context.Context, vm manager.VM, cgroup string) (manager.Usage, error)
	UpdateResources(cgroup string, r manager.Resources) error
	// WriteOwner keeps a copy of a running VM's records in its directory;
	// Owners lists them (a corrupted database is rebuilt from them).
	WriteOwner(id string, b []byte) error
	Owners(fn func(dirName string, b []byte))

	// Reconnect adopts the live VM of container id after a restart:
	// manager.ErrNoShim, manager.ErrShimNotAnswering or
	// manager.ErrNeverStarted when there is none to adopt.
	Reconnect(ctx context.Context, id string) (manager.VM, error)
	// ReadExit is the exit a VM's shim recorded; KillStray ends a QEMU left
	// without its shim (proven first); KillUnanswering kills a shim that
	// does not answer (proven first).
	ReadExit(id string) (vmm.ExitStatus, bool)
	KillStray(id string, pid int) bool
	KillUnanswering(id string) error
	// AdoptCgroup records a cgroup an earlier unilet made without a ledger.
	AdoptCgroup(parent, id string)
	// Sweep ends VM directories no container claims; SweepCgroups removes
	// recorded cgroups no container claims.
	Sweep(keep func(dirName string) bool)
	SweepCgroups(claimed func(id string) bool)

	// Release ends the shim of an ended VM, then Cleanup; Cleanup removes
	// a VM's directory and cgroup.
	Release(id string, vm manager.VM, cgroup string) error
	Cleanup(id, cgroup string) error

	// PoolIdle is the number of idle pre-forked shims (-1: no pool).
	PoolIdle() int
}

var _ VMs = (*manager.Manager)(nil)
