package image

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/sirupsen/logrus"
	bolt "go.etcd.io/bbolt"
)

// Limits bound what one pull may fetch and write; a pull beyond one fails
// with a LimitError and leaves nothing behind.
type Limits struct {
	Kernel   int64 // bytes of the kernel file
	Initrd   int64 // bytes of the initrd file
	Unpacked int64 // bytes of all layers, downloaded and unpacked (gzip bombs, sparse tars)
	// Stall: a pull that receives less than StallBytes within this long
	// fails with ErrStalled (a registry that stopped, or trickles).
	Stall time.Duration
}

// StallBytes is the progress a pull must make within Limits.Stall.
const StallBytes = 1024

// MaxManifestSize bounds an index, manifest or config (as containerd's 4 MiB).
const MaxManifestSize = 4 << 20

// maxLayers bounds the layers of one image (kraftkit writes one or two).
const maxLayers = 16

// DefaultLimits are sized for unikernels: a Unikraft kernel is a few MiB,
// an initrd rarely more than tens.
var DefaultLimits = Limits{Kernel: 256 << 20, Initrd: 256 << 20, Unpacked: 512 << 20, Stall: 60 * time.Second}

// LimitError: a pull exceeded one of Limits.
type LimitError struct {
	What  string // "kernel", "initrd", "unpacked image", "manifest", …
	Limit int64
}

func (e *LimitError) Error() string {
	return fmt.Sprintf("the image's %s exceeds the limit of %s", e.What, mib(e.Limit))
}

func mib(n int64) string {
	if n >= 1<<20 && n%(1<<20) == 0 {
		return fmt.Sprintf("%d MiB", n>>20)
	}
	return fmt.Sprintf("%d bytes", n)
}

// ErrStalled: the registry sent (nearly) nothing for Limits.Stall.
var ErrStalled = errors.New("the registry stalled")

// VerifyError: content did not match the digest or size its descriptor
// declares (tampered, truncated or padded by the registry or on the way).
type VerifyError struct {
	What, Digest string
	Detail       string
}

func (e *VerifyError) Error() string {
	return fmt.Sprintf("%s %s failed verification: %s", e.What, e.Digest, e.Detail)
}

// ErrNotUnikernel: the image is not a Unikraft image for qemu/x86_64.
var ErrNotUnikernel = errors.New("not a Unikraft image for qemu/x86_64")

// Pull fetches ref, selects the qemu/x86_64 manifest, verifies every blob
// against its digest and size while reading it, unpacks kernel and initrd
// within the limits and records the image. Pulls of one reference (with the
// same credentials) share one download, which goes on while any caller
// still waits; different references pull in parallel.
func (s *Store) Pull(ctx context.Context, ref string, auth *Auth) (*Image, error) {
	key := ref
	if auth != nil {
		h := sha256.Sum256([]byte(auth.Username + "\x00" + auth.Password + "\x00" + auth.Auth + "\x00" + auth.IdentityToken + "\x00" + auth.RegistryToken))
		key += "\x00" + hex.EncodeToString(h[:])
	}
	return s.flights.do(ctx, key, func(ctx context.Context) (*Image, error) { return s.pull(ctx, ref, auth) })
}

// flightGroup runs one pull per key; it is cancelled once no caller waits.
type flightGroup struct {
	mu sync.Mutex
	m  map[string]*flight
}

type flight struct {
	done    chan struct{}
	img     *Image
	err     error
	waiters int
	cancel  context.CancelFunc
}

func (g *flightGroup) do(ctx context.Context, key string, fn func(context.Context) (*Image, error)) (*Image, error) {
	g.mu.Lock()
	if g.m == nil {
		g.m = map[string]*flight{}
	}
	f := g.m[key]
	if f == nil {
		fctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
		f = &flight{done: make(chan struct{}), cancel: cancel}
		g.m[key] = f
		go func() {
			img, err := fn(fctx)
			cancel()
			g.mu.Lock()
			delete(g.m, key)
			f.img, f.err = img, err
			g.mu.Unlock()
			close(f.done)
		}()
	}
	f.waiters++
	g.mu.Unlock()
	select {
	case <-f.done:
		return f.img, f.err
	case <-ctx.Done():
		g.mu.Lock()
		if f.waiters--; f.waiters == 0 {
			f.cancel()
		}
		g.mu.Unlock()
		return nil, ctx.Err()
	}
}

