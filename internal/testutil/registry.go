package testutil

import (
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
)

// HostileRegistry is a real registry (go-containerregistry's, in memory, on
// loopback) whose GET responses for chosen digests a test rewrites (tamper,
// truncate, pad) and whose blobs under chosen repositories trickle.
type HostileRegistry struct {
	Host    string // host:port
	mu      sync.Mutex
	rewrite map[string]func([]byte) []byte // digest → new body
	slow    map[string]time.Duration       // repository → delay per byte of its blobs
	gets    map[string]int                 // digest → GET count
}

// NewHostileRegistry serves a registry until the test ends.
func NewHostileRegistry(t testing.TB) *HostileRegistry {
	h := &HostileRegistry{rewrite: map[string]func([]byte) []byte{}, slow: map[string]time.Duration{}, gets: map[string]int{}}
	reg := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		digest := r.URL.Path[strings.LastIndex(r.URL.Path, "/")+1:]
		h.mu.Lock()
		fn := h.rewrite[digest]
		var delay time.Duration
		for repo, d := range h.slow {
			if strings.HasPrefix(r.URL.Path, "/v2/"+repo+"/blobs/") {
				delay = d
			}
		}
		if r.Method == http.MethodGet {
			h.gets[digest]++
		}
		h.mu.Unlock()
		if (fn == nil && delay == 0) || r.Method != http.MethodGet {
			reg.ServeHTTP(w, r)
			return
		}
		rec := httptest.NewRecorder()
		reg.ServeHTTP(rec, r)
		body := rec.Body.Bytes()
		if fn != nil {
			body = fn(body)
		}
		for k, v := range rec.Header() {
			w.Header()[k] = v
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.WriteHeader(rec.Code)
		if delay == 0 {
			_, _ = w.Write(body)
			return
		}
		for i := range body { // a trickle
			if _, err := w.Write(body[i : i+1]); err != nil {
				return
			}
			w.(http.Flusher).Flush()
			select {
			case <-r.Context().Done():
				return
			case <-time.After(delay):
			}
		}
	}))
	t.Cleanup(srv.Close)
	u, _ := url.Parse(srv.URL)
	h.Host = u.Host
	return h
}

// Rewrite makes GETs of digest answer fn(genuine body) (nil: genuine again).
func (h *HostileRegistry) Rewrite(digest string, fn func([]byte) []byte) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if fn == nil {
		delete(h.rewrite, digest)
	} else {
		h.rewrite[digest] = fn
	}
}

// Trickle makes the blobs of repo (e.g. "unikraft/slow") arrive one byte per delay.
func (h *HostileRegistry) Trickle(repo string, delay time.Duration) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.slow[repo] = delay
}

// Gets counts the GETs of digest so far.
func (h *HostileRegistry) Gets(digest string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.gets[digest]
}

// Flip returns a rewrite that flips one byte at offset at (same length).
func Flip(at int) func([]byte) []byte {
	return func(b []byte) []byte {
		b = append([]byte(nil), b...)
		b[at] ^= 0x20
		return b
	}
}
