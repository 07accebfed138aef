package netns

import (
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/unilet-dev/unilet/internal/testutil"
)

// Rename hands a namespace and what is in it to a new name; the old name
// goes, an existing name is refused, and what is no namespace is refused.
func TestRenameKeepsTheNamespace(t *testing.T) {
	testutil.NeedRoot(t, testutil.LaneUnit, "network namespaces")
	dir := t.TempDir()
	from, err := Create(dir, "a")
	require.NoError(t, err)
	t.Cleanup(func() { _ = Remove(from) })
	var ino uint64
	require.NoError(t, Do(from, func() error {
		var st unix.Stat_t
		err := unix.Stat("/proc/thread-self/ns/net", &st)
		ino = st.Ino
		return err
	}))
	to, err := Rename(from, dir, "b")
	require.NoError(t, err)
	t.Cleanup(func() { _ = Remove(to) })
	require.Equal(t, filepath.Join(dir, "b"), to)
	require.False(t, Exists(from))
	require.NoFileExists(t, from)
	var st unix.Stat_t
	require.NoError(t, unix.Stat(to, &st))
	require.Equal(t, ino, st.Ino, "the same namespace under its new name")

	other, err := Create(dir, "c")
	require.NoError(t, err)
	t.Cleanup(func() { _ = Remove(other) })
	_, err = Rename(to, dir, "c")
	require.Error(t, err, "an existing name is never taken over")
	require.True(t, Exists(to))
	_, err = Rename(filepath.Join(dir, "none"), dir, "d")
	require.ErrorContains(t, err, "no network namespace")
	require.NoFileExists(t, filepath.Join(dir, "d"))
}