// puller is one pull: its reference, registry options, progress and staging.
type puller struct {
	s         *Store
	ref       string // as asked
	canonical string
	src       name.Reference // where it is fetched from (a mirror maybe)
	opts      []remote.Option
	staging   string
	received  atomic.Int64 // bytes read from the registry
	unpacked  int64
	log       *logrus.Entry
}

func (s *Store) pull(ctx context.Context, ref string, auth *Auth) (img *Image, err error) {
	_, canonical, err := NormalizeRef(ref)
	if err != nil {
		return nil, err
	}
	r, err := name.ParseReference(ref, s.nameOptions(ref)...)
	if err != nil {
		return nil, fmt.Errorf("invalid image reference %q: %w", ref, err)
	}
	if r, err = s.source(r); err != nil {
		return nil, fmt.Errorf("mirror of %q: %w", ref, err)
	}
	if err := os.MkdirAll(filepath.Join(s.root, "staging"), 0o700); err != nil {
		return nil, err
	}
	staging, err := os.MkdirTemp(filepath.Join(s.root, "staging"), "pull-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(staging)
	p := &puller{s: s, ref: ref, canonical: canonical, src: r, staging: staging,
		log: logrus.WithField("image", canonical)}

	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	go p.watchStall(ctx, cancel)
	p.opts = []remote.Option{remote.WithContext(ctx), remote.WithTransport(&pullTransport{
		base: &plainHTTPGuard{base: remote.DefaultTransport, allowed: s.insecure}, p: p})}
	if auth != nil && (auth.Username != "" || auth.Auth != "" || auth.IdentityToken != "" || auth.RegistryToken != "") {
		p.opts = append(p.opts, remote.WithAuth(authn.FromConfig(authn.AuthConfig{Username: auth.Username, Password: auth.Password,
			Auth: auth.Auth, IdentityToken: auth.IdentityToken, RegistryToken: auth.RegistryToken})))
	} else {
		p.opts = append(p.opts, remote.WithAuth(authn.Anonymous))
	}
	start := time.Now()
	img, err = p.run()
	if err != nil {
		if cause := context.Cause(ctx); errors.Is(cause, ErrStalled) {
			err = fmt.Errorf("%w: less than %d bytes in %s from %s (pull of %s)", ErrStalled, StallBytes, s.limits.Stall, r.Context().RegistryStr(), ref)
		}
		p.log.WithError(err).WithField("bytes", p.received.Load()).Warn("unikernel image pull failed")
		return nil, err
	}
	p.log.WithFields(logrus.Fields{"digest": img.RepoDigests, "id": img.ID, "bytes": p.received.Load(),
		"ms": time.Since(start).Milliseconds()}).Info("pulled unikernel image")
	return img, nil
}

// watchStall cancels the pull when it received less than StallBytes in a
// Limits.Stall window.
func (p *puller) watchStall(ctx context.Context, cancel context.CancelCauseFunc) {
	stall := p.s.limits.Stall
	if stall <= 0 {
		return
	}
	t := time.NewTicker(stall)
	defer t.Stop()
	last := p.received.Load()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			now := p.received.Load()
			if now-last < StallBytes {
				cancel(ErrStalled)
				return
			}
			last = now
		}
	}
}

