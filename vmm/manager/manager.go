// Package manager owns the lifecycle of VMs beneath the CRI translation
// (cri/unikernel): the per-VM directories under the state directory, pre-forked
// shims and the ones staged in a pod's cgroup, the VMs' cgroups, launching
// a VM under its shim, reconnecting to live shims after a daemon restart,
// and reaping what no record claims. Every call to a shim carries a context
// with one of the named deadlines below, so a stuck shim only fails its own
// VM's calls. Paths and PIDs that come from disk are used only once proven
// to be unilet's own (IDs of the right form, directories inside the state
// directory, PIDs checked by executable and command line).
package manager

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/unilet-dev/unilet/pkg/cgroups"
	"github.com/unilet-dev/unilet/vmm"
	"github.com/unilet-dev/unilet/vmm/shim"
	"github.com/unilet-dev/unilet/vmm/shim/api"
)

// Deadlines of shim calls.
const (
	// CallTimeout bounds a short shim call (state, reopen-log, shutdown).
	CallTimeout = 5 * time.Second
	// StatsTimeout bounds a stats call (kubelet polls stats often).
	StatsTimeout = 2 * time.Second
	// StopGrace is how long a stop may take beyond the guest's power-down
	// timeout: the shim kills QEMU and reports the exit within it.
	StopGrace = 10 * time.Second
	// ReconnectTimeout bounds reconnecting to a shim, including waiting for
	// a Start the previous daemon left in flight.
	ReconnectTimeout = 25 * time.Second
	// LaunchTimeout bounds a VM start: a shim to exec and QEMU to come up
	// on QMP (a busy node starts many VMs at once).
	LaunchTimeout = vmm.DefaultStartTimeout + 15*time.Second
)

// MaxStaged bounds the shims waiting staged for pods whose container is
// not started yet (memory, and a burst of refills when many pods are made).
const MaxStaged = 8

// VM is a running VM behind its shim (*shim.Handle); an interface so the
// CRI translation can be tested without processes.
type VM interface {
	Done() <-chan struct{}
	Exit() vmm.ExitStatus
	Stop(ctx context.Context, timeout time.Duration) (vmm.ExitStatus, error)
	ReopenLog(ctx context.Context) error
	Pid() int
	StartedAt() time.Time
	Stats(ctx context.Context) (vmm.Stats, error)
	Attach(ctx context.Context, in io.Reader, out io.Writer) error
	// KillShim ends a shim that does not answer (its QEMU dies with it).
	KillShim() error
	// Snapshot writes a VM started as a template's device state and RAM
	// to dir (state, ram); the VM stays paused.
	Snapshot(ctx context.Context, dir string) (stateBytes, ramBytes int64, err error)
	// Pause stops the guest's vCPUs; Resume runs them again.
	Pause(ctx context.Context) error
	Resume(ctx context.Context) error
	// Idle reports whether scale-to-zero holds the VM suspended (or, with
	// autostart off, not yet started), since when, and how often it woke.
	Idle(ctx context.Context) (suspended bool, since time.Time, wakes int, err error)
	// FirstOutput reports when the console gave its first bytes (zero: not yet).
	FirstOutput(ctx context.Context) (time.Time, error)
	// Release ends the shim of an ended VM and drops the connection.
	Release(ctx context.Context) error
	// Close drops the daemon's connection; the VM goes on.
	Close() error
}

// Config is what the manager needs from the daemon.
type Config struct {
	QEMU       string
	StateDir   string // VM directories live in StateDir/vm
	ShimBinary string
	// CgroupRoot is the cgroup parent of VMs whose pod names none; ""
	// disables cgroups.
	CgroupRoot string
	// Pool hands out pre-forked shims (nil: every VM spawns its own).
	Pool *shim.Pool
	// Jail confines every QEMU with a uid of this range (nil: the jail is
	// off and QEMU runs as root, as its shim).
	Jail *JailIDs
}

