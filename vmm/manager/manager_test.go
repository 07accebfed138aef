package manager

import (
	"os"
	"os/exec"
	"path"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/unilet-dev/unilet/internal/testutil"
	"github.com/unilet-dev/unilet/pkg/cgroups"
)

func TestDirOnlyForUniletIDs(t *testing.T) {
	m, err := New(Config{StateDir: "/run/unilet-test"})
	require.NoError(t, err)
	d, err := m.Dir(strings.Repeat("ab", 32))
	require.NoError(t, err)
	require.Equal(t, "/run/unilet-test/vm/abababababababab", d)
	for _, bad := range []string{"", "/", "..", "../../../../etc/xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
		strings.Repeat("AB", 32), strings.Repeat("a", 63)} {
		_, err := m.Dir(bad)
		require.ErrorIs(t, err, ErrUntrusted, bad)
	}
	_, err = New(Config{StateDir: "relative"})
	require.Error(t, err)
}

// Only cgroups unilet recorded making are swept: under a cgroup parent that
// is not unilet's, a foreign child named like a container ID keeps its
// cgroup and its process; a recorded orphan is removed, a claimed one
// stays; a process in a recorded orphan that is not proven unilet's is not
// signalled (needs root: real cgroups in a parent this test makes).
func TestSweepCgroupsOnlyRecorded(t *testing.T) {
	testutil.NeedRoot(t, testutil.LaneUnit, "cgroups")
	root := "/unilet-test-sweep/" + strconv.Itoa(os.Getpid())
	t.Cleanup(func() { cgroups.RemoveTree(root); cgroups.RemoveIfEmpty(path.Dir(root)) })
	claimedID, orphanID, busyID, foreignID := strings.Repeat("1", 64), strings.Repeat("2", 64), strings.Repeat("4", 64), strings.Repeat("5", 64)
	m, err := New(Config{StateDir: t.TempDir(), CgroupRoot: root})
	require.NoError(t, err)
	for _, id := range []string{claimedID, orphanID, busyID} {
		_, err := m.createCgroup(path.Join(root, id), cgroups.Resources{})
		require.NoError(t, err)
	}
	for _, name := range []string{foreignID, "stage-222222222222", "not-ours", strings.Repeat("3", 63)} {
		_, err := cgroups.Create(path.Join(root, name), cgroups.Resources{})
		require.NoError(t, err)
	}
	// Decoys: processes of this test in a foreign cgroup and in a recorded one.
	decoy := func(cg string) *exec.Cmd {
		cmd := exec.Command("sleep", "120")
		require.NoError(t, cmd.Start())
		t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
		c, err := cgroups.Load(path.Join(root, cg))
		require.NoError(t, err)
		require.NoError(t, c.Add(cmd.Process.Pid))
		return cmd
	}
	foreignProc, busyProc := decoy(foreignID), decoy(busyID)

	_, err = m.createCgroup(path.Join(root, foreignID), cgroups.Resources{})
	require.ErrorIs(t, err, ErrForeignCgroup, "an existing cgroup unilet did not make is never taken over")
	require.Error(t, m.renameCgroup(path.Join(root, "stage-222222222222"), path.Join(root, strings.Repeat("6", 64))),
		"an unrecorded staging cgroup is not renamed")

	m.SweepCgroups(func(id string) bool { return id == claimedID })
	left := cgroups.Children(root)
	sort.Strings(left)
	require.Equal(t, []string{claimedID, strings.Repeat("3", 63), busyID, foreignID, "not-ours", "stage-222222222222"}, left)
	for _, cmd := range []*exec.Cmd{foreignProc, busyProc} {
		require.NoError(t, unix.Kill(cmd.Process.Pid, 0), "a process not proven unilet's is never signalled")
	}
	require.True(t, m.recorded(path.Join(root, busyID)), "kept in the ledger for a later sweep")
	require.False(t, m.recorded(path.Join(root, orphanID)))
	// Cleanup leaves what it has no record of.
	require.NoError(t, m.Cleanup(foreignID, path.Join(root, foreignID)))
	require.True(t, cgroups.Exists(path.Join(root, foreignID)))
}