func (p *puller) run() (*Image, error) {
	desc, err := p.get(p.src)
	if err != nil {
		return nil, err
	}
	if d, ok := p.src.(name.Digest); ok { // asked by digest: the top manifest must be that one
		if err := verifyBytes("manifest", d.DigestStr(), -1, desc.Manifest); err != nil {
			return nil, err
		}
	}
	topDigest := desc.Digest
	raw, mediaType := desc.Manifest, desc.MediaType
	if mediaType.IsIndex() {
		im, err := v1.ParseIndexManifest(bytes.NewReader(raw))
		if err != nil {
			return nil, fmt.Errorf("read image index of %s: %w", p.ref, err)
		}
		d, err := SelectManifest(im)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", p.ref, errors.Join(ErrNotUnikernel, err))
		}
		if d.Size > MaxManifestSize {
			return nil, &LimitError{What: "manifest", Limit: MaxManifestSize}
		}
		child, err := p.get(p.src.Context().Digest(d.Digest.String()))
		if err != nil {
			return nil, err
		}
		if err := verifyBytes("manifest", d.Digest.String(), d.Size, child.Manifest); err != nil {
			return nil, err
		}
		raw, mediaType = child.Manifest, child.MediaType
	}
	if !mediaType.IsImage() {
		return nil, fmt.Errorf("%s: %w (its manifest is %s)", p.ref, ErrNotUnikernel, mediaType)
	}
	m, err := v1.ParseManifest(bytes.NewReader(raw))
	if err != nil {
		return nil, fmt.Errorf("read manifest of %s: %w", p.ref, err)
	}
	if len(m.Layers) > maxLayers {
		return nil, &LimitError{What: "layer count", Limit: maxLayers}
	}
	if m.Config.Size > MaxManifestSize {
		return nil, &LimitError{What: "config", Limit: MaxManifestSize}
	}
	cfgBytes, err := p.blob("config", m.Config, MaxManifestSize)
	if err != nil {
		return nil, err
	}
	cf, err := v1.ParseConfigFile(bytes.NewReader(cfgBytes))
	if err != nil {
		return nil, fmt.Errorf("read config of %s: %w", p.ref, err)
	}
	out, err := imageFromConfig(m, cf)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", p.ref, err)
	}
	for i, l := range m.Layers {
		if err := p.layer(i, l, out); err != nil {
			return nil, err
		}
	}
	if out.Kernel == "" {
		return nil, fmt.Errorf("%s has no %s layer: %w", p.ref, PathKernel, ErrNotUnikernel)
	}
	if err := checkKernel(out.Kernel); err != nil {
		return nil, fmt.Errorf("%s: %w", p.ref, err)
	}
	return p.commit(out, topDigest)
}

// get fetches a manifest or index (by digest: verified by the registry
// client, whose mismatch becomes a VerifyError).
func (p *puller) get(r name.Reference) (*remote.Descriptor, error) {
	desc, err := remote.Get(r, p.opts...)
	if err != nil {
		if d, ok := r.(name.Digest); ok && strings.Contains(err.Error(), "does not match requested digest") {
			return nil, &VerifyError{What: "manifest", Digest: d.DigestStr(), Detail: err.Error()}
		}
		return nil, fmt.Errorf("fetch %s (%s): %w", r, p.ref, err)
	}
	return desc, nil
}

// imageFromConfig is what unilet takes from an image's manifest and config
// (kraftkit's format: docs/images.md): its ID, Cmd, Env, Labels, os.features
// (every entry, =y or not), os.version and manifest annotations.
func imageFromConfig(m *v1.Manifest, cf *v1.ConfigFile) (*Image, error) {
	if cf.OS != "" && !IsVMPlatform(cf.OS, cf.Architecture) {
		return nil, fmt.Errorf("a %s/%s image: %w", cf.OS, cf.Architecture, ErrNotUnikernel)
	}
	ann := maps.Clone(m.Annotations)
	if cf.OSVersion != "" && ann[AnnotationKernelVersion] == "" {
		if ann == nil {
			ann = map[string]string{}
		}
		ann[AnnotationKernelVersion] = cf.OSVersion
	}
	return &Image{ID: m.Config.Digest.String(), Features: cf.OSFeatures, Cmd: cf.Config.Cmd, Env: cf.Config.Env,
		Labels: cf.Config.Labels, Annotations: ann, Size: m.Config.Size}, nil
}

