package unikernel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/unilet-dev/unilet/cri/store"
	"github.com/unilet-dev/unilet/vmm"
	"github.com/unilet-dev/unilet/vmm/manager"
)

// fakeVMs is VMs without processes: Start hands out fakeVMs, Reconnect
// answers what a test scripted, and every call is logged, so the verbs and
// the restart reconciliation are tested against the door alone.
type fakeVMs struct {
	root string // VM directories would live here (never made)

	mu        sync.Mutex
	calls     []string
	startErr  error
	started   map[string]*fakeVM                    // by container ID, live VMs handed out
	dirs      map[string]bool                       // VM directories that exist (Start → Cleanup)
	reconnect map[string]func() (manager.VM, error) // by container ID; missing: ErrNoShim
	exits     map[string]vmm.ExitStatus             // what shims recorded
	owners    map[string][]byte                     // WriteOwner
	cgroups   map[string]manager.Resources          // made by Start, removed by Cleanup
	usage     manager.Usage
	swept     []string // VM directory names Sweep found unclaimed
}

func newFakeVMs(root string) *fakeVMs {
	return &fakeVMs{root: root, started: map[string]*fakeVM{}, dirs: map[string]bool{},
		reconnect: map[string]func() (manager.VM, error){}, exits: map[string]vmm.ExitStatus{},
		owners: map[string][]byte{}, cgroups: map[string]manager.Resources{}}
}

func (f *fakeVMs) log(format string, a ...any) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, fmt.Sprintf(format, a...))
}

// called lists the logged calls that start with prefix.
func (f *fakeVMs) called(prefix string) []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for _, c := range f.calls {
		if strings.HasPrefix(c, prefix) {
			out = append(out, c)
		}
	}
	return out
}

func (f *fakeVMs) QEMUOf(id string, pid int) ([]string, int, bool) { return nil, 0, false }

func (f *fakeVMs) Dir(id string) (string, error) {
	if !store.ValidID(id) {
		return "", fmt.Errorf("container ID %q is not a unilet ID: %w", id, manager.ErrUntrusted)
	}
	return filepath.Join(f.root, id[:16]), nil
}

func (f *fakeVMs) CgroupPath(parent, id string) (string, error) {
	return "/fake/" + strings.TrimPrefix(parent, "/") + "/" + id, nil
}
func (f *fakeVMs) Stage(string, string) *manager.Staged          { return nil }
func (f *fakeVMs) Claim(*manager.Staged, string) *manager.Staged { return nil }
func (f *fakeVMs) StartWarm(context.Context, manager.StartSpec) (*manager.Warm, error) {
	return nil, errors.New("no warm clones in the fake")
}
func (f *fakeVMs) StageWarm(string, string, *manager.Warm) *manager.Staged { return nil }
func (f *fakeVMs) DropStaging(sandboxID, parent string)                    { f.log("DropStaging %s", sandboxID) }
func (f *fakeVMs) AdoptCgroup(parent, id string)                           { f.log("AdoptCgroup %s", id) }
func (f *fakeVMs) PoolIdle() int                                           { return -1 }
func (f *fakeVMs) ReadExit(id string) (vmm.ExitStatus, bool) {
	ex, ok := f.exits[id]
	return ex, ok
}
func (f *fakeVMs) SweepCgroups(claimed func(id string) bool) { f.log("SweepCgroups") }
func (f *fakeVMs) Owners(fn func(dirName string, b []byte))  {}
func (f *fakeVMs) WriteOwner(id string, b []byte) error {
	f.mu.Lock()
	f.owners[id] = b
	f.mu.Unlock()
	return nil
}
func (f *fakeVMs) KillUnanswering(id string) error   { f.log("KillUnanswering %s", id); return nil }
func (f *fakeVMs) KillStray(id string, pid int) bool { f.log("KillStray %s %d", id, pid); return true }
func (f *fakeVMs) UpdateResources(cgroup string, r manager.Resources) error {
	f.log("UpdateResources %s", cgroup)
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.cgroups[cgroup]; !ok {
		return fmt.Errorf("cgroup %s: unilet has no record of making it", cgroup)
	}
	f.cgroups[cgroup] = r
	return nil
}

func (f *fakeVMs) Usage(ctx context.Context, vm manager.VM, cgroup string) (manager.Usage, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.usage, nil
}

