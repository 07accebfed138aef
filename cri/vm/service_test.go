package vm

import (
	"testing"

	"github.com/stretchr/testify/require"
)

func TestDedupEnvLaterWins(t *testing.T) {
	require.Equal(t, []string{"B=2", "A=3", "C="}, dedupEnv([]string{"A=1", "B=2", "A=3", "C="}))
}