// layerRole: whether a tar entry of a layer with these annotations is the
// kernel or the initrd (kraftkit's paths, or the paths the layer's
// org.unikraft.kernel.image / .initrd annotations name, leading "/" or not).
func layerRole(entry string, ann map[string]string) (kernel, initrd bool) {
	n := entryName(entry)
	kernel = n == PathKernel || ann[AnnotationKernel] != "" && entryName(ann[AnnotationKernel]) == n
	initrd = !kernel && (n == PathInitrd || ann[AnnotationInitrd] != "" && entryName(ann[AnnotationInitrd]) == n)
	return kernel, initrd
}

// blob reads a small blob whole, verified, at most limit bytes.
func (p *puller) blob(what string, d v1.Descriptor, limit int64) ([]byte, error) {
	rc, err := p.open(d)
	if err != nil {
		return nil, fmt.Errorf("fetch %s %s of %s: %w", what, d.Digest, p.ref, err)
	}
	defer rc.Close()
	vr := newVerifier(what, d, rc)
	b, err := io.ReadAll(io.LimitReader(vr, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > limit {
		return nil, &LimitError{What: what, Limit: limit}
	}
	if err := vr.finish(); err != nil {
		return nil, err
	}
	return b, nil
}

// open streams a blob of the pull's repository.
func (p *puller) open(d v1.Descriptor) (io.ReadCloser, error) {
	l, err := remote.Layer(p.src.Context().Digest(d.Digest.String()), p.opts...)
	if err != nil {
		return nil, err
	}
	return l.Compressed()
}

// layer streams one layer: the download verified against its descriptor
// (digest and size, whole stream consumed), decompressed and untarred within
// the limits; kernel and initrd go to staging files.
func (p *puller) layer(i int, d v1.Descriptor, out *Image) error {
	lim := p.s.limits
	if d.Size > lim.Unpacked-p.unpacked {
		return &LimitError{What: "unpacked image", Limit: lim.Unpacked}
	}
	rc, err := p.open(d)
	if err != nil {
		return fmt.Errorf("fetch layer %d (%s) of %s: %w", i, d.Digest, p.ref, err)
	}
	defer rc.Close()
	return p.unpack(i, d, rc, out)
}

// unpack verifies layer i (descriptor d) read from r while it stages the
// kernel and initrd entries it finds into out.
func (p *puller) unpack(i int, d v1.Descriptor, r io.Reader, out *Image) error {
	lim := p.s.limits
	vr := newVerifier(fmt.Sprintf("layer %d", i), d, r)
	var content io.Reader = vr
	switch d.MediaType {
	case types.OCIUncompressedLayer, types.OCIUncompressedRestrictedLayer, types.DockerUncompressedLayer, "":
	case types.OCILayerZStd:
		return fmt.Errorf("layer %d of %s: zstd layers are not supported; use tar or tar+gzip", i, p.ref)
	default:
		if !strings.HasSuffix(string(d.MediaType), "gzip") {
			return fmt.Errorf("layer %d of %s has media type %s: not a tar layer", i, p.ref, d.MediaType)
		}
		zr, err := gzip.NewReader(vr)
		if err != nil {
			return fmt.Errorf("layer %d of %s: %w", i, p.ref, err)
		}
		defer zr.Close()
		content = zr
	}
	// Everything unpacked counts, skipped tar entries included: a gzip
	// bomb ends here, whatever its entries.
	counted := &boundedReader{r: content, left: lim.Unpacked - p.unpacked, what: "unpacked image", limit: lim.Unpacked}
	tr := tar.NewReader(counted)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return p.layerErr(i, vr, fmt.Errorf("read tar: %w", errOrLimit(err)))
		}
		if h.Typeflag != tar.TypeReg {
			continue
		}
		isKernel, isInitrd := layerRole(h.Name, d.Annotations)
		if !isKernel && !isInitrd {
			continue
		}
		what, limit := "kernel", lim.Kernel
		if !isKernel {
			what, limit = "initrd", lim.Initrd
		}
		if h.Size > limit { // declared: a sparse or lying header fails before a byte is written
			return &LimitError{What: what, Limit: limit}
		}
		path, err := p.stage(what, tr)
		if err != nil {
			return p.layerErr(i, vr, errOrLimit(err))
		}
		if isKernel {
			out.Kernel = path
		} else {
			out.Initrd = path
		}
	}
	// The rest of the stream (after the tar's end, and of the compressed
	// stream after the gzip member) is read too: it is part of the digest.
	if _, err := io.Copy(io.Discard, counted); err != nil {
		return p.layerErr(i, vr, errOrLimit(err))
	}
	if err := vr.finish(); err != nil {
		return err
	}
	p.unpacked += lim.Unpacked - p.unpacked - counted.left
	out.Size += d.Size
	p.log.WithFields(logrus.Fields{"digest": d.Digest.String(), "bytes": d.Size}).Debug("layer verified")
	return nil
}

