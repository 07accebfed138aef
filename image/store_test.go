package image

import (
	"context"
	"encoding/json"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/stretchr/testify/require"
	bolt "go.etcd.io/bbolt"
)

func fakeKernel(t *testing.T, content string) string {
	p := filepath.Join(t.TempDir(), "kernel")
	require.NoError(t, os.WriteFile(p, []byte("\x7fELF"+content), 0o755))
	return p
}

func serve(t *testing.T) string {
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(srv.Close)
	u, _ := url.Parse(srv.URL)
	return u.Host
}

func pushIndex(t *testing.T, ref string, idx v1.ImageIndex) {
	r, err := name.ParseReference(ref, name.Insecure)
	require.NoError(t, err)
	require.NoError(t, remote.WriteIndex(r, idx))
}

func TestSelectManifest(t *testing.T) {
	im := &v1.IndexManifest{Manifests: []v1.Descriptor{
		{Digest: v1.Hash{Algorithm: "sha256", Hex: "aa"}, Platform: &v1.Platform{OS: "linux", Architecture: "amd64"}},
		{Digest: v1.Hash{Algorithm: "sha256", Hex: "bb"}, Platform: &v1.Platform{OS: "kvm", Architecture: "x86_64"}},
		{Digest: v1.Hash{Algorithm: "sha256", Hex: "cc"}, Platform: &v1.Platform{OS: "qemu", Architecture: "x86_64"}},
	}}
	d, err := SelectManifest(im)
	require.NoError(t, err)
	require.Equal(t, "cc", d.Digest.Hex)
	im.Manifests = im.Manifests[:2]
	d, err = SelectManifest(im)
	require.NoError(t, err)
	require.Equal(t, "bb", d.Digest.Hex, "kvm is an alias of qemu")
	im.Manifests = im.Manifests[:1]
	_, err = SelectManifest(im)
	require.ErrorContains(t, err, "it offers: linux/amd64")
}

func TestPackPullRoundTrip(t *testing.T) {
	host := serve(t)
	kernel := fakeKernel(t, "kernel-one")
	initrd := filepath.Join(t.TempDir(), "initrd")
	require.NoError(t, os.WriteFile(initrd, []byte("070701cpio"), 0o644))
	idx, err := Pack(PackOptions{Kernel: kernel, Initrd: initrd, Args: []string{"hello"}, Env: []string{"A=1"},
		KConfig: ParseKConfig([]byte("CONFIG_LIBUKLIBPARAM=y\n# CONFIG_X is not set\nCONFIG_Y=n\n")), KernelVersion: "0.17.0"})
	require.NoError(t, err)
	ref := host + "/unikraft/hello:1.0"
	pushIndex(t, ref, idx)

	s, err := Open(t.TempDir(), []string{host})
	require.NoError(t, err)
	defer s.Close()
	img, err := s.Pull(context.Background(), ref, nil)
	require.NoError(t, err)
	require.Equal(t, []string{"hello"}, img.Cmd)
	require.Equal(t, []string{"A=1"}, img.Env)
	require.Equal(t, []string{"CONFIG_LIBUKLIBPARAM=y", "CONFIG_Y=n"}, img.Features, "every .config value, as kraftkit records them")
	require.Equal(t, "0.17.0", img.Annotations[AnnotationKernelVersion])
	require.Equal(t, []string{ref}, img.RepoTags)
	b, err := os.ReadFile(img.Kernel)
	require.NoError(t, err)
	require.Equal(t, "\x7fELFkernel-one", string(b))
	b, err = os.ReadFile(img.Initrd)
	require.NoError(t, err)
	require.Equal(t, "070701cpio", string(b))

	d, err := idx.Digest()
	require.NoError(t, err)
	require.Equal(t, []string{host + "/unikraft/hello@" + d.String()}, img.RepoDigests)
	for _, r := range []string{ref, img.ID, strings.TrimPrefix(img.ID, "sha256:")[:12], img.RepoDigests[0]} {
		got, err := s.Get(r)
		require.NoError(t, err, r)
		require.Equal(t, img.ID, got.ID)
	}
	// Pull by digest works and adds no tag.
	img2, err := s.Pull(context.Background(), img.RepoDigests[0], nil)
	require.NoError(t, err)
	require.Equal(t, img.ID, img2.ID)
	require.Equal(t, []string{ref}, img2.RepoTags)

	// A re-pushed tag moves to the new image.
	idx2, err := Pack(PackOptions{Kernel: fakeKernel(t, "kernel-two")})
	require.NoError(t, err)
	pushIndex(t, ref, idx2)
	img3, err := s.Pull(context.Background(), ref, nil)
	require.NoError(t, err)
	require.NotEqual(t, img.ID, img3.ID)
	old, err := s.Get(img.ID)
	require.NoError(t, err)
	require.Empty(t, old.RepoTags)

	removed, err := s.Remove(img.ID)
	require.NoError(t, err)
	require.True(t, removed)
	_, err = os.Stat(img.Kernel)
	require.True(t, os.IsNotExist(err), "unused blob must be removed")
	_, err = s.Get(img.ID)
	require.ErrorIs(t, err, ErrNotFound)
	removed, err = s.Remove(img.ID)
	require.NoError(t, err)
	require.False(t, removed)
}

