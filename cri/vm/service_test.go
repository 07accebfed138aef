package vm

import (
	"testing"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

func TestResources(t *testing.T) {
	s := New(Config{}, nil, nil)
	mem, cpus, err := s.resources(nil)
	require.NoError(t, err)
	require.Equal(t, 64, mem)
	require.Equal(t, 1, cpus)
	mem, cpus, err = s.resources(&runtimeapi.LinuxContainerResources{MemoryLimitInBytes: 100<<20 + 1, CpuQuota: 150000, CpuPeriod: 100000})
	require.NoError(t, err)
	require.Equal(t, 101, mem, "memory rounds up to whole MiB")
	require.Equal(t, 2, cpus, "vCPUs = ceil(quota/period)")
	_, _, err = s.resources(&runtimeapi.LinuxContainerResources{MemoryLimitInBytes: 8 << 20})
	require.ErrorContains(t, err, "below the 16 MiB")
	_, _, err = s.resources(&runtimeapi.LinuxContainerResources{CpuQuota: 100 * 100000, CpuPeriod: 100000})
	require.ErrorContains(t, err, "at most 64")
}

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