// Manager runs VMs.
type Manager struct {
	cfg    Config
	vmRoot string
	staged atomic.Int32 // staged shims alive (≤ MaxStaged)
	ids    idPool
}

// New returns a manager; StateDir must be an absolute path.
func New(cfg Config) (*Manager, error) {
	if !filepath.IsAbs(cfg.StateDir) {
		return nil, fmt.Errorf("state directory %q is not an absolute path", cfg.StateDir)
	}
	cfg.StateDir = filepath.Clean(cfg.StateDir)
	m := &Manager{cfg: cfg, vmRoot: filepath.Join(cfg.StateDir, "vm")}
	if cfg.Jail != nil {
		if err := cfg.Jail.Validate(); err != nil {
			return nil, err
		}
		m.ids.r = *cfg.Jail
	}
	return m, nil
}

// Jailed reports whether QEMUs are jailed.
func (m *Manager) Jailed() bool { return m.cfg.Jail != nil }

// Cgroups reports whether VMs get cgroups.
func (m *Manager) Cgroups() bool { return m.cfg.CgroupRoot != "" }

// PoolIdle reports the idle pre-forked shims (-1: no pool).
func (m *Manager) PoolIdle() int {
	if m.cfg.Pool == nil {
		return -1
	}
	return m.cfg.Pool.Idle()
}

// dirName is the name of a VM directory: unix socket paths are limited to
// 108 bytes, so it is the ID's first 16 characters.
func dirName(id string) string { return id[:16] }

// Dir returns the VM directory of container id. Only IDs of unilet's own
// form (64 hex digits) have one, so a record can never point it elsewhere.
func (m *Manager) Dir(id string) (string, error) {
	if !validID(id) {
		return "", fmt.Errorf("container ID %q is not a unilet ID: %w", id, ErrUntrusted)
	}
	return filepath.Join(m.vmRoot, dirName(id)), nil
}

// ErrUntrusted marks data from disk that does not prove to be unilet's own.
var ErrUntrusted = errors.New("not one of unilet's own")