func TestPullRejectsNonUnikernelImages(t *testing.T) {
	host := serve(t)
	s, err := Open(t.TempDir(), []string{host})
	require.NoError(t, err)
	defer s.Close()

	// A plain Linux container image.
	img, err := random.Image(64, 1)
	require.NoError(t, err)
	r, _ := name.ParseReference(host+"/library/busybox:latest", name.Insecure)
	require.NoError(t, remote.Write(r, img))
	_, err = s.Pull(context.Background(), host+"/library/busybox:latest", nil)
	require.ErrorContains(t, err, "not a Unikraft image")

	// A kernel that is not an ELF binary.
	bad := filepath.Join(t.TempDir(), "kernel")
	require.NoError(t, os.WriteFile(bad, []byte("garbage"), 0o644))
	idx, err := Pack(PackOptions{Kernel: bad})
	require.NoError(t, err)
	pushIndex(t, host+"/corrupt:1", idx)
	_, err = s.Pull(context.Background(), host+"/corrupt:1", nil)
	require.ErrorContains(t, err, "neither an ELF binary nor a Linux bzImage")

	_, err = s.Pull(context.Background(), host+"/missing:1", nil)
	require.ErrorContains(t, err, "fetch")
	_, err = s.Pull(context.Background(), "UPPER/case::bad", nil)
	require.ErrorContains(t, err, "invalid image reference")
	imgs, err := s.List()
	require.NoError(t, err)
	require.Empty(t, imgs, "failed pulls must record nothing")
	blobs, err := os.ReadDir(filepath.Join(s.root, "blobs", "sha256"))
	require.NoError(t, err)
	require.Empty(t, blobs, "failed pulls must leave no files")
}

func TestPullWithBasicAuth(t *testing.T) {
	reg := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if u, p, ok := r.BasicAuth(); !ok || u != "alice" || p != "s3cret" {
			w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		reg.ServeHTTP(w, r)
	}))
	defer srv.Close()
	u, _ := url.Parse(srv.URL)
	idx, err := Pack(PackOptions{Kernel: fakeKernel(t, "private")})
	require.NoError(t, err)
	r, err := name.ParseReference(u.Host+"/private/app:1", name.Insecure)
	require.NoError(t, err)
	require.NoError(t, remote.WriteIndex(r, idx, remote.WithAuth(&authn.Basic{Username: "alice", Password: "s3cret"})))

	s, err := Open(t.TempDir(), []string{u.Host})
	require.NoError(t, err)
	defer s.Close()
	_, err = s.Pull(context.Background(), u.Host+"/private/app:1", nil)
	require.ErrorContains(t, err, "401", "anonymous pull must be refused")
	_, err = s.Pull(context.Background(), u.Host+"/private/app:1", &Auth{Username: "alice", Password: "wrong"})
	require.Error(t, err)
	img, err := s.Pull(context.Background(), u.Host+"/private/app:1", &Auth{Username: "alice", Password: "s3cret"})
	require.NoError(t, err)
	require.NotEmpty(t, img.Kernel)
	// The CRI "auth" field: base64(user:pass).
	_, err = s.Pull(context.Background(), u.Host+"/private/app:1", &Auth{Auth: "YWxpY2U6czNjcmV0"})
	require.NoError(t, err)
}

