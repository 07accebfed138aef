package image

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/stretchr/testify/require"

	"github.com/unilet-dev/unilet/internal/testutil"
)

// pushed is a packed test image and its digests.
type pushed struct {
	ref                              string
	manifest, config, kernel, initrd v1.Descriptor
	rawManifest                      []byte
}

func pushPacked(t *testing.T, host, repo string, opts PackOptions) pushed {
	t.Helper()
	idx, err := Pack(opts)
	require.NoError(t, err)
	ref := host + "/" + repo + ":1"
	pushIndex(t, ref, idx)
	im, err := idx.IndexManifest()
	require.NoError(t, err)
	img, err := idx.Image(im.Manifests[0].Digest)
	require.NoError(t, err)
	m, err := img.Manifest()
	require.NoError(t, err)
	raw, err := img.RawManifest()
	require.NoError(t, err)
	p := pushed{ref: ref, manifest: im.Manifests[0], config: m.Config, kernel: m.Layers[0], rawManifest: raw}
	if len(m.Layers) > 1 {
		p.initrd = m.Layers[1]
	}
	return p
}

// requireNothingLeft: no image recorded, no blob, no staging file.
func requireNothingLeft(t *testing.T, s *Store) {
	t.Helper()
	imgs, err := s.List()
	require.NoError(t, err)
	require.Empty(t, imgs)
	for _, d := range []string{filepath.Join(s.root, "blobs", "sha256"), filepath.Join(s.root, "staging")} {
		ents, _ := os.ReadDir(d)
		require.Empty(t, ents, "%s holds files of a failed pull", d)
	}
}

func openTestStore(t *testing.T, host string) *Store {
	s, err := Open(t.TempDir(), []string{host})
	require.NoError(t, err)
	t.Cleanup(func() { s.Close() })
	return s
}

// Every blob is checked against its descriptor while it is read: tampered
// (same length), truncated or padded content fails the pull with a
// VerifyError and leaves nothing behind — also when asked by the genuine
// digest.
func TestPullVerifiesEveryBlob(t *testing.T) {
	reg := testutil.NewHostileRegistry(t)
	kernel := "\x7fELF" + strings.Repeat("k", 4000)
	p := pushPacked(t, reg.Host, "unikraft/app", PackOptions{Kernel: writeFile(t, kernel), Initrd: writeFile(t, "070701initrd")})
	for _, c := range []struct {
		name   string
		digest v1.Hash
		fn     func([]byte) []byte
	}{
		{"kernel tampered", p.kernel.Digest, testutil.Flip(1000)},
		{"kernel truncated", p.kernel.Digest, func(b []byte) []byte { return b[:len(b)/2] }},
		{"kernel padded", p.kernel.Digest, func(b []byte) []byte { return append(append([]byte(nil), b...), make([]byte, 1024)...) }},
		{"kernel tail tampered (after the tar's end)", p.kernel.Digest, testutil.Flip(int(p.kernel.Size) - 10)},
		{"initrd tampered", p.initrd.Digest, testutil.Flip(520)},
		{"config tampered", p.config.Digest, testutil.Flip(5)},
		{"manifest tampered", p.manifest.Digest, testutil.Flip(20)},
	} {
		t.Run(c.name, func(t *testing.T) {
			reg.Rewrite(c.digest.String(), c.fn)
			defer reg.Rewrite(c.digest.String(), nil)
			s := openTestStore(t, reg.Host)
			for _, ref := range []string{p.ref, strings.TrimSuffix(p.ref, ":1") + "@" + p.manifest.Digest.String()} {
				_, err := s.Pull(context.Background(), ref, nil)
				var ve *VerifyError
				require.ErrorAs(t, err, &ve, "%s: %v", ref, err)
				require.Contains(t, err.Error(), c.digest.String())
				requireNothingLeft(t, s)
			}
		})
	}
	s := openTestStore(t, reg.Host)
	img, err := s.Pull(context.Background(), p.ref, nil)
	require.NoError(t, err, "the genuine image pulls")
	b, err := os.ReadFile(img.Kernel)
	require.NoError(t, err)
	require.Equal(t, kernel, string(b))
}

