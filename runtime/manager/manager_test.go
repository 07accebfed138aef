package manager

import (
	"os"
	"path"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

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

// Cgroups of unilet's forms that nothing claims are removed; claimed ones
// and names of other forms stay (needs root: real cgroups in a parent this
// test makes).
func TestSweepCgroups(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test needs root (cgroups)")
	}
	root := "/unilet-test-sweep/" + strconv.Itoa(os.Getpid())
	t.Cleanup(func() { cgroups.RemoveTree(root); cgroups.RemoveIfEmpty(path.Dir(root)) })
	claimedID, orphanID := strings.Repeat("1", 64), strings.Repeat("2", 64)
	for _, name := range []string{claimedID, orphanID, "stage-222222222222", "not-ours", strings.Repeat("3", 63)} {
		_, err := cgroups.Create(path.Join(root, name), cgroups.Resources{})
		require.NoError(t, err)
	}
	m, err := New(Config{StateDir: t.TempDir(), CgroupRoot: root})
	require.NoError(t, err)
	m.SweepCgroups("", func(id string) bool { return id == claimedID })
	left := cgroups.Children(root)
	sort.Strings(left)
	require.Equal(t, []string{claimedID, strings.Repeat("3", 63), "not-ours"}, left)
}