// A registry that wants a bearer token from its token service, which itself
// takes basic credentials (the Docker registry token flow).
func TestPullWithBearerToken(t *testing.T) {
	reg := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	var realm string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/token" {
			if u, p, ok := r.BasicAuth(); !ok || u != "bob" || p != "pw" {
				w.WriteHeader(http.StatusUnauthorized)
				return
			}
			w.Header().Set("Content-Type", "application/json")
			_, _ = io.WriteString(w, `{"token":"tok-123"}`)
			return
		}
		if r.Header.Get("Authorization") != "Bearer tok-123" {
			w.Header().Set("WWW-Authenticate", `Bearer realm="`+realm+`",service="test"`)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		reg.ServeHTTP(w, r)
	}))
	defer srv.Close()
	realm = srv.URL + "/token"
	u, _ := url.Parse(srv.URL)
	idx, err := Pack(PackOptions{Kernel: fakeKernel(t, "tokened")})
	require.NoError(t, err)
	r, err := name.ParseReference(u.Host+"/tok/app:1", name.Insecure)
	require.NoError(t, err)
	require.NoError(t, remote.WriteIndex(r, idx, remote.WithAuth(&authn.Basic{Username: "bob", Password: "pw"})))

	s, err := Open(t.TempDir(), []string{u.Host})
	require.NoError(t, err)
	defer s.Close()
	_, err = s.Pull(context.Background(), u.Host+"/tok/app:1", nil)
	require.Error(t, err)
	img, err := s.Pull(context.Background(), u.Host+"/tok/app:1", &Auth{Username: "bob", Password: "pw"})
	require.NoError(t, err)
	require.NotEmpty(t, img.Kernel)
	// A registry token handed over directly (CRI AuthConfig.registry_token).
	_, err = s.Pull(context.Background(), u.Host+"/tok/app:1", &Auth{RegistryToken: "tok-123"})
	require.NoError(t, err)
}

func TestPullRefusesPlainHTTPUnlessAllowed(t *testing.T) {
	host := serve(t)
	idx, err := Pack(PackOptions{Kernel: fakeKernel(t, "x")})
	require.NoError(t, err)
	pushIndex(t, host+"/a/b:1", idx)
	s, err := Open(t.TempDir(), nil) // host not in the insecure list
	require.NoError(t, err)
	defer s.Close()
	_, err = s.Pull(context.Background(), host+"/a/b:1", nil)
	require.ErrorContains(t, err, "plain HTTP to "+host+" refused")
	require.ErrorContains(t, err, "--insecure-registry "+host)
}

// One undecodable record, or one whose kernel path leaves the store, is
// skipped: the other images still list, and no such path reaches QEMU.
func TestBadImageRecordsAreSkipped(t *testing.T) {
	host := serve(t)
	idx, err := Pack(PackOptions{Kernel: fakeKernel(t, "good")})
	require.NoError(t, err)
	pushIndex(t, host+"/unikraft/good:1", idx)
	root := t.TempDir()
	s, err := Open(root, []string{host})
	require.NoError(t, err)
	defer s.Close()
	good, err := s.Pull(context.Background(), host+"/unikraft/good:1", nil)
	require.NoError(t, err)
	hostile := *good
	hostile.ID, hostile.RepoTags, hostile.Kernel = "sha256:"+strings.Repeat("e", 64), []string{"evil:1"}, "/etc/shadow"
	b, _ := json.Marshal(hostile)
	require.NoError(t, s.db.Update(func(tx *bolt.Tx) error {
		if err := tx.Bucket(bucketImages).Put([]byte("garbage"), []byte("{not json")); err != nil {
			return err
		}
		return tx.Bucket(bucketImages).Put([]byte(hostile.ID), b)
	}))
	imgs, err := s.List()
	require.NoError(t, err, "one bad record must not fail every list")
	require.Len(t, imgs, 1)
	require.Equal(t, good.ID, imgs[0].ID)
	_, err = s.Get("evil:1")
	require.ErrorIs(t, err, ErrNotFound)
}

// A mirrored registry: the image is fetched from the mirror, by tag and by
// digest, and keeps its own name (registry.invalid never resolves: had the
// pull gone there, it would fail).
func TestPullFromRegistryMirror(t *testing.T) {
	mirror := serve(t)
	idx, err := Pack(PackOptions{Kernel: fakeKernel(t, "mirrored")})
	require.NoError(t, err)
	pushIndex(t, mirror+"/unikraft/app:1", idx)
	d, err := idx.Digest()
	require.NoError(t, err)

	s, err := Open(t.TempDir(), nil)
	require.NoError(t, err)
	defer s.Close()
	require.NoError(t, s.AddMirror("registry.invalid", "http://"+mirror))
	img, err := s.Pull(context.Background(), "registry.invalid/unikraft/app:1", nil)
	require.NoError(t, err)
	require.Equal(t, []string{"registry.invalid/unikraft/app:1"}, img.RepoTags)
	require.Equal(t, []string{"registry.invalid/unikraft/app@" + d.String()}, img.RepoDigests)
	byDigest, err := s.Pull(context.Background(), "registry.invalid/unikraft/app@"+d.String(), nil)
	require.NoError(t, err)
	require.Equal(t, img.ID, byDigest.ID)

	for _, bad := range [][2]string{{"", "x:1"}, {"a/b", "x:1"}, {"reg.io", "http://x/y"}, {"reg.io", ""}, {"reg.io", "x@y"}} {
		require.Error(t, s.AddMirror(bad[0], bad[1]), "%q", bad)
	}
}