func validID(id string) bool {
	if len(id) != 64 {
		return false
	}
	for _, c := range id {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// CgroupPath is the cgroup of container id in a pod whose cgroup parent is
// parent (empty: the configured root); "" when cgroups are off.
func (m *Manager) CgroupPath(parent, id string) (string, error) {
	if m.cfg.CgroupRoot == "" {
		return "", nil
	}
	return cgroups.Path(parent, m.cfg.CgroupRoot, id)
}

// StartSpec is one VM to start.
type StartSpec struct {
	ID        string
	Machine   vmm.MachineConfig
	LogPath   string
	Cgroup    string // "" = none
	Resources cgroups.Resources
	// Staged is a shim already in Cgroup (from Stage + Claim), or nil;
	// Start consumes it.
	Staged *Staged
	// Groups are the pod's supplementary groups, which a jailed QEMU keeps
	// (volumes shared through fsGroup or supplementalGroups).
	Groups []uint32
	// Pod names the pod whose VMs share a jail id ("" = none).
	Pod string
	// Restore starts the VM from a template (Machine has Incoming and
	// private RAM); nil boots it.
	Restore *vmm.RestoreSpec
	// Idle is the VM's scale-to-zero and autostart (nil: always running).
	Idle *vmm.IdleSpec
}

// Timings is where a VM start spent its time.
type Timings struct{ Cgroup, Spawn, Boot time.Duration }

// Start boots a VM under its shim. On error nothing is left: no shim, no
// QEMU, no directory, no cgroup, no jail uid — each step pushes its undo on
// one cleanup stack, run newest first when a later step fails. Cancelling
// ctx aborts the start the same way.
func (m *Manager) Start(ctx context.Context, s StartSpec) (_ VM, tm Timings, err error) {
	var undo cleanups
	defer func() {
		if err != nil {
			undo.run(func(what string, uerr error) {
				logrus.WithError(uerr).WithFields(logrus.Fields{"container": s.ID, "step": what}).Warn("undo a step of a VM start that failed")
			})
		}
	}()
	// The staged shim is ended unless launch takes it (launch consumes it
	// either way: started, or discarded when it cannot be adopted).
	staged := s.Staged
	undo.push("staged shim", func() error { staged.Drop(); return nil })
	dir, err := m.Dir(s.ID)
	if err != nil {
		return nil, tm, err
	}
	if m.cfg.ShimBinary == "" {
		return nil, tm, errors.New("no unilet-shim configured")
	}
	t0 := time.Now()
	var cg cgroups.Cgroup
	if s.Cgroup != "" {
		if cg, err = m.createCgroup(s.Cgroup, s.Resources); err != nil {
			return nil, tm, err
		}
		undo.push("cgroup "+s.Cgroup, func() error { return m.deleteCgroup(s.Cgroup) })
	}
	tm.Cgroup = time.Since(t0)
	if staged != nil && staged.warm != nil { // a warm clone: only moved and run
		st := staged
		staged = nil
		undo.push("warm clone", func() error { st.warm.Discard(); return nil }) // and its directory
		t1 := time.Now()
		h, err := m.startWarm(ctx, s, st, cg)
		if err != nil {
			return nil, tm, err
		}
		undo.keep()
		tm.Boot = time.Since(t1)
		return h, tm, nil
	}
	spec := vmm.VMSpec{QEMU: m.cfg.QEMU, Machine: s.Machine, StateDir: dir, LogPath: s.LogPath, Restore: s.Restore, Idle: s.Idle}
	if m.cfg.Jail != nil {
		id, err := m.ids.take(m.vmRoot, dirName(s.ID), s.Pod)
		if err != nil {
			return nil, tm, err
		}
		undo.push("jail uid", func() error { m.ids.release(dirName(s.ID)); return nil })
		spec.Jail = &vmm.JailSpec{UID: id, GID: id, Groups: s.Groups, Pod: s.Pod}
	}
	// The shim makes the directory; whatever it left there goes with it.
	undo.push("VM directory "+dir, func() error { return os.RemoveAll(dir) })
	var idle *shim.Idle
	if staged != nil {
		idle, staged = staged.idle, nil
	}
	c, err := m.launch(ctx, dir, spec, cg, idle)
	if err != nil {
		return nil, tm, err
	}
	// Connected but unusable: end the shim (QEMU dies with it).
	undo.push("shim", func() error { m.endShim(c); return nil })
	hctx, cancel := context.WithTimeout(ctx, CallTimeout)
	h, err := shim.NewHandle(hctx, c)
	cancel()
	if err != nil {
		return nil, tm, err
	}
	undo.keep()
	tm.Spawn, tm.Boot = c.Spawn, c.Boot
	return h, tm, nil
}

// launch starts the VM's shim: the staged one if any, else one from the
// pool, else a fresh one. Each attempt has a deadline of its own
// (LaunchTimeout; adopting an idle shim is bounded by shim.AdoptTimeout
// within it), so a stuck idle shim costs a start seconds, not its whole
// deadline; ctx cancels them all. staged is consumed either way.
func (m *Manager) launch(ctx context.Context, dir string, spec vmm.VMSpec, cg cgroups.Cgroup, staged *shim.Idle) (*shim.Client, error) {
	if staged != nil { // already in its cgroup
		sctx, cancel := context.WithTimeout(ctx, LaunchTimeout)
		c, err := staged.Start(sctx, dir, spec, nil)
		cancel()
		if err == nil || !shim.IsAdoptError(err) {
			return c, err
		}
		logrus.WithError(err).Warn("the staged shim could not be adopted; starting another")
	}
	ctx, cancel := context.WithTimeout(ctx, LaunchTimeout)
	defer cancel()
	var join func(int) error
	if cg != nil {
		join = func(pid int) error {
			if err := cg.Add(pid); err != nil {
				return fmt.Errorf("place the VM in cgroup %s: %w", cg.Path(), err)
			}
			return nil
		}
	}
	if m.cfg.Pool != nil {
		return m.cfg.Pool.Launch(ctx, dir, spec, join)
	}
	return shim.Launch(ctx, m.cfg.ShimBinary, dir, spec, join)
}

// endShim ends a shim and its VM, if any: asked first, killed (the process
// pinned when connecting; QEMU dies with it) if it does not answer.
func (m *Manager) endShim(c *shim.Client) {
	ctx, cancel := context.WithTimeout(context.Background(), CallTimeout)
	defer cancel()
	_, kerr := c.Kill(ctx, &api.KillRequest{})
	_, serr := c.Shutdown(ctx, &api.ShutdownRequest{})
	if kerr != nil && serr != nil {
		if err := c.KillShim(); err == nil {
			logrus.WithField("dir", c.Dir).Warn("a unilet-shim did not answer; killed it")
		}
	}
	c.Close()
}

// Reconnect connects to the live shim of container id. It returns
// ErrNoShim when nothing serves the VM directory, and ends (and reports
// shim.ErrNeverStarted for) a shim that never started its VM.
func (m *Manager) Reconnect(ctx context.Context, id string) (VM, error) {
	dir, err := m.Dir(id)
	if err != nil {
		return nil, err
	}
	c, err := shim.Connect(dir)
	if err != nil {
		// Nothing serves the directory. A shim the earlier daemon launched
		// may still be coming up (that daemon died before it served): it
		// would wait for a Start that never comes, so it is ended.
		if n := shim.KillShimsOf(m.cfg.ShimBinary, dir); n > 0 {
			logrus.WithField("dir", dir).Warn("ended a unilet-shim that was still coming up when the earlier daemon died")
		}
		return nil, ErrNoShim
	}
	ctx, cancel := context.WithTimeout(ctx, ReconnectTimeout)
	defer cancel()
	h, err := shim.NewHandle(ctx, c)
	if err != nil {
		if ctx.Err() != nil {
			// Slow or stopped, not gone: never ended for that (the caller
			// tries again); its VM runs on.
			c.Close()
			return nil, fmt.Errorf("%w: %v", ErrShimNotAnswering, err)
		}
		m.endShim(c)
		return nil, err
	}
	return h, nil
}

// ErrNoShim: no shim serves the VM directory.
var ErrNoShim = errors.New("no shim serves this VM")

// ErrShimNotAnswering: a shim serves the VM directory but did not answer in time.
var ErrShimNotAnswering = errors.New("the VM's unilet-shim did not answer")

// KillUnanswering kills the shim serving the VM directory of container id
// that does not answer (QEMU dies with it, by its parent-death signal),
// once the process at the socket's other end — pinned by a pidfd — is
// proven a unilet-shim serving a directory of this state directory; it
// waits for it to end. Nothing serving the directory: nothing to do.
func (m *Manager) KillUnanswering(id string) error {
	dir, err := m.Dir(id)
	if err != nil {
		return err
	}
	c, err := shim.Connect(dir)
	if err != nil {
		return nil
	}
	defer c.Close()
	if !shim.IsShimUnder(c.ShimPid(), m.cfg.ShimBinary, m.cfg.StateDir) {
		return fmt.Errorf("the process serving %s (pid %d) is not proven to be a unilet-shim; left alone", dir, c.ShimPid())
	}
	if err := c.KillShim(); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), CallTimeout)
	defer cancel()
	if err := c.WaitExit(ctx); err != nil {
		return fmt.Errorf("the killed unilet-shim of %s was not seen to end: %w", dir, err)
	}
	return nil
}

