// Package streamtoken fronts the CRI streaming server (attach,
// port-forward) with 128-bit, single-use, short-lived tokens: the library's
// own URLs carry 8-character tokens (48 bits), so they are never handed out;
// only paths under /t/<token> reach the server.
package streamtoken

import (
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"
)

// TTL is how long a token stays valid (as the streaming library's own).
const TTL = time.Minute

// maxTokens bounds the tokens outstanding at once.
const maxTokens = 1000

// Front serves only /t/<token> URLs, each once, by handing the request to
// the inner streaming server under the URL the token stands for.
type Front struct {
	inner http.Handler
	ttl   time.Duration
	mu    sync.Mutex
	m     map[string]entry
}

type entry struct {
	path    string // the inner URL's path and query
	expires time.Time
}

// New fronts inner.
func New(inner http.Handler) *Front {
	return &Front{inner: inner, ttl: TTL, m: map[string]entry{}}
}

// Wrap exchanges an inner streaming URL for one with a fresh 128-bit token.
func (f *Front) Wrap(inner string) (string, error) {
	u, err := url.Parse(inner)
	if err != nil {
		return "", err
	}
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	tok := base64.RawURLEncoding.EncodeToString(b)
	now := time.Now()
	f.mu.Lock()
	for k, e := range f.m {
		if now.After(e.expires) {
			delete(f.m, k)
		}
	}
	if len(f.m) >= maxTokens {
		f.mu.Unlock()
		return "", fmt.Errorf("too many streaming sessions waiting to be opened (%d)", maxTokens)
	}
	f.m[tok] = entry{path: u.RequestURI(), expires: now.Add(f.ttl)}
	f.mu.Unlock()
	out := *u
	out.Path, out.RawPath, out.RawQuery = "/t/"+tok, "", ""
	return out.String(), nil
}

// ServeHTTP redeems a token (once) and serves the inner URL; anything else
// is 404.
func (f *Front) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	tok, ok := strings.CutPrefix(r.URL.Path, "/t/")
	if !ok || tok == "" || strings.Contains(tok, "/") {
		http.NotFound(w, r)
		return
	}
	f.mu.Lock()
	e, found := f.m[tok]
	delete(f.m, tok)
	f.mu.Unlock()
	if !found || time.Now().After(e.expires) {
		http.NotFound(w, r)
		return
	}
	u, err := url.ParseRequestURI(e.path)
	if err != nil {
		http.NotFound(w, r)
		return
	}
	r2 := r.Clone(r.Context())
	r2.URL.Path, r2.URL.RawPath, r2.URL.RawQuery, r2.RequestURI = u.Path, u.RawPath, u.RawQuery, e.path
	f.inner.ServeHTTP(w, r2)
}