func (f *fakeVMs) Start(ctx context.Context, s manager.StartSpec) (manager.VM, manager.Timings, error) {
	f.log("Start %s", s.ID)
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.startErr != nil {
		return nil, manager.Timings{}, f.startErr
	}
	vm := newFakeVM(1000 + len(f.started))
	f.started[s.ID], f.dirs[s.ID[:16]] = vm, true
	if s.Cgroup != "" {
		f.cgroups[s.Cgroup] = s.Resources
	}
	return vm, manager.Timings{}, nil
}

func (f *fakeVMs) Reconnect(ctx context.Context, id string) (manager.VM, error) {
	f.log("Reconnect %s", id)
	f.mu.Lock()
	fn := f.reconnect[id]
	f.mu.Unlock()
	if fn == nil {
		return nil, manager.ErrNoShim
	}
	return fn()
}

func (f *fakeVMs) Release(id string, vm manager.VM, cgroup string) error {
	f.log("Release %s", id)
	return f.Cleanup(id, cgroup)
}

func (f *fakeVMs) Cleanup(id, cgroup string) error {
	f.log("Cleanup %s", id)
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(id) >= 16 {
		delete(f.dirs, id[:16])
	}
	delete(f.cgroups, cgroup)
	return nil
}

func (f *fakeVMs) Sweep(keep func(dirName string) bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for d := range f.dirs {
		if !keep(d) {
			f.swept = append(f.swept, d)
			delete(f.dirs, d)
		}
	}
	sort.Strings(f.swept)
}

// left reports what the fake still holds: VM directories and cgroups.
func (f *fakeVMs) left() (dirs, cgroups []string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for d := range f.dirs {
		dirs = append(dirs, d)
	}
	for c := range f.cgroups {
		cgroups = append(cgroups, c)
	}
	sort.Strings(dirs)
	sort.Strings(cgroups)
	return dirs, cgroups
}

// fakeVM is a VM whose calls return at once; end makes it exit on its own.
type fakeVM struct {
	done chan struct{}
	pid  int

	mu      sync.Mutex
	exit    vmm.ExitStatus
	stopped time.Duration // the timeout Stop was called with (-1: never)
	closed  bool
}

func newFakeVM(pid int) *fakeVM {
	return &fakeVM{done: make(chan struct{}), pid: pid, stopped: -1}
}

// end makes the VM exit with ex, as a guest powering off would.
func (f *fakeVM) end(ex vmm.ExitStatus) {
	f.mu.Lock()
	defer f.mu.Unlock()
	select {
	case <-f.done:
	default:
		f.exit = ex
		close(f.done)
	}
}

func (f *fakeVM) Done() <-chan struct{} { return f.done }
func (f *fakeVM) Exit() vmm.ExitStatus {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.exit
}
func (f *fakeVM) Stop(_ context.Context, timeout time.Duration) (vmm.ExitStatus, error) {
	f.mu.Lock()
	f.stopped = timeout
	f.mu.Unlock()
	ex := vmm.ExitStatus{Code: 0, Reason: vmm.ReasonCompleted, FinishedAt: time.Now()}
	f.end(ex)
	return f.Exit(), nil
}
func (f *fakeVM) ReopenLog(context.Context) error { return nil }
func (f *fakeVM) Pid() int                        { return f.pid }
func (f *fakeVM) StartedAt() time.Time            { return time.Time{} }
func (f *fakeVM) Stats(context.Context) (vmm.Stats, error) {
	return vmm.Stats{}, nil
}
func (f *fakeVM) Attach(context.Context, io.Reader, io.Writer) error { return nil }
func (f *fakeVM) KillShim() error                                    { return errors.New("not a process") }
func (f *fakeVM) Release(context.Context) error                      { return nil }
func (f *fakeVM) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = true
	return nil
}

func (f *fakeVM) Snapshot(context.Context, string) (int64, int64, error) {
	return 0, 0, errors.New("a fake VM has no state")
}
func (f *fakeVM) Pause(context.Context) error  { return nil }
func (f *fakeVM) Resume(context.Context) error { return nil }
func (f *fakeVM) Idle(context.Context) (bool, time.Time, int, error) {
	return false, time.Time{}, 0, nil
}

func (f *fakeVM) FirstOutput(context.Context) (time.Time, error) { return time.Time{}, nil }