// ReadExit returns the exit a shim recorded for container id.
func (m *Manager) ReadExit(id string) (vmm.ExitStatus, bool) {
	dir, err := m.Dir(id)
	if err != nil {
		return vmm.ExitStatus{}, false
	}
	return shim.ReadExit(dir)
}

// KillStray ends the QEMU of container id whose PID an earlier daemon
// recorded, only if that PID is proven to be this VM's QEMU.
func (m *Manager) KillStray(id string, pid int) bool {
	dir, err := m.Dir(id)
	if err != nil {
		return false
	}
	return shim.KillQEMU(pid, dir)
}

// Release ends the shim of an ended VM (waiting for it to exit) and
// removes the VM directory and cgroup. Call it only after the exit was
// recorded: it deletes the shim's exit.json.
func (m *Manager) Release(id string, vm VM, cgroup string) error {
	if vm != nil {
		ctx, cancel := context.WithTimeout(context.Background(), CallTimeout)
		if err := vm.Release(ctx); err != nil {
			logrus.WithError(err).WithField("container", id).Debug("ending the shim of an ended VM")
		}
		cancel()
	}
	return m.Cleanup(id, cgroup)
}

// Cleanup removes the VM directory of id and its cgroup. The cgroup is
// removed before the caller forgets the container (a cgroup whose record
// is gone would be left for good); its last processes may still be
// exiting, so this can take up to a few seconds.
func (m *Manager) Cleanup(id, cgroup string) error {
	if dir, err := m.Dir(id); err == nil {
		if err := os.RemoveAll(dir); err != nil {
			return fmt.Errorf("remove the VM directory: %w", err)
		}
		m.ids.release(dirName(id))
	}
	if cgroup == "" {
		return nil
	}
	if err := m.deleteCgroup(cgroup); err != nil {
		return fmt.Errorf("remove the VM's cgroup %s: %w", cgroup, err)
	}
	return nil
}

