package manager

import (
	"path"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestLedgerEntry(t *testing.T) {
	id := strings.Repeat("ab", 32)
	for _, tc := range []struct {
		file, content, p, id string
		ok                   bool
	}{
		{id, "/unilet/" + id, "/unilet/" + id, id, true},
		{"stage-" + id[:12], "/kubepods/pod1/stage-" + id[:12], "/kubepods/pod1/stage-" + id[:12], id[:12], true},
		{"unilet-" + id + ".scope", "/a.slice/unilet-" + id + ".scope", "/a.slice/unilet-" + id + ".scope", id, true},
		{id, "/unilet/" + strings.Repeat("cd", 32), "", "", false}, // names another cgroup than its file
		{id, "unilet/" + id, "", "", false},
		{id, "/unilet/../" + id, "", "", false},
		{"docker", "/docker", "", "", false},
		{"stage-" + id[:11], "/x/stage-" + id[:11], "", "", false},
		{id, "/" + id + "\x00", "", "", false},
	} {
		p, gotID, ok := ledgerEntry(tc.file, []byte(tc.content))
		require.Equal(t, tc.ok, ok, "%q %q", tc.file, tc.content)
		require.Equal(t, tc.p, p)
		require.Equal(t, tc.id, gotID)
	}
}

// FuzzLedgerEntry: whatever a ledger file holds, an accepted entry is a
// clean absolute path ending in the file's name, a name of unilet's form.
func FuzzLedgerEntry(f *testing.F) {
	id := strings.Repeat("ab", 32)
	f.Add(id, []byte("/unilet/"+id))
	f.Add("stage-"+id[:12], []byte("/p/stage-"+id[:12]))
	f.Add("unilet-"+id+".scope", []byte("/a.slice/unilet-"+id+".scope"))
	f.Add("x", []byte("/../x"))
	f.Fuzz(func(t *testing.T, file string, content []byte) {
		p, claim, ok := ledgerEntry(file, content)
		if !ok {
			return
		}
		if !path.IsAbs(p) || path.Clean(p) != p || path.Base(p) != file || p == "/" {
			t.Fatalf("accepted %q for file %q", p, file)
		}
		if _, form := ledgerName(p); !form || (len(claim) != 64 && len(claim) != 12) {
			t.Fatalf("accepted %q (claim %q) of no unilet form", p, claim)
		}
	})
}
