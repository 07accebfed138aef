package main

import (
	"testing"

	"github.com/stretchr/testify/require"
)

func TestStreamAddressNeedsTLSOffLoopback(t *testing.T) {
	for _, ok := range []string{"127.0.0.1:0", "127.0.0.5:1234", "[::1]:0", "localhost:0"} {
		require.NoError(t, checkStreamAddress(ok, "", ""), ok)
	}
	for _, bad := range []string{":0", "0.0.0.0:10010", "198.18.0.1:0", "[::]:0", "node.example:0"} {
		err := checkStreamAddress(bad, "", "")
		require.ErrorContains(t, err, "--stream-tls-cert", bad)
		require.NoError(t, checkStreamAddress(bad, "c.pem", "k.pem"), bad)
	}
	require.ErrorContains(t, checkStreamAddress("127.0.0.1:0", "c.pem", ""), "go together")
	require.Error(t, checkStreamAddress("nonsense", "", ""))
}
