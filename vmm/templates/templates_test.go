package templates

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/unilet-dev/unilet/vmm"
)

func stage(t *testing.T, s *Store, name string) string {
	t.Helper()
	d, err := s.Stage(name)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(d, StateFile), []byte("device state"), 0o600))
	require.NoError(t, os.WriteFile(filepath.Join(d, RAMFile), make([]byte, 1<<20), 0o600))
	return d
}

func TestStoreLifecycle(t *testing.T) {
	dir, run := t.TempDir(), t.TempDir()
	s, err := Open(dir, run, "")
	require.NoError(t, err)
	tm := Template{Name: "web", ImageID: "sha256:abc", Created: time.Now(), Machine: vmm.MachineConfig{MemoryMiB: 1}}
	require.NoError(t, s.Commit(stage(t, s, "web"), tm))
	got, err := s.Get("web")
	require.NoError(t, err)
	require.Equal(t, int64(12), got.StateSize)
	require.Equal(t, int64(1<<20), got.RAMSize)
	require.Regexp(t, `^sha256:[0-9a-f]{64}$`, got.RAMDigest)
	require.ErrorIs(t, s.Commit(stage(t, s, "web"), tm), ErrExists, "a name is taken once")
	list, err := s.List()
	require.NoError(t, err)
	require.Len(t, list, 1)

	// A half-made template of a daemon that died is dropped at open.
	half, err := s.Stage("half")
	require.NoError(t, err)
	s, err = Open(dir, run, "")
	require.NoError(t, err)
	require.NoDirExists(t, half)

	// A changed state file is refused before any clone uses it.
	require.NoError(t, os.WriteFile(filepath.Join(dir, "web", StateFile), []byte("device stat3"), 0o600))
	_, err = s.Prepare(got)
	require.ErrorContains(t, err, "state file is missing or changed")

	for _, bad := range []string{"", "Web", "../x", "a_b", string(make([]byte, 64))} {
		_, err := s.Get(bad)
		require.Error(t, err, bad)
		require.Error(t, s.Remove(bad), bad)
	}
	require.Equal(t, []string{"web"}, s.RemoveForImage("sha256:abc"))
	_, err = s.Get("web")
	require.ErrorIs(t, err, ErrNotFound)
	require.ErrorIs(t, s.Remove("web"), ErrNotFound)
	ents, _ := os.ReadDir(dir)
	require.Empty(t, ents, "nothing is left of a removed template")
}
