package metadata

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
)

type rec struct {
	ID    string `json:"id"`
	State int    `json:"state"`
}

func collect(t *testing.T, each func(func(k, v []byte) error) error) []rec {
	var out []rec
	require.NoError(t, each(func(_, v []byte) error {
		var r rec
		require.NoError(t, json.Unmarshal(v, &r))
		out = append(out, r)
		return nil
	}))
	return out
}

func TestStorePersistsAcrossReopen(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	require.NoError(t, err)
	require.NoError(t, s.PutSandbox("p1", rec{ID: "p1", State: 1}))
	require.NoError(t, s.PutContainer("c1", rec{ID: "c1", State: 2}))
	require.NoError(t, s.PutContainer("c2", rec{ID: "c2"}))
	require.NoError(t, s.PutContainer("c1", rec{ID: "c1", State: 3})) // update
	require.NoError(t, s.DeleteContainer("c2"))
	require.NoError(t, s.DeleteContainer("never-existed"))
	require.NoError(t, s.Close())

	s, err = Open(dir)
	require.NoError(t, err)
	defer s.Close()
	require.Equal(t, []rec{{ID: "p1", State: 1}}, collect(t, s.EachSandbox))
	require.Equal(t, []rec{{ID: "c1", State: 3}}, collect(t, s.EachContainer))

	// A second daemon on the same root is refused with a clear error, not a hang.
	_, err = openWithTimeout(dir)
	require.ErrorContains(t, err, "another unilet")
}

// corruptions a node can meet: a zero-length file, garbage over the data
// pages (bbolt panics reading them: "invalid freelist page" and the like),
// garbage over both meta pages.
func TestCorruptedDatabaseIsMovedAside(t *testing.T) {
	for name, damage := range map[string]func(path string){
		"empty":      func(p string) { require.NoError(t, os.Truncate(p, 0)) },
		"data pages": func(p string) { scribble(t, p, 2*4096, 6*4096) },
		"meta pages": func(p string) { scribble(t, p, 0, 2*4096) },
		"every page": func(p string) { fi, _ := os.Stat(p); scribble(t, p, 0, int(fi.Size())) },
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			s, err := Open(dir)
			require.NoError(t, err)
			for i := 0; i < 200; i++ {
				require.NoError(t, s.PutContainer(fmt.Sprintf("c%03d", i), rec{ID: fmt.Sprint(i), State: i}))
			}
			require.Empty(t, s.Recovered())
			require.NoError(t, s.Close())
			damage(filepath.Join(dir, FileName))

			s, err = Open(dir)
			require.NoError(t, err, "a corrupted database must not stop the daemon")
			defer s.Close()
			require.NotEmpty(t, s.Recovered())
			aside, _ := filepath.Glob(filepath.Join(dir, FileName+".corrupt-*"))
			require.Len(t, aside, 1, "the damaged file is kept for the operator")
			require.Empty(t, collect(t, s.EachContainer))
			require.NoError(t, s.PutContainer("new", rec{ID: "new"}), "the new store works")
		})
	}
}

func scribble(t *testing.T, path string, from, to int) {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	require.NoError(t, err)
	defer f.Close()
	b := make([]byte, to-from)
	for i := range b {
		b[i] = byte(i*7 + 3)
	}
	_, err = f.WriteAt(b, int64(from))
	require.NoError(t, err)
}

func TestQuarantineMovesARecordAside(t *testing.T) {
	s, err := Open(t.TempDir())
	require.NoError(t, err)
	defer s.Close()
	require.NoError(t, s.PutContainer("good", rec{ID: "good"}))
	require.NoError(t, s.PutContainer("bad", rec{ID: "bad"}))
	require.NoError(t, s.QuarantineContainer([]byte("bad"), []byte("{not json"), "undecodable"))
	require.Equal(t, []rec{{ID: "good"}}, collect(t, s.EachContainer))
	q, err := s.Quarantine()
	require.NoError(t, err)
	require.Len(t, q, 1)
	require.Equal(t, "containers", q[0].Bucket)
	require.Equal(t, "bad", q[0].Key)
	require.Equal(t, []byte("{not json"), q[0].Bytes)
}

// A file that is mostly free pages after large records were deleted (bbolt
// never shrinks it) is compacted at the next open; the records left are
// all there.
func TestSparseDatabaseIsCompactedAtOpen(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	require.NoError(t, err)
	big := make([]byte, 256<<10)
	for i := range big {
		big[i] = byte('a' + i%26)
	}
	type bigRec struct {
		ID   string `json:"id"`
		Blob string `json:"blob"`
	}
	for i := 0; i < 64; i++ {
		require.NoError(t, s.PutContainer(fmt.Sprint("c", i), bigRec{ID: fmt.Sprint("c", i), Blob: string(big)}))
	}
	require.NoError(t, s.PutSandbox("p1", rec{ID: "p1", State: 1}))
	for i := 1; i < 64; i++ {
		require.NoError(t, s.DeleteContainer(fmt.Sprint("c", i)))
	}
	require.NoError(t, s.Close())
	path := filepath.Join(dir, FileName)
	before, err := os.Stat(path)
	require.NoError(t, err)
	require.Greater(t, before.Size(), int64(16<<20), "the deleted records' pages stay in the file")

	s, err = Open(dir)
	require.NoError(t, err)
	after, err := os.Stat(path)
	require.NoError(t, err)
	require.Less(t, after.Size(), int64(2<<20), "compacted")
	require.Equal(t, []rec{{ID: "p1", State: 1}}, collect(t, s.EachSandbox))
	var n int
	require.NoError(t, s.EachContainer(func(_, v []byte) error {
		var r bigRec
		require.NoError(t, json.Unmarshal(v, &r))
		require.Equal(t, "c0", r.ID)
		require.Equal(t, string(big), r.Blob)
		n++
		return nil
	}))
	require.Equal(t, 1, n)
	require.NoError(t, s.PutContainer("c9", rec{ID: "c9"}), "the compacted store is writable")
	require.NoError(t, s.Close())
	_, err = os.Stat(path + ".compact")
	require.True(t, os.IsNotExist(err))

	// A small file is left as it is (bbolt grows its files in steps).
	s, err = Open(dir)
	require.NoError(t, err)
	require.NoError(t, s.Close())
	again, err := os.Stat(path)
	require.NoError(t, err)
	require.Less(t, again.Size(), int64(CompactMinBytes))
}