// layerErr: a layer that failed to unpack is reported as unverified when its
// download does not match its descriptor (the likelier cause), else as err.
func (p *puller) layerErr(i int, vr *verifier, err error) error {
	var le *LimitError
	var ve *VerifyError
	if errors.As(err, &le) || errors.As(err, &ve) {
		return err
	}
	if verr := vr.finish(); errors.As(verr, &ve) {
		return ve
	}
	return fmt.Errorf("layer %d of %s: %w", i, p.ref, err)
}

// stage writes one file into the pull's staging directory.
func (p *puller) stage(what string, r io.Reader) (string, error) {
	f, err := os.CreateTemp(p.staging, what+"-")
	if err != nil {
		return "", err
	}
	defer f.Close()
	if _, err := io.Copy(f, r); err != nil {
		return "", err
	}
	return f.Name(), f.Close()
}

// commit moves the staged files into blobs/ (content-addressed) and records
// the image, under the blob read lock (Remove never deletes a blob between
// the two).
func (p *puller) commit(out *Image, topDigest v1.Hash) (*Image, error) {
	s := p.s
	s.blobMu.RLock()
	defer s.blobMu.RUnlock()
	var err error
	if out.Kernel, err = s.storeBlob(out.Kernel); err != nil {
		return nil, err
	}
	if out.Initrd != "" {
		if out.Initrd, err = s.storeBlob(out.Initrd); err != nil {
			return nil, err
		}
	}
	canonical := p.canonical
	repoName := canonical
	if i := strings.Index(repoName, "@"); i >= 0 {
		repoName = repoName[:i]
	} else if i := strings.LastIndex(repoName, ":"); i > strings.LastIndex(repoName, "/") {
		repoName = repoName[:i]
	}
	digestRef := repoName + "@" + topDigest.String()
	err = s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketImages)
		// A tag moves: drop it from any other image.
		if !strings.Contains(canonical, "@") {
			if err := b.ForEach(func(k, v []byte) error {
				var other Image
				if json.Unmarshal(v, &other) != nil || other.ID == out.ID {
					return nil
				}
				if removeString(&other.RepoTags, canonical) {
					return putImage(b, &other)
				}
				return nil
			}); err != nil {
				return err
			}
		}
		if prev := b.Get([]byte(out.ID)); prev != nil {
			var old Image
			if json.Unmarshal(prev, &old) == nil {
				out.RepoTags, out.RepoDigests = old.RepoTags, old.RepoDigests
			}
		}
		if !strings.Contains(canonical, "@") {
			addString(&out.RepoTags, canonical)
		}
		addString(&out.RepoDigests, digestRef)
		return putImage(b, out)
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// storeBlob moves a staged file to blobs/sha256/<its sha256>.
func (s *Store) storeBlob(staged string) (string, error) {
	f, err := os.Open(staged)
	if err != nil {
		return "", err
	}
	h := sha256.New()
	_, err = io.Copy(h, f)
	f.Close()
	if err != nil {
		return "", err
	}
	if err := os.Chmod(staged, 0o644); err != nil {
		return "", err
	}
	dst := filepath.Join(s.root, "blobs", "sha256", hex.EncodeToString(h.Sum(nil)))
	return dst, os.Rename(staged, dst)
}

// verifier checks a stream against its descriptor while it is read: never
// more than the declared size passes, and finish reports a short stream or
// a digest mismatch.
type verifier struct {
	what string
	d    v1.Descriptor
	r    io.Reader
	h    hash.Hash
	n    int64
}

