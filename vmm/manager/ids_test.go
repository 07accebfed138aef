package manager

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/unilet-dev/unilet/vmm"
	"github.com/unilet-dev/unilet/vmm/shim"
)

// Jail ids: one per live VM, those of VMs an earlier daemon started (their
// spec.json) are never handed out again, a released id is reused, and an
// exhausted range is an error.
func TestJailIDs(t *testing.T) {
	root := t.TempDir()
	old := filepath.Join(root, "aaaaaaaaaaaaaaaa")
	require.NoError(t, os.MkdirAll(old, 0o700))
	b, _ := json.Marshal(vmm.VMSpec{Jail: &vmm.JailSpec{UID: 101, GID: 101}})
	require.NoError(t, os.WriteFile(filepath.Join(old, shim.SpecFile), b, 0o600))

	p := idPool{r: JailIDs{First: 100, Count: 3}}
	a, err := p.take(root, "b", "")
	require.NoError(t, err)
	c, err := p.take(root, "c", "")
	require.NoError(t, err)
	require.ElementsMatch(t, []uint32{100, 102}, []uint32{a, c}, "101 belongs to the VM found on disk")
	_, err = p.take(root, "d", "")
	require.ErrorIs(t, err, ErrNoJailID)
	p.release("aaaaaaaaaaaaaaaa")
	d, err := p.take(root, "d", "")
	require.NoError(t, err)
	require.Equal(t, uint32(101), d)

	require.Error(t, JailIDs{First: 0, Count: 5}.Validate(), "uid 0 is never a jail's")
	require.Error(t, JailIDs{First: 1 << 31, Count: 1 << 31}.Validate())
	require.NoError(t, DefaultJailIDs.Validate())
}

// The VMs of a pod share its id, which stays taken until the pod's last
// VM ends, also across a daemon restart; pods never share one; a warm
// clone made before its pod lends the pod its id.
func TestJailIDsSharedByAPod(t *testing.T) {
	root := t.TempDir()
	p := idPool{r: JailIDs{First: 100, Count: 10}}
	a1, err := p.take(root, "vm1", "podA")
	require.NoError(t, err)
	a2, err := p.take(root, "vm2", "podA")
	require.NoError(t, err)
	require.Equal(t, a1, a2, "the pod's id")
	b, err := p.take(root, "vmB", "podB")
	require.NoError(t, err)
	require.NotEqual(t, a1, b, "pods never share an id")
	p.release("vm1")
	for i := 0; i < 10; i++ { // a1 is still podA's: never handed to another
		id, err := p.take(root, fmt.Sprint("x", i), "")
		if err != nil {
			break
		}
		require.NotEqual(t, a1, id)
	}
	p2 := idPool{r: p.r} // a restarted daemon reads the VM directories
	require.NoError(t, os.MkdirAll(filepath.Join(root, "vm2"), 0o700))
	spec, _ := json.Marshal(vmm.VMSpec{Jail: &vmm.JailSpec{UID: a1, GID: a1, Pod: "podA"}})
	require.NoError(t, os.WriteFile(filepath.Join(root, "vm2", shim.SpecFile), spec, 0o600))
	a3, err := p2.take(root, "vm3", "podA")
	require.NoError(t, err)
	require.Equal(t, a1, a3)
	// A warm clone (an id of its own, no pod yet) joins a pod.
	w, err := p2.take(root, "warm", "")
	require.NoError(t, err)
	p2.join(root, "warm", "podW", w)
	w2, err := p2.take(root, "vm4", "podW")
	require.NoError(t, err)
	require.Equal(t, w, w2)
	p2.join(root, "vm4", "podA", w) // a pod with an id keeps it
	a5, _ := p2.take(root, "vm5", "podA")
	require.Equal(t, a1, a5)
}