// Sweep ends and removes every VM directory that no live container claims
// (keep reports the directory names to keep): a crash between launching a
// shim and recording it, or between recording an exit and removing the
// directory. Anything in the VM root that is not a directory of unilet's
// form is left alone and reported.
func (m *Manager) Sweep(keep func(dirName string) bool) {
	ents, err := os.ReadDir(m.vmRoot)
	if err != nil {
		return
	}
	for _, e := range ents {
		name := e.Name()
		if keep(name) {
			continue
		}
		dir := filepath.Join(m.vmRoot, name)
		if !e.IsDir() || len(name) != 16 || !validID(name+strings.Repeat("0", 48)) {
			logrus.WithField("path", dir).Warn("unexpected entry in the VM state directory; left alone")
			continue
		}
		if c, err := shim.Connect(dir); err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), CallTimeout)
			st, err := c.State(ctx, &api.StateRequest{})
			cancel()
			if err == nil && st.Running {
				logrus.WithFields(logrus.Fields{"dir": dir, "pid": st.Pid}).Warn("stopping a VM that no container record claims")
			}
			m.endShim(c)
		}
		_ = os.RemoveAll(dir)
		m.ids.release(name)
	}
}

// QEMUOf reads the command line of container id's QEMU at pid (as its shim
// reported it) once /proc proves it is that VM's QEMU (shim.IsQEMUOf);
// shimPid is its parent when proven a unilet-shim of this state directory
// (0 otherwise).
func (m *Manager) QEMUOf(id string, pid int) (argv []string, shimPid int, ok bool) {
	dir, err := m.Dir(id)
	if err != nil || !shim.IsQEMUOf(pid, dir) {
		return nil, 0, false
	}
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || len(raw) == 0 {
		return nil, 0, false
	}
	if pp := shim.Parent(pid); shim.IsShimUnder(pp, m.cfg.ShimBinary, m.cfg.StateDir) {
		shimPid = pp
	}
	return strings.Split(strings.TrimRight(string(raw), "\x00"), "\x00"), shimPid, true
}