// A registry that lies about sizes in a manifest it serves by tag: the
// layer is longer, or shorter, than declared.
func TestPullRefusesLyingSizes(t *testing.T) {
	reg := testutil.NewHostileRegistry(t)
	p := pushPacked(t, reg.Host, "unikraft/app", PackOptions{Kernel: writeFile(t, "\x7fELF"+strings.Repeat("k", 3000))})
	for _, delta := range []int64{-100, +100} {
		raw := bytes.Replace(p.rawManifest, []byte(`"size":`+strconv.FormatInt(p.kernel.Size, 10)),
			[]byte(`"size":`+strconv.FormatInt(p.kernel.Size+delta, 10)), 1)
		require.NotEqual(t, p.rawManifest, raw)
		tag := reg.Host + "/unikraft/app:lying" + strconv.FormatInt(delta, 10)
		r, err := name.NewTag(tag, name.Insecure)
		require.NoError(t, err)
		require.NoError(t, remote.Put(r, rawManifest{raw, types.OCIManifestSchema1}))
		s := openTestStore(t, reg.Host)
		_, err = s.Pull(context.Background(), tag, nil)
		var ve *VerifyError
		require.ErrorAs(t, err, &ve, "size %+d: %v", delta, err)
		requireNothingLeft(t, s)
	}
}

type rawManifest struct {
	b  []byte
	mt types.MediaType
}

func (r rawManifest) RawManifest() ([]byte, error)        { return r.b, nil }
func (r rawManifest) MediaType() (types.MediaType, error) { return r.mt, nil }

func writeFile(t *testing.T, content string) string {
	p := filepath.Join(t.TempDir(), "f")
	require.NoError(t, os.WriteFile(p, []byte(content), 0o644))
	return p
}

// pushLayer pushes a qemu/x86_64 image of one raw layer.
func pushLayer(t *testing.T, host, repo string, layer []byte, mt types.MediaType) string {
	t.Helper()
	img, err := mutate.Append(empty.Image, mutate.Addendum{Layer: static.NewLayer(layer, mt)})
	require.NoError(t, err)
	cf, err := img.ConfigFile()
	require.NoError(t, err)
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = PlatformOS, ArchX86_64
	img, err = mutate.ConfigFile(img, cf)
	require.NoError(t, err)
	ref := host + "/" + repo + ":1"
	r, err := name.NewTag(ref, name.Insecure)
	require.NoError(t, err)
	require.NoError(t, remote.Write(r, img))
	return ref
}

func tarOf(t testing.TB, entries ...*tar.Header) []byte {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, h := range entries {
		require.NoError(t, tw.WriteHeader(h))
		if h.Typeflag == tar.TypeReg && h.Size < 1<<20 {
			_, err := tw.Write(bytes.Repeat([]byte{'x'}, int(h.Size)))
			require.NoError(t, err)
		}
	}
	require.NoError(t, tw.Flush())
	return buf.Bytes()
}

