// Package cgroups places a VM (its unilet-shim and QEMU) in a cgroup under the
// pod's cgroup_parent, applies the container's CPU and memory limits to it,
// reads its usage for CRI stats, and removes it. cgroup v1 (cgroupfs, as on
// these nodes) and v2 are handled by github.com/containerd/cgroups; systemd
// style parents ("kubepods-burstable-pod….slice") are expanded to their
// cgroupfs path the way runc does.
package cgroups

import (
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	cg "github.com/containerd/cgroups/v3"
	"github.com/containerd/cgroups/v3/cgroup1"
	"github.com/containerd/cgroups/v3/cgroup2"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/unilet-dev/unilet/pkg/proc"
)

// Resources are the limits unilet sets on a VM's cgroup.
type Resources struct {
	MemoryLimit int64  // bytes; 0 = none
	CPUQuota    int64  // µs per period; 0 = none
	CPUPeriod   uint64 // µs
	CPUShares   uint64 // v1 shares (converted to weight on v2); 0 = default
}

// Stats is a cgroup's usage.
type Stats struct {
	Timestamp   time.Time
	CPUNanos    uint64
	MemoryUsage uint64
	WorkingSet  uint64 // usage minus inactive file cache (what kubelet evicts on)
	RSS         uint64
	MemoryLimit uint64
}

// Cgroup is one VM's cgroup.
type Cgroup interface {
	Path() string
	Add(pid int) error
	Update(Resources) error
	Stats() (Stats, error)
	// Delete removes the cgroup. Processes still in it after a second are
	// killed only where owned(pid) proves them to be the caller's own (the
	// process is pinned by a pidfd before the proof); any other process is
	// left, and Delete then fails naming it. owned may be nil: kill nothing.
	Delete(owned func(pid int) bool) error
}

// Path returns the cgroup path of a VM: <parent>/<name> for cgroupfs parents,
// <expanded slice path>/unilet-<name>.scope for systemd slices. An empty
// parent means defaultParent.
func Path(parent, defaultParent, name string) (string, error) {
	if parent == "" {
		parent = defaultParent
	}
	if strings.HasSuffix(parent, ".slice") && !strings.Contains(parent, "/") {
		p, err := ExpandSlice(parent)
		if err != nil {
			return "", err
		}
		return path.Join(p, "unilet-"+name+".scope"), nil
	}
	if !path.IsAbs(parent) || path.Clean(parent) != parent || strings.Contains(parent, "..") {
		return "", fmt.Errorf("cgroup parent %q is not a clean absolute path", parent)
	}
	return path.Join(parent, name), nil
}

// ExpandSlice turns a systemd slice name into its path: "a-b-c.slice" →
// "/a.slice/a-b.slice/a-b-c.slice" (runc's rule).
func ExpandSlice(slice string) (string, error) {
	name := strings.TrimSuffix(slice, ".slice")
	if name == slice || name == "" || strings.Contains(name, "/") {
		return "", fmt.Errorf("invalid systemd slice %q", slice)
	}
	if name == "-" {
		return "/", nil
	}
	var b strings.Builder
	prefix := ""
	for _, part := range strings.Split(name, "-") {
		if part == "" {
			return "", fmt.Errorf("invalid systemd slice %q", slice)
		}
		b.WriteString("/" + prefix + part + ".slice")
		prefix += part + "-"
	}
	return b.String(), nil
}

func unified() bool { return cg.Mode() == cg.Unified }

func spec(r Resources) *specs.LinuxResources {
	out := &specs.LinuxResources{}
	if r.MemoryLimit > 0 {
		l := r.MemoryLimit
		out.Memory = &specs.LinuxMemory{Limit: &l}
	}
	if r.CPUQuota > 0 || r.CPUShares > 0 {
		out.CPU = &specs.LinuxCPU{}
		if r.CPUQuota > 0 {
			q, p := r.CPUQuota, r.CPUPeriod
			if p == 0 {
				p = 100000
			}
			out.CPU.Quota, out.CPU.Period = &q, &p
		}
		if r.CPUShares > 0 {
			s := r.CPUShares
			out.CPU.Shares = &s
		}
	}
	return out
}

// Create makes the cgroup at p with limits r.
func Create(p string, r Resources) (Cgroup, error) {
	if unified() {
		m, err := cgroup2.NewManager("/sys/fs/cgroup", p, cgroup2.ToResources(spec(r)))
		if err != nil {
			return nil, fmt.Errorf("create cgroup %s: %w", p, err)
		}
		return &v2{p: p, m: m}, nil
	}
	c, err := cgroup1.New(cgroup1.StaticPath(p), spec(r), cgroup1.WithHierarchy(hierarchy))
	if err != nil {
		return nil, fmt.Errorf("create cgroup %s: %w", p, err)
	}
	return &v1{p: p, c: c}, nil
}

// Load opens an existing cgroup.
func Load(p string) (Cgroup, error) {
	if unified() {
		m, err := cgroup2.Load(p)
		if err != nil {
			return nil, err
		}
		return &v2{p: p, m: m}, nil
	}
	c, err := cgroup1.Load(cgroup1.StaticPath(p), cgroup1.WithHierarchy(hierarchy))
	if err != nil {
		return nil, err
	}
	return &v1{p: p, c: c}, nil
}

