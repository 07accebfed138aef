// Package streamtoken fronts the CRI streaming server (attach,
// port-forward) with 128-bit, single-use, short-lived tokens: the library's
// own URLs carry 8-character tokens (48 bits), so they are never handed out;
// only paths under /t/<token> reach the server. URLs handed out and never
// used are bounded per owner (a pod) and in all: a new one evicts the
// oldest unused one, whose token in the inner server's own cache (1000
// entries, a minute each) is redeemed and dropped, so unused URLs of one
// client never make attach or port-forward fail for the node.
package streamtoken

import (
	"crypto/rand"
	"encoding/base64"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"
)

// TTL is how long a token stays valid (as the streaming library's own).
const TTL = time.Minute

// Bounds of the URLs outstanding (handed out, neither used nor expired):
// per owner, and in all — below the inner server's 1000, which every inner
// token counts against until used or expired.
const (
	MaxPerOwner = 32
	MaxTokens   = 900
)

// Front serves only /t/<token> URLs, each once, by handing the request to
// the inner streaming server under the URL the token stands for.
type Front struct {
	inner http.Handler
	ttl   time.Duration
	mu    sync.Mutex
	m     map[string]entry
}

type entry struct {
	owner   string
	path    string // the inner URL's path and query
	issued  time.Time
	expires time.Time
}

// New fronts inner.
func New(inner http.Handler) *Front {
	return &Front{inner: inner, ttl: TTL, m: map[string]entry{}}
}

// Wrap exchanges an inner streaming URL for one with a fresh 128-bit token,
// on behalf of owner (the pod the URL reaches). When owner has MaxPerOwner
// URLs outstanding, or all owners MaxTokens, the oldest unused one (of
// owner, else of anyone) is revoked.
func (f *Front) Wrap(owner, inner string) (string, error) {
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
	var revoked []string
	f.mu.Lock()
	mine := 0
	for k, e := range f.m {
		if now.After(e.expires) {
			delete(f.m, k)
		} else if e.owner == owner {
			mine++
		}
	}
	for mine >= MaxPerOwner || len(f.m) >= MaxTokens {
		k := f.oldest(owner, mine >= MaxPerOwner)
		if e, ok := f.m[k]; ok {
			if e.owner == owner {
				mine--
			}
			revoked = append(revoked, e.path)
			delete(f.m, k)
		}
	}
	f.m[tok] = entry{owner: owner, path: u.RequestURI(), issued: now, expires: now.Add(f.ttl)}
	f.mu.Unlock()
	for _, p := range revoked {
		f.redeem(p)
	}
	out := *u
	out.Path, out.RawPath, out.RawQuery = "/t/"+tok, "", ""
	return out.String(), nil
}

// oldest returns the token of the oldest outstanding URL (of owner only,
// if own). The caller holds f.mu.
func (f *Front) oldest(owner string, own bool) string {
	var key string
	var at time.Time
	for k, e := range f.m {
		if (!own || e.owner == owner) && (key == "" || e.issued.Before(at)) {
			key, at = k, e.issued
		}
	}
	return key
}

// redeem uses up the inner server's token of a revoked URL: a request
// that is no stream upgrade takes the token from its cache and is refused
// without reaching the runtime.
func (f *Front) redeem(path string) {
	r, err := http.NewRequest(http.MethodGet, path, nil)
	if err != nil {
		return
	}
	r.RequestURI = path
	f.inner.ServeHTTP(discard{h: http.Header{}}, r)
}

type discard struct{ h http.Header }

func (d discard) Header() http.Header         { return d.h }
func (d discard) Write(b []byte) (int, error) { return len(b), nil }
func (d discard) WriteHeader(int)             {}

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