// Limits are enforced while streaming: a kernel or initrd over its limit,
// a header declaring a huge (sparse) file, a gzip bomb; each fails with a
// LimitError naming the limit, and nothing is written outside the store.
func TestPullEnforcesLimits(t *testing.T) {
	reg := testutil.NewHostileRegistry(t)
	big := pushPacked(t, reg.Host, "unikraft/big", PackOptions{Kernel: writeFile(t, "\x7fELF"+strings.Repeat("k", 8000)),
		Initrd: writeFile(t, strings.Repeat("i", 3000))})

	// A header that declares 10 GiB, followed by nothing: refused before a byte is written.
	var hdr bytes.Buffer
	require.NoError(t, tar.NewWriter(&hdr).WriteHeader(&tar.Header{Name: PathKernel, Typeflag: tar.TypeReg, Mode: 0o755, Size: 10 << 30}))
	sparse := pushLayer(t, reg.Host, "unikraft/sparse", hdr.Bytes(), types.OCIUncompressedLayer)

	// 16 MiB of zeros in a file nobody asked for, gzipped to a few KiB.
	var bomb bytes.Buffer
	zw := gzip.NewWriter(&bomb)
	tw := tar.NewWriter(zw)
	require.NoError(t, tw.WriteHeader(&tar.Header{Name: "junk", Typeflag: tar.TypeReg, Mode: 0o644, Size: 16 << 20}))
	_, err := tw.Write(make([]byte, 16<<20))
	require.NoError(t, err)
	require.NoError(t, tw.Close())
	require.NoError(t, zw.Close())
	require.Less(t, bomb.Len(), 64<<10)
	bombRef := pushLayer(t, reg.Host, "unikraft/bomb", bomb.Bytes(), types.OCILayer)

	for _, c := range []struct {
		ref, what string
		limits    Limits
	}{
		{big.ref, "kernel", Limits{Kernel: 4096, Initrd: 1 << 20, Unpacked: 1 << 20, Stall: time.Minute}},
		{big.ref, "initrd", Limits{Kernel: 1 << 20, Initrd: 1024, Unpacked: 1 << 20, Stall: time.Minute}},
		{big.ref, "unpacked image", Limits{Kernel: 1 << 20, Initrd: 1 << 20, Unpacked: 10000, Stall: time.Minute}},
		{sparse, "kernel", DefaultLimits},
		{bombRef, "unpacked image", Limits{Kernel: 1 << 20, Initrd: 1 << 20, Unpacked: 1 << 20, Stall: time.Minute}},
	} {
		s := openTestStore(t, reg.Host)
		s.SetLimits(c.limits)
		_, err := s.Pull(context.Background(), c.ref, nil)
		var le *LimitError
		require.ErrorAs(t, err, &le, "%s: %v", c.ref, err)
		require.Equal(t, c.what, le.What, "%v", err)
		require.Contains(t, err.Error(), "exceeds the limit of")
		requireNothingLeft(t, s)
	}
}

// Entry names never become paths: "../", absolute names and a symlink named
// like the kernel write nothing anywhere; without a regular kernel file the
// image is not a unikernel.
func TestPullWritesNoEntryPaths(t *testing.T) {
	reg := testutil.NewHostileRegistry(t)
	outside := t.TempDir()
	layer := tarOf(t,
		&tar.Header{Name: "../../../../" + strings.TrimPrefix(outside, "/") + "/dotdot", Typeflag: tar.TypeReg, Mode: 0o644, Size: 3},
		&tar.Header{Name: outside + "/abs", Typeflag: tar.TypeReg, Mode: 0o644, Size: 3},
		&tar.Header{Name: PathKernel, Typeflag: tar.TypeSymlink, Linkname: "/etc/passwd"},
	)
	ref := pushLayer(t, reg.Host, "unikraft/paths", layer, types.OCIUncompressedLayer)
	s := openTestStore(t, reg.Host)
	_, err := s.Pull(context.Background(), ref, nil)
	require.ErrorIs(t, err, ErrNotUnikernel)
	ents, _ := os.ReadDir(outside)
	require.Empty(t, ents)
	requireNothingLeft(t, s)
}

