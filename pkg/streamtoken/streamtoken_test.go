package streamtoken

import (
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	"k8s.io/cri-streaming/pkg/streaming"
	remotecommandserver "k8s.io/cri-streaming/pkg/streaming/remotecommand"
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
	wrapped, err := f.Wrap("pod-a", srv.URL+"/attach/abcdEFGH?x=1")
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
	old, err := f.Wrap("pod-a", srv.URL+"/attach/x")
	require.NoError(t, err)
	time.Sleep(5 * time.Millisecond)
	require.Equal(t, http.StatusNotFound, get(old), "expired")
}

type nopRuntime struct{ attached chan string }

func (nopRuntime) Exec(context.Context, string, []string, io.Reader, io.WriteCloser, io.WriteCloser, bool, <-chan remotecommandserver.TerminalSize) error {
	return nil
}
func (r nopRuntime) Attach(_ context.Context, id string, _ io.Reader, _, _ io.WriteCloser, _ bool, _ <-chan remotecommandserver.TerminalSize) error {
	r.attached <- id
	return nil
}
func (nopRuntime) PortForward(context.Context, string, int32, io.ReadWriteCloser) error { return nil }

// URLs requested and never used (well beyond the streaming library's own
// 1000-entry cache) never make a new attach fail: each owner keeps at most
// MaxPerOwner, all owners MaxTokens, the oldest unused are revoked (their
// inner tokens used up without reaching the runtime), and the newest work.
func TestUnusedURLsAreBoundedAndEvicted(t *testing.T) {
	rt := nopRuntime{attached: make(chan string, 10)}
	inner, err := streaming.NewServer(streaming.Config{Addr: "127.0.0.1:0", StreamIdleTimeout: time.Minute,
		StreamCreationTimeout: time.Minute, SupportedRemoteCommandProtocols: remotecommandserver.SupportedStreamingProtocols}, rt)
	require.NoError(t, err)
	f := New(inner)
	srv := httptest.NewServer(f)
	defer srv.Close()
	base, err := url.Parse(srv.URL)
	require.NoError(t, err)
	attachURL := func(owner, ctr string) string {
		resp, err := inner.GetAttach(&runtimeapi.AttachRequest{ContainerId: ctr, Stdout: true})
		require.NoError(t, err, "the inner cache has room")
		u, err := url.Parse(resp.Url)
		require.NoError(t, err)
		u.Scheme, u.Host = base.Scheme, base.Host
		w, err := f.Wrap(owner, u.String())
		require.NoError(t, err)
		return w
	}
	var first string
	for i := 0; i < 1100; i++ {
		u := attachURL("greedy", "c-greedy")
		if i == 0 {
			first = u
		}
	}
	for i := 0; i < 2*MaxTokens; i++ {
		_ = attachURL(fmt.Sprintf("pod-%d", i%100), "c-many")
	}
	f.mu.Lock()
	n, greedy := len(f.m), 0
	for _, e := range f.m {
		if e.owner == "greedy" {
			greedy++
		}
	}
	f.mu.Unlock()
	require.LessOrEqual(t, n, MaxTokens)
	require.LessOrEqual(t, greedy, MaxPerOwner)

	// A revoked URL is gone; a fresh one still holds a live inner token (a
	// plain GET is refused by the stream handshake, not as unknown: 404).
	get := func(u string) int {
		resp, err := http.Get(u)
		require.NoError(t, err)
		resp.Body.Close()
		return resp.StatusCode
	}
	require.Equal(t, http.StatusNotFound, get(first), "revoked")
	require.NotEqual(t, http.StatusNotFound, get(attachURL("pod-b", "c-b")), "a fresh URL reaches the inner server")
	select {
	case id := <-rt.attached:
		t.Fatalf("a URL without a stream upgrade reached the runtime (%s)", id)
	default:
	}
}
