package vm

import (
	"testing"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestDedupEnvLaterWins(t *testing.T) {
	require.Equal(t, []string{"B=2", "A=3", "C="}, dedupEnv([]string{"A=1", "B=2", "A=3", "C="}))
}

func TestLookupID(t *testing.T) {
	m := map[string]int{"abcdef111": 1, "abcdef222": 2, "zzz": 3}
	v, err := lookupID(m, "zzz", "thing")
	require.NoError(t, err)
	require.Equal(t, 3, v)
	v, err = lookupID(m, "abcdef1", "thing")
	require.NoError(t, err)
	require.Equal(t, 1, v)
	_, err = lookupID(m, "abcdef", "thing")
	require.Equal(t, codes.InvalidArgument, status.Code(err))
	_, err = lookupID(m, "abc", "thing")
	require.Equal(t, codes.NotFound, status.Code(err), "short prefixes never match")
	_, err = lookupID(m, "", "thing")
	require.Equal(t, codes.InvalidArgument, status.Code(err))
}