// hierarchy is the v1 controllers unilet manages (others stay with the parent).
func hierarchy() ([]cgroup1.Subsystem, error) {
	all, err := cgroup1.Default()
	if err != nil {
		return nil, err
	}
	var out []cgroup1.Subsystem
	for _, s := range all {
		switch s.Name() {
		case cgroup1.Memory, cgroup1.Cpu, cgroup1.Cpuacct, cgroup1.Pids:
			out = append(out, s)
		}
	}
	return out, nil
}

// deleteRetry removes a cgroup whose last processes may still be exiting;
// after a second it kills those that owned proves to be the caller's own (a
// VM's QEMU or shim outliving its VM holds nothing anyone needs), never any
// other process.
func deleteRetry(p string, del func() error, exists func() bool, pids func() []int, owned func(int) bool) error {
	var err error
	foreign := map[int]bool{}
	for i := 0; i < 60; i++ {
		if err = del(); err == nil || !exists() {
			return nil
		}
		if i >= 20 {
			for _, pid := range pids() {
				if !foreign[pid] && !proc.KillIfProven(pid, owned) {
					foreign[pid] = true
				}
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	if len(foreign) > 0 {
		var list []string
		for pid := range foreign {
			list = append(list, strconv.Itoa(pid))
		}
		sort.Strings(list)
		return fmt.Errorf("cgroup %s holds processes that are not unilet's (pids %s); they were left alone: %w",
			p, strings.Join(list, ","), err)
	}
	return err
}

// Exists reports whether the cgroup p exists (v1: in the memory hierarchy,
// where every VM cgroup is made).
func Exists(p string) bool {
	root := "/sys/fs/cgroup/memory"
	if unified() {
		root = "/sys/fs/cgroup"
	}
	_, err := os.Stat(filepath.Join(root, p))
	return err == nil
}

type v1 struct {
	p string
	c cgroup1.Cgroup
}

func (c *v1) Path() string             { return c.p }
func (c *v1) Add(pid int) error        { return c.c.Add(cgroup1.Process{Pid: pid}) }
func (c *v1) Update(r Resources) error { return c.c.Update(spec(r)) }
func (c *v1) Delete(owned func(int) bool) error {
	return deleteRetry(c.p, c.c.Delete, func() bool { return c.c.State() != cgroup1.Deleted }, func() []int {
		ps, _ := c.c.Processes(cgroup1.Memory, true)
		var out []int
		for _, p := range ps {
			out = append(out, p.Pid)
		}
		return out
	}, owned)
}

func (c *v1) Stats() (Stats, error) {
	m, err := c.c.Stat(cgroup1.IgnoreNotExist)
	if err != nil {
		return Stats{}, err
	}
	st := Stats{Timestamp: time.Now()}
	if m.CPU != nil && m.CPU.Usage != nil {
		st.CPUNanos = m.CPU.Usage.Total
	}
	if m.Memory != nil && m.Memory.Usage != nil {
		st.MemoryUsage = m.Memory.Usage.Usage
		st.MemoryLimit = m.Memory.Usage.Limit
		st.RSS = m.Memory.TotalRSS
		st.WorkingSet = st.MemoryUsage
		if m.Memory.TotalInactiveFile < st.WorkingSet {
			st.WorkingSet -= m.Memory.TotalInactiveFile
		}
	}
	return st, nil
}

type v2 struct {
	p string
	m *cgroup2.Manager
}

func (c *v2) Path() string             { return c.p }
func (c *v2) Add(pid int) error        { return c.m.AddProc(uint64(pid)) }
func (c *v2) Update(r Resources) error { return c.m.Update(cgroup2.ToResources(spec(r))) }
func (c *v2) Delete(owned func(int) bool) error {
	return deleteRetry(c.p, c.m.Delete, func() bool {
		_, err := os.Stat(path.Join("/sys/fs/cgroup", c.p))
		return !errors.Is(err, os.ErrNotExist)
	}, func() []int {
		ps, _ := c.m.Procs(true)
		var out []int
		for _, p := range ps {
			out = append(out, int(p))
		}
		return out
	}, owned)
}

func (c *v2) Stats() (Stats, error) {
	m, err := c.m.Stat()
	if err != nil {
		return Stats{}, err
	}
	st := Stats{Timestamp: time.Now()}
	if m.CPU != nil {
		st.CPUNanos = m.CPU.UsageUsec * 1000
	}
	if m.Memory != nil {
		st.MemoryUsage, st.MemoryLimit, st.RSS = m.Memory.Usage, m.Memory.UsageLimit, m.Memory.Anon
		st.WorkingSet = st.MemoryUsage
		if m.Memory.InactiveFile < st.WorkingSet {
			st.WorkingSet -= m.Memory.InactiveFile
		}
	}
	return st, nil
}

// RemoveTree removes the cgroup p and everything below it in every mounted
// hierarchy, deepest first (cleanup of test and demo parents). Cgroups that
// still hold processes stay.
func RemoveTree(p string) {
	ents, _ := os.ReadDir("/sys/fs/cgroup")
	for _, h := range ents {
		root := path.Join("/sys/fs/cgroup", h.Name(), p)
		var dirs []string
		_ = filepath.WalkDir(root, func(p string, de os.DirEntry, err error) error {
			if err == nil && de.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- {
			_ = os.Remove(dirs[i])
		}
	}
}

// RemoveIfEmpty removes the cgroup p in every mounted hierarchy where it has
// no children and no processes (a shared test parent: another run's cgroups
// below it stay).
func RemoveIfEmpty(p string) {
	ents, _ := os.ReadDir("/sys/fs/cgroup")
	for _, h := range ents {
		_ = os.Remove(path.Join("/sys/fs/cgroup", h.Name(), p))
	}
}

// Unified reports whether the host runs cgroup v2 only.
func Unified() bool { return unified() }

// Rename moves the cgroup from to to (same parent) in every v1 hierarchy that
// has it, processes included: a process placed in from ahead of time ends up
// in to without a migration. cgroup v2 does not allow it.
func Rename(from, to string) error {
	if unified() {
		return errors.New("cgroup v2: renaming a cgroup is not supported")
	}
	if path.Dir(from) != path.Dir(to) {
		return fmt.Errorf("rename %s to %s: not the same parent", from, to)
	}
	ents, err := os.ReadDir("/sys/fs/cgroup")
	if err != nil {
		return err
	}
	done := 0
	for _, h := range ents {
		src := filepath.Join("/sys/fs/cgroup", h.Name(), from)
		if _, err := os.Stat(src); err != nil {
			continue
		}
		if err := os.Rename(src, filepath.Join("/sys/fs/cgroup", h.Name(), to)); err != nil {
			return fmt.Errorf("rename cgroup %s in %s: %w", from, h.Name(), err)
		}
		done++
	}
	if done == 0 {
		return fmt.Errorf("cgroup %s not found", from)
	}
	return nil
}

// Children lists the names of the child cgroups of p (v1: in the memory
// hierarchy, where every VM cgroup exists).
func Children(p string) []string {
	root := "/sys/fs/cgroup/memory"
	if unified() {
		root = "/sys/fs/cgroup"
	}
	ents, err := os.ReadDir(filepath.Join(root, p))
	if err != nil {
		return nil
	}
	var out []string
	for _, e := range ents {
		if e.IsDir() {
			out = append(out, e.Name())
		}
	}
	return out
}

// OOMKills is the memory cgroup process pid is in and how many processes
// the kernel's OOM killer has ended in it (v1: memory.oom_control's oom_kill,
// kernel 4.13 and later; v2: memory.events' oom_kill).
func OOMKills(pid int) (cgroup string, kills uint64, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return "", 0, err
	}
	v2 := unified()
	p, ok := MemoryCgroup(b, v2)
	if !ok {
		return "", 0, fmt.Errorf("process %d has no memory cgroup", pid)
	}
	file := filepath.Join("/sys/fs/cgroup/memory", p, "memory.oom_control")
	if v2 {
		file = filepath.Join("/sys/fs/cgroup", p, "memory.events")
	}
	b, err = os.ReadFile(file)
	if err != nil {
		return p, 0, err
	}
	n, ok := OOMKillCount(b)
	if !ok {
		return p, 0, fmt.Errorf("%s has no oom_kill count (kernel older than 4.13?)", file)
	}
	return p, n, nil
}

// MemoryCgroup is the memory cgroup path in a /proc/PID/cgroup file: the
// memory controller's line on v1 ("7:memory:/a/b"), the unified line on v2
// ("0::/a/b").
func MemoryCgroup(procCgroup []byte, v2 bool) (string, bool) {
	for _, l := range strings.Split(string(procCgroup), "\n") {
		id, rest, ok1 := strings.Cut(l, ":")
		ctrls, p, ok2 := strings.Cut(rest, ":")
		if !ok1 || !ok2 || !strings.HasPrefix(p, "/") {
			continue
		}
		if v2 && id == "0" && ctrls == "" {
			return p, true
		}
		if !v2 {
			for _, c := range strings.Split(ctrls, ",") {
				if c == "memory" {
					return p, true
				}
			}
		}
	}
	return "", false
}

// OOMKillCount is the "oom_kill N" line of memory.oom_control (v1) or
// memory.events (v2).
func OOMKillCount(b []byte) (uint64, bool) {
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(strings.TrimSpace(l), " "); ok && k == "oom_kill" {
			n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
			return n, err == nil
		}
	}
	return 0, false
}

// MakeTree creates the empty cgroup p in every mounted hierarchy (v1: every
// controller, cpuset's cpus and mems copied from the parent), as a cgroup
// root for processes that expect one to exist (a test's second kubelet).
func MakeTree(p string) error {
	if unified() {
		_, err := cgroup2.NewManager("/sys/fs/cgroup", p, &cgroup2.Resources{})
		return err
	}
	_, err := cgroup1.New(cgroup1.StaticPath(p), &specs.LinuxResources{})
	return err
}