func newVerifier(what string, d v1.Descriptor, r io.Reader) *verifier {
	return &verifier{what: what, d: d, r: r, h: sha256.New()}
}

func (v *verifier) Read(b []byte) (int, error) {
	n, err := v.r.Read(b)
	v.n += int64(n)
	v.h.Write(b[:n])
	if v.n > v.d.Size {
		return n, &VerifyError{What: v.what, Digest: v.d.Digest.String(), Detail: fmt.Sprintf("more than the declared %d bytes", v.d.Size)}
	}
	if err != nil && err != io.EOF && strings.HasPrefix(err.Error(), "error verifying") {
		// The registry client's own check (Content-Length, digest) at the end.
		err = &VerifyError{What: v.what, Digest: v.d.Digest.String(), Detail: err.Error()}
	}
	return n, err
}

// finish drains what is left (at most to the declared size) and checks.
func (v *verifier) finish() error {
	if _, err := io.Copy(io.Discard, v); err != nil {
		return err
	}
	if v.n != v.d.Size {
		return &VerifyError{What: v.what, Digest: v.d.Digest.String(), Detail: fmt.Sprintf("%d bytes, the descriptor declares %d", v.n, v.d.Size)}
	}
	if v.d.Digest.Algorithm != "sha256" {
		return &VerifyError{What: v.what, Digest: v.d.Digest.String(), Detail: "only sha256 digests are supported"}
	}
	if got := hex.EncodeToString(v.h.Sum(nil)); got != v.d.Digest.Hex {
		return &VerifyError{What: v.what, Digest: v.d.Digest.String(), Detail: "content has digest sha256:" + got}
	}
	return nil
}

// verifyBytes checks fetched bytes against a digest (and size, if ≥ 0).
func verifyBytes(what, digest string, size int64, b []byte) error {
	if size >= 0 && int64(len(b)) != size {
		return &VerifyError{What: what, Digest: digest, Detail: fmt.Sprintf("%d bytes, the descriptor declares %d", len(b), size)}
	}
	sum := sha256.Sum256(b)
	if got := "sha256:" + hex.EncodeToString(sum[:]); got != digest {
		return &VerifyError{What: what, Digest: digest, Detail: "content has digest " + got}
	}
	return nil
}

// boundedReader fails once more than left bytes were read.
type boundedReader struct {
	r     io.Reader
	left  int64
	what  string
	limit int64
}

func (b *boundedReader) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	b.left -= int64(n)
	if b.left < 0 {
		return n, &LimitError{What: b.what, Limit: b.limit}
	}
	return n, err
}

// errOrLimit unwraps a LimitError or VerifyError the tar or gzip reader
// passed on, so the caller sees it as such.
func errOrLimit(err error) error {
	var le *LimitError
	var ve *VerifyError
	switch {
	case errors.As(err, &le):
		return le
	case errors.As(err, &ve):
		return ve
	}
	return err
}

// pullTransport counts the bytes a pull receives (for the stall watch and
// the log) and bounds manifest responses.
type pullTransport struct {
	base http.RoundTripper
	p    *puller
}

func (t *pullTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := t.base.RoundTrip(r)
	if err != nil {
		return nil, err
	}
	var limit int64 = -1
	if strings.Contains(r.URL.Path, "/manifests/") {
		limit = MaxManifestSize
	}
	resp.Body = &countingBody{rc: resp.Body, n: &t.p.received, left: limit}
	return resp, nil
}

type countingBody struct {
	rc   io.ReadCloser
	n    *atomic.Int64
	left int64 // < 0: unbounded
}

func (c *countingBody) Read(p []byte) (int, error) {
	n, err := c.rc.Read(p)
	c.n.Add(int64(n))
	if c.left >= 0 {
		if c.left -= int64(n); c.left < 0 {
			return n, &LimitError{What: "manifest", Limit: MaxManifestSize}
		}
	}
	return n, err
}

func (c *countingBody) Close() error { return c.rc.Close() }
