package streamtoken

import (
	"encoding/base64"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestTokensAre128BitSingleUseAndShortLived(t *testing.T) {
	var got []string
	f := New(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got = append(got, r.URL.RequestURI())
		io.WriteString(w, "inner")
	}))
	srv := httptest.NewServer(f)
	defer srv.Close()
	get := func(u string) int {
		resp, err := http.Get(u)
		require.NoError(t, err)
		resp.Body.Close()
		return resp.StatusCode
	}
	wrapped, err := f.Wrap(srv.URL + "/attach/abcdEFGH?x=1")
	require.NoError(t, err)
	u, err := url.Parse(wrapped)
	require.NoError(t, err)
	tok := strings.TrimPrefix(u.Path, "/t/")
	raw, err := base64.RawURLEncoding.DecodeString(tok)
	require.NoError(t, err)
	require.Len(t, raw, 16, "128-bit tokens")
	require.NotContains(t, wrapped, "abcdEFGH", "the inner token is never handed out")

	require.Equal(t, http.StatusNotFound, get(srv.URL+"/attach/abcdEFGH?x=1"), "inner URLs are not served")
	require.Equal(t, http.StatusOK, get(wrapped))
	require.Equal(t, []string{"/attach/abcdEFGH?x=1"}, got)
	require.Equal(t, http.StatusNotFound, get(wrapped), "single use")
	require.Equal(t, http.StatusNotFound, get(srv.URL+"/t/"+strings.Repeat("A", 22)), "unknown token")

	f.ttl = time.Millisecond
	old, err := f.Wrap(srv.URL + "/attach/x")
	require.NoError(t, err)
	time.Sleep(5 * time.Millisecond)
	require.Equal(t, http.StatusNotFound, get(old), "expired")
}
