package metadata

import (
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/require"
)

type rec struct {
	ID    string `json:"id"`
	State int    `json:"state"`
}

func collect(t *testing.T, each func(func([]byte) error) error) []rec {
	var out []rec
	require.NoError(t, each(func(v []byte) error {
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