// A trickling registry (1 byte per 20 ms) fails its own pull once it sends
// less than StallBytes in the stall window; meanwhile another pull, Get and
// List answer (before the slow pull ends: nothing waits for it).
func TestStalledRegistryDelaysNothingElse(t *testing.T) {
	reg := testutil.NewHostileRegistry(t)
	slow := pushPacked(t, reg.Host, "unikraft/slow", PackOptions{Kernel: writeFile(t, "\x7fELF"+strings.Repeat("s", 3000))})
	fast := pushPacked(t, reg.Host, "unikraft/fast", PackOptions{Kernel: writeFile(t, "\x7fELF"+strings.Repeat("f", 3000))})
	reg.Trickle("unikraft/slow", 20*time.Millisecond)
	s := openTestStore(t, reg.Host)
	s.SetLimits(Limits{Kernel: 1 << 20, Initrd: 1 << 20, Unpacked: 1 << 20, Stall: time.Second})
	done := make(chan error, 1)
	start := time.Now()
	go func() { _, err := s.Pull(context.Background(), slow.ref, nil); done <- err }()
	require.Eventually(t, func() bool { return reg.Gets(slow.config.Digest.String()) > 0 }, 10*time.Second, 5*time.Millisecond,
		"the slow pull never asked for its config")
	img, err := s.Pull(context.Background(), fast.ref, nil)
	require.NoError(t, err)
	_, err = s.Get(fast.ref)
	require.NoError(t, err)
	imgs, err := s.List()
	require.NoError(t, err)
	require.Len(t, imgs, 1)
	require.Equal(t, img.ID, imgs[0].ID)
	select {
	case err := <-done:
		t.Fatalf("the slow pull ended (%v) before the fast pull, Get and List answered: they waited for it", err)
	default:
	}
	err = <-done
	require.ErrorIs(t, err, ErrStalled)
	require.Less(t, time.Since(start), 10*time.Second, "the stall was not detected")
	ents, _ := os.ReadDir(filepath.Join(s.root, "staging"))
	require.Empty(t, ents, "the stalled pull left staging files")
}

// Pulls of one reference share one download; a caller that gives up does
// not cancel it for the others, and the last one that gives up does.
func TestConcurrentPullsOfOneRefShareTheDownload(t *testing.T) {
	reg := testutil.NewHostileRegistry(t)
	p := pushPacked(t, reg.Host, "unikraft/shared", PackOptions{Kernel: writeFile(t, "\x7fELF"+strings.Repeat("x", 1500))})
	reg.Trickle("unikraft/shared", time.Millisecond) // ~1.5 s for the kernel layer
	s := openTestStore(t, reg.Host)
	var ok atomic.Int32
	var wg sync.WaitGroup
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := s.Pull(context.Background(), p.ref, nil); err == nil {
				ok.Add(1)
			}
		}()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	_, err := s.Pull(ctx, p.ref, nil)
	cancel()
	require.ErrorIs(t, err, context.DeadlineExceeded, "a caller's own deadline ends its wait")
	wg.Wait()
	require.EqualValues(t, 4, ok.Load())
	require.Equal(t, 1, reg.Gets(p.kernel.Digest.String()), "the kernel layer was downloaded more than once")

	// Nobody waits any more: the download stops and leaves nothing.
	s2 := openTestStore(t, reg.Host)
	ctx, cancel = context.WithTimeout(context.Background(), 100*time.Millisecond)
	_, err = s2.Pull(ctx, p.ref, nil)
	cancel()
	require.True(t, errors.Is(err, context.DeadlineExceeded))
	require.Eventually(t, func() bool {
		ents, _ := os.ReadDir(filepath.Join(s2.root, "staging"))
		return len(ents) == 0
	}, 5*time.Second, 20*time.Millisecond)
	requireNothingLeft(t, s2)
}

// A manifest beyond MaxManifestSize is cut off while it is read.
func TestPullBoundsManifests(t *testing.T) {
	reg := testutil.NewHostileRegistry(t)
	p := pushPacked(t, reg.Host, "unikraft/huge", PackOptions{Kernel: writeFile(t, "\x7fELFk")})
	reg.Rewrite("1", func(b []byte) []byte { return append(bytes.Repeat([]byte(" "), MaxManifestSize+1), b...) })
	s := openTestStore(t, reg.Host)
	_, err := s.Pull(context.Background(), p.ref, nil)
	var le *LimitError
	require.ErrorAs(t, err, &le, "%v", err)
	require.Equal(t, "manifest", le.What)
	requireNothingLeft(t, s)
}
