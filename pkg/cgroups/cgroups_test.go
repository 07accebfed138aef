package cgroups

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/unilet-dev/unilet/internal/testutil"
)

func TestPath(t *testing.T) {
	for _, tc := range []struct{ parent, want, err string }{
		{"", "/unilet/c1", ""},
		{"/kubepods/burstable/pod123", "/kubepods/burstable/pod123/c1", ""},
		{"kubepods-burstable-pod123.slice", "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod123.slice/unilet-c1.scope", ""},
		{"-.slice", "/unilet-c1.scope", ""},
		{"/kubepods/../etc", "", "not a clean absolute path"},
		{"relative/path", "", "not a clean absolute path"},
		{"a--b.slice", "", "invalid systemd slice"},
	} {
		got, err := Path(tc.parent, "/unilet", "c1")
		if tc.err != "" {
			require.ErrorContains(t, err, tc.err, tc.parent)
			continue
		}
		require.NoError(t, err, tc.parent)
		require.Equal(t, tc.want, got, tc.parent)
	}
}

// TestRealCgroup creates a cgroup with limits, moves a process into it, reads
// its stats and removes it (needs root and a writable cgroup hierarchy).
func TestRealCgroup(t *testing.T) {
	testutil.NeedRoot(t, testutil.LaneUnit, "cgroups")
	p := "/unilet-test/" + strconv.Itoa(os.Getpid())
	c, err := Create(p, Resources{MemoryLimit: 96 << 20, CPUQuota: 50000, CPUPeriod: 100000, CPUShares: 512})
	require.NoError(t, err)
	defer RemoveTree("/unilet-test")
	if !unified() {
		b, err := os.ReadFile(filepath.Join("/sys/fs/cgroup/memory", p, "memory.limit_in_bytes"))
		require.NoError(t, err)
		require.Equal(t, strconv.Itoa(96<<20), strings.TrimSpace(string(b)))
		b, err = os.ReadFile(filepath.Join("/sys/fs/cgroup/cpu", p, "cpu.cfs_quota_us"))
		require.NoError(t, err)
		require.Equal(t, "50000", strings.TrimSpace(string(b)))
	}
	cmd := exec.Command("sh", "-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; sleep 30")
	require.NoError(t, cmd.Start())
	require.NoError(t, c.Add(cmd.Process.Pid))
	b, err := os.ReadFile("/proc/" + strconv.Itoa(cmd.Process.Pid) + "/cgroup")
	require.NoError(t, err)
	require.Contains(t, string(b), p)
	require.Eventually(t, func() bool {
		st, err := c.Stats()
		return err == nil && st.CPUNanos > 0 && st.MemoryUsage > 0
	}, 10e9, 50e6)
	require.NoError(t, c.Update(Resources{MemoryLimit: 128 << 20}))
	st, err := c.Stats()
	require.NoError(t, err)
	require.Equal(t, uint64(128<<20), st.MemoryLimit)
	// Delete ends what is left in the cgroup that the caller proves its own
	// (here the shell and its sleep child); with nothing proven it fails,
	// naming the process, and leaves it running.
	go func() { _ = cmd.Wait() }()
	err = c.Delete(nil)
	require.ErrorContains(t, err, "not unilet's")
	require.ErrorContains(t, err, strconv.Itoa(cmd.Process.Pid))
	require.NoError(t, unix.Kill(cmd.Process.Pid, 0), "a process not proven ours is never signalled")
	// Proven ours: the shell and what it started, known before anything is
	// killed (a child whose shell died first would have another parent).
	mine := map[int]bool{cmd.Process.Pid: true}
	require.Eventually(t, func() bool { return len(descendants(cmd.Process.Pid)) > 0 }, 10e9, 10e6, "the shell started its sleep")
	for _, pid := range descendants(cmd.Process.Pid) {
		mine[pid] = true
	}
	ours := func(pid int) bool { return mine[pid] }
	require.NoError(t, c.Delete(ours))
	_, err = os.Stat(filepath.Join("/sys/fs/cgroup/memory", p))
	require.True(t, os.IsNotExist(err))
}

// descendants lists the children of pid (one level: the shell's sleep).
func descendants(pid int) []int {
	var out []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		if n, err := strconv.Atoi(e.Name()); err == nil && ppid(n) == pid {
			out = append(out, n)
		}
	}
	return out
}

func ppid(pid int) int {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	n, _ := strconv.Atoi(f[1])
	return n
}

// TestRenameKeepsProcesses: a process placed in a cgroup ahead of time ends up
// in the renamed one, limits applied after the rename hold.
func TestRenameKeepsProcesses(t *testing.T) {
	testutil.NeedRoot(t, testutil.LaneUnit, "cgroups")
	if unified() {
		t.Skip("cgroup v2 has no rename; unilet migrates instead")
	}
	base := "/unilet-test/rename-" + strconv.Itoa(os.Getpid())
	defer RemoveTree("/unilet-test")
	c, err := Create(base+"/stage", Resources{})
	require.NoError(t, err)
	cmd := exec.Command("sleep", "30")
	require.NoError(t, cmd.Start())
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	require.NoError(t, c.Add(cmd.Process.Pid))
	require.NoError(t, Rename(base+"/stage", base+"/ctr"))
	b, err := os.ReadFile("/proc/" + strconv.Itoa(cmd.Process.Pid) + "/cgroup")
	require.NoError(t, err)
	require.Contains(t, string(b), base+"/ctr")
	c2, err := Create(base+"/ctr", Resources{MemoryLimit: 64 << 20})
	require.NoError(t, err)
	require.Equal(t, strconv.Itoa(64<<20), strings.TrimSpace(string(must(os.ReadFile(filepath.Join("/sys/fs/cgroup/memory", base, "ctr", "memory.limit_in_bytes"))))))
	require.Error(t, Rename(base+"/ctr", "/elsewhere/ctr"), "only within a parent")
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	require.NoError(t, c2.Delete(nil))
}

func must(b []byte, err error) []byte {
	if err != nil {
		panic(err)
	}
	return b
}

func TestMemoryCgroupAndOOMKillCount(t *testing.T) {
	v1 := []byte("12:pids:/a\n7:cpu,cpuacct:/b\n5:memory:/kubepods/pod1/ctr\n0::/\n")
	p, ok := MemoryCgroup(v1, false)
	require.True(t, ok)
	require.Equal(t, "/kubepods/pod1/ctr", p)
	p, ok = MemoryCgroup([]byte("0::/unified/x\n"), true)
	require.True(t, ok)
	require.Equal(t, "/unified/x", p)
	_, ok = MemoryCgroup([]byte("5:memory:relative\n"), false)
	require.False(t, ok)
	n, ok := OOMKillCount([]byte("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"))
	require.True(t, ok)
	require.EqualValues(t, 3, n)
	n, ok = OOMKillCount([]byte("low 0\nhigh 0\nmax 2\noom 2\noom_kill 1\n"))
	require.True(t, ok)
	require.EqualValues(t, 1, n)
	_, ok = OOMKillCount([]byte("oom_kill_disable 0\nunder_oom 0\n"))
	require.False(t, ok)
}

func FuzzMemoryCgroup(f *testing.F) {
	f.Add([]byte("5:memory:/a\n0::/b\n"), []byte("oom_kill 1\n"))
	f.Fuzz(func(t *testing.T, procCgroup, events []byte) {
		for _, v2 := range []bool{false, true} {
			if p, ok := MemoryCgroup(procCgroup, v2); ok {
				require.True(t, strings.HasPrefix(p, "/"))
			}
		}
		_, _ = OOMKillCount(events)
	})
}
