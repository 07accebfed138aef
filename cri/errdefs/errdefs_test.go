package errdefs

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestCodes(t *testing.T) {
	for _, e := range table {
		err := Errorf(e.kind, "container %s: %d", "abc", 3)
		require.Equal(t, "container abc: 3", err.Error(), "the message is the caller's alone")
		require.ErrorIs(t, err, e.kind)
		require.Equal(t, e.code, Code(err))
		require.Equal(t, e.code, Code(fmt.Errorf("wrapped: %w", err)))
		require.Equal(t, e.code, status.Code(err), "gRPC sees the code too")
	}
	require.Equal(t, codes.OK, Code(nil))
	require.Equal(t, codes.Unknown, Code(errors.New("plain")))
	require.Equal(t, codes.Unknown, Code(Errorf(errors.New("not a kind"), "x")))
	require.Equal(t, codes.DeadlineExceeded, Code(fmt.Errorf("pull: %w", context.DeadlineExceeded)))
	require.Equal(t, codes.Aborted, Code(status.Error(codes.Aborted, "upstream's own")))
	require.Equal(t, codes.Aborted, Code(fmt.Errorf("wrapped: %w", status.Error(codes.Aborted, "upstream's own"))))
}
