package manager

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/unilet-dev/unilet/runtime"
	"github.com/unilet-dev/unilet/runtime/shim"
)

// Jail ids: one per live VM, those of VMs an earlier daemon started (their
// spec.json) are never handed out again, a released id is reused, and an
// exhausted range is an error.
func TestJailIDs(t *testing.T) {
	root := t.TempDir()
	old := filepath.Join(root, "aaaaaaaaaaaaaaaa")
	require.NoError(t, os.MkdirAll(old, 0o700))
	b, _ := json.Marshal(runtime.VMSpec{Jail: &runtime.JailSpec{UID: 101, GID: 101}})
	require.NoError(t, os.WriteFile(filepath.Join(old, shim.SpecFile), b, 0o600))

	p := idPool{r: JailIDs{First: 100, Count: 3}}
	a, err := p.take(root, "b")
	require.NoError(t, err)
	c, err := p.take(root, "c")
	require.NoError(t, err)
	require.ElementsMatch(t, []uint32{100, 102}, []uint32{a, c}, "101 belongs to the VM found on disk")
	_, err = p.take(root, "d")
	require.ErrorIs(t, err, ErrNoJailID)
	p.release("aaaaaaaaaaaaaaaa")
	d, err := p.take(root, "d")
	require.NoError(t, err)
	require.Equal(t, uint32(101), d)

	require.Error(t, JailIDs{First: 0, Count: 5}.Validate(), "uid 0 is never a jail's")
	require.Error(t, JailIDs{First: 1 << 31, Count: 1 << 31}.Validate())
	require.NoError(t, DefaultJailIDs.Validate())
}
