package image

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/sirupsen/logrus"
	bolt "go.etcd.io/bbolt"

	"github.com/unilet-dev/unilet/pkg/metadata"
)

// ErrNotFound is returned when no stored image matches a reference.
var ErrNotFound = errors.New("image not found")

// Image is one unpacked unikernel image.
type Image struct {
	ID          string            `json:"id"` // config digest, sha256:…
	RepoTags    []string          `json:"repoTags"`
	RepoDigests []string          `json:"repoDigests"`
	Size        int64             `json:"size"`
	Kernel      string            `json:"kernel"`           // path of the unpacked kernel
	Initrd      string            `json:"initrd,omitempty"` // path of the unpacked initrd
	Cmd         []string          `json:"cmd,omitempty"`
	Env         []string          `json:"env,omitempty"`
	Features    []string          `json:"features,omitempty"` // os.features (CONFIG_X=y)
	Labels      map[string]string `json:"labels,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

// Auth is registry credentials (from CRI AuthConfig).
type Auth struct {
	Username, Password, Auth, IdentityToken, RegistryToken string
}

// Store keeps unikernel images under root: blobs/sha256/<hex> for kernel and
// initrd files (content-addressed) and metadata in a bbolt database.
type Store struct {
	root     string
	db       *bolt.DB
	insecure map[string]bool
	mirrors  map[string]string // registry host → mirror host[:port] (AddMirror)
	limits   Limits
	flights  flightGroup
	// blobMu: a pull moves its files into blobs/ and records them under
	// the read lock; Remove deletes records and unused blobs under the
	// write lock, so it never deletes a blob a pull is about to record.
	blobMu sync.RWMutex
}

var bucketImages = []byte("images")

// Open opens (creating) the store at root. insecure lists registry hosts
// (host:port) that may be reached over plain HTTP.
func Open(root string, insecure []string) (*Store, error) {
	if err := os.MkdirAll(filepath.Join(root, "blobs", "sha256"), 0o755); err != nil {
		return nil, err
	}
	// A corrupted images.db is moved aside (images can be pulled again).
	db, _, err := metadata.OpenDB(filepath.Join(root, "images.db"), 5*time.Second, bucketImages)
	if err != nil {
		return nil, fmt.Errorf("open image metadata: %w", err)
	}
	s := &Store{root: root, db: db, insecure: map[string]bool{}, mirrors: map[string]string{}, limits: DefaultLimits}
	for _, h := range insecure {
		s.insecure[h] = true
	}
	// What pulls cut short by a crash left: staging directories, and blobs
	// moved into place whose record was never written.
	_ = os.RemoveAll(filepath.Join(root, "staging"))
	s.removeUnusedBlobs()
	return s, nil
}

// SetLimits replaces the pull limits (DefaultLimits until then). Not safe
// to call once pulls have begun.
func (s *Store) SetLimits(l Limits) { s.limits = l }

// removeUnusedBlobs deletes blobs no recorded image references.
func (s *Store) removeUnusedBlobs() {
	s.blobMu.Lock()
	defer s.blobMu.Unlock()
	used := map[string]bool{}
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketImages).ForEach(func(k, v []byte) error {
			var img Image
			if json.Unmarshal(v, &img) == nil {
				used[img.Kernel], used[img.Initrd] = true, true
			}
			return nil
		})
	})
	if err != nil {
		return
	}
	dir := filepath.Join(s.root, "blobs", "sha256")
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if p := filepath.Join(dir, e.Name()); !used[p] {
			_ = os.Remove(p)
		}
	}
}

// AddMirror makes pulls of images under registry host fetch from mirror
// instead; images keep their names. mirror is host[:port] (HTTPS) or
// http://host[:port] (plain HTTP, as if listed with --insecure-registry).
// Not safe to call once pulls have begun.
func (s *Store) AddMirror(host, mirror string) error {
	reg, err := name.NewRegistry(host, name.StrictValidation)
	if err != nil || host == "" || strings.ContainsAny(host, "/@") {
		return fmt.Errorf("registry mirror: %q is not a registry host", host)
	}
	m, plain := strings.CutPrefix(mirror, "http://")
	m = strings.TrimPrefix(m, "https://")
	if _, err := name.NewRegistry(m, name.StrictValidation); err != nil || m == "" || strings.ContainsAny(m, "/@") {
		return fmt.Errorf("registry mirror for %s: %q is not host[:port] or http://host[:port]", host, mirror)
	}
	s.mirrors[reg.RegistryStr()] = m
	if plain {
		s.insecure[m] = true
	}
	return nil
}

// source is where ref is fetched from: its own registry or that registry's mirror.
func (s *Store) source(r name.Reference) (name.Reference, error) {
	m, ok := s.mirrors[r.Context().RegistryStr()]
	if !ok {
		return r, nil
	}
	opts := []name.Option{name.WeakValidation}
	if s.insecure[m] {
		opts = append(opts, name.Insecure)
	}
	repo, err := name.NewRepository(m+"/"+r.Context().RepositoryStr(), opts...)
	if err != nil {
		return nil, err
	}
	if d, ok := r.(name.Digest); ok {
		return repo.Digest(d.DigestStr()), nil
	}
	return repo.Tag(r.Identifier()), nil
}

// Close closes the metadata database.
func (s *Store) Close() error { return s.db.Close() }

// NormalizeRef returns the canonical form of a reference ("docker.io/library/x:latest").
func NormalizeRef(ref string) (name.Reference, string, error) {
	r, err := name.ParseReference(ref, name.WeakValidation)
	if err != nil {
		return nil, "", fmt.Errorf("invalid image reference %q: %w", ref, err)
	}
	reg := r.Context().RegistryStr()
	if reg == name.DefaultRegistry {
		reg = "docker.io"
	}
	repo := reg + "/" + r.Context().RepositoryStr()
	switch t := r.(type) {
	case name.Tag:
		return r, repo + ":" + t.TagStr(), nil
	case name.Digest:
		return r, repo + "@" + t.DigestStr(), nil
	}
	return r, r.String(), nil
}

func (s *Store) nameOptions(ref string) []name.Option {
	r, err := name.ParseReference(ref, name.WeakValidation)
	if err == nil && s.insecure[r.Context().RegistryStr()] {
		return []name.Option{name.WeakValidation, name.Insecure}
	}
	return []name.Option{name.WeakValidation}
}

func putImage(b *bolt.Bucket, img *Image) error {
	v, err := json.Marshal(img)
	if err != nil {
		return err
	}
	return b.Put([]byte(img.ID), v)
}

func addString(list *[]string, s string) {
	for _, v := range *list {
		if v == s {
			return
		}
	}
	*list = append(*list, s)
}

func removeString(list *[]string, s string) bool {
	for i, v := range *list {
		if v == s {
			*list = append((*list)[:i], (*list)[i+1:]...)
			return true
		}
	}
	return false
}

func checkKernel(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	// An ELF (Unikraft, multiboot) or a Linux bzImage ("HdrS" boot-protocol
	// magic at 0x202), which QEMU's -kernel also boots.
	hdr := make([]byte, 0x206)
	n, _ := io.ReadFull(f, hdr)
	if n >= 4 && bytes.Equal(hdr[:4], []byte("\x7fELF")) {
		return nil
	}
	if n >= 0x206 && bytes.Equal(hdr[0x202:0x206], []byte("HdrS")) {
		return nil
	}
	return fmt.Errorf("the kernel (%s) is neither an ELF binary nor a Linux bzImage: corrupt or not a kernel", PathKernel)
}

// List returns all images, sorted by ID. A record that does not decode,
// or whose files are not blobs of this store, is skipped with an error in
// the log: one bad record never hides the others, and no path from the
// database reaches QEMU unless it is inside the store.
func (s *Store) List() ([]*Image, error) {
	var out []*Image
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketImages).ForEach(func(k, v []byte) error {
			var img Image
			err := json.Unmarshal(v, &img)
			if err == nil {
				err = s.checkFiles(&img)
			}
			if err != nil {
				logrus.WithError(err).WithField("key", fmt.Sprintf("%q", k)).Error("unusable image record in images.db; skipped (remove it by pulling the image again)")
				return nil
			}
			out = append(out, &img)
			return nil
		})
	})
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, err
}

// checkFiles proves an image's kernel and initrd are blobs of this store.
func (s *Store) checkFiles(img *Image) error {
	blobs := filepath.Join(s.root, "blobs", "sha256")
	inBlobs := func(p string) bool { return filepath.Clean(p) == p && filepath.Dir(p) == blobs }
	if !inBlobs(img.Kernel) || (img.Initrd != "" && !inBlobs(img.Initrd)) {
		return fmt.Errorf("image %s names a kernel or initrd outside the store's blobs (%q, %q)", img.ID, img.Kernel, img.Initrd)
	}
	return nil
}

// Get finds an image by ID (full or unique prefix, with or without "sha256:"),
// tag, or repo digest.
func (s *Store) Get(ref string) (*Image, error) {
	imgs, err := s.List()
	if err != nil {
		return nil, err
	}
	canonical := ""
	if _, c, err := NormalizeRef(ref); err == nil {
		canonical = c
	}
	var byPrefix []*Image
	for _, img := range imgs {
		if img.ID == ref || img.ID == "sha256:"+ref {
			return img, nil
		}
		for _, t := range append(append([]string{}, img.RepoTags...), img.RepoDigests...) {
			if t == ref || (canonical != "" && t == canonical) {
				return img, nil
			}
		}
		hexID := strings.TrimPrefix(img.ID, "sha256:")
		r := strings.TrimPrefix(ref, "sha256:")
		if len(r) >= 6 && strings.HasPrefix(hexID, r) {
			byPrefix = append(byPrefix, img)
		}
	}
	if len(byPrefix) == 1 {
		return byPrefix[0], nil
	}
	return nil, fmt.Errorf("%w: %s", ErrNotFound, ref)
}

// Remove deletes an image and the blobs no other image uses. Removing an
// unknown image is not an error (CRI semantics); it returns false.
func (s *Store) Remove(ref string) (bool, error) {
	img, err := s.Get(ref)
	if errors.Is(err, ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	s.blobMu.Lock()
	defer s.blobMu.Unlock()
	used := map[string]bool{}
	err = s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketImages)
		if err := b.Delete([]byte(img.ID)); err != nil {
			return err
		}
		return b.ForEach(func(k, v []byte) error {
			var other Image
			if json.Unmarshal(v, &other) == nil {
				used[other.Kernel], used[other.Initrd] = true, true
			}
			return nil
		})
	})
	if err != nil {
		return false, err
	}
	for _, p := range []string{img.Kernel, img.Initrd} {
		if p != "" && !used[p] {
			_ = os.Remove(p)
		}
	}
	return true, nil
}

// Usage reports the bytes and inodes used by stored blobs.
func (s *Store) Usage() (bytes int64, inodes int64, mountpoint string) {
	dir := filepath.Join(s.root, "blobs")
	_ = filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err == nil {
			inodes++
			if !fi.IsDir() {
				bytes += fi.Size()
			}
		}
		return nil
	})
	return bytes, inodes, dir
}

// plainHTTPGuard refuses plain-HTTP requests to hosts that are not listed with
// --insecure-registry (the registry client would otherwise use HTTP for
// loopback and private addresses on its own).
type plainHTTPGuard struct {
	base    http.RoundTripper
	allowed map[string]bool
}

func (g *plainHTTPGuard) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.URL.Scheme == "http" && !g.allowed[r.URL.Host] {
		return nil, fmt.Errorf("plain HTTP to %s refused: the registry is not served over https; if that is intended, start unilet with --insecure-registry %s", r.URL.Host, r.URL.Host)
	}
	return g.base.RoundTrip(r)
}
