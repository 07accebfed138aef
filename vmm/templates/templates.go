// Package templates owns VM templates (Kraftlet's instance templates):
// each under <dir>/<name>/ as template.json (what the guest was booted
// with, sizes and digests), state (QEMU's device state) and ram (the guest
// RAM, sparse). Before use the files are verified (size and SHA-256): the
// state at each clone's start, the RAM by its holder (shim.ServeTemplateRAM)
// as it loads it once into a sealed memfd, which every clone maps
// copy-on-write. Nothing outside its two directories is touched.
package templates

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/unilet-dev/unilet/vmm"
	"github.com/unilet-dev/unilet/vmm/shim"
)

// Template is one saved VM.
type Template struct {
	Name     string    `json:"name"`
	ImageID  string    `json:"imageId"` // the image's digest: clones must run the same image
	ImageRef string    `json:"imageRef"`
	Created  time.Time `json:"created"`
	// What the guest read at boot: its arguments and environment.
	Args []string `json:"args"`
	Env  []string `json:"env"`
	// Machine is the VM as the template ran (clones get the same devices,
	// RAM and vCPUs; their NIC is their pod's).
	Machine vmm.MachineConfig `json:"machine"`
	// Guest is the guest network address the template booted with.
	GuestAddr string `json:"guestAddr"`
	// Files, verified before use.
	StateSize   int64  `json:"stateSize"`
	StateDigest string `json:"stateDigest"`
	RAMSize     int64  `json:"ramSize"`
	RAMDigest   string `json:"ramDigest"`
	// QEMU identifies the QEMU binary that saved it (path, size, mtime): a
	// changed QEMU may not restore it (the clone then boots cold).
	QEMU string `json:"qemu"`
	// Uses counts clones started from it (not persisted across restarts
	// exactly: written at most every few seconds).
	Uses int64 `json:"uses"`
}

// Files of a template directory.
const (
	MetaFile  = "template.json"
	StateFile = "state"
	RAMFile   = "ram"
)

// ErrNotFound: no template of that name.
var ErrNotFound = errors.New("no such template")

// ErrExists: a template of that name exists.
var ErrExists = errors.New("a template of that name exists")

var validName = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

// CheckName validates a template name (a DNS label).
func CheckName(name string) error {
	if !validName.MatchString(name) {
		return fmt.Errorf("template name %q: want a DNS label (lower-case letters, digits and '-', at most 63)", name)
	}
	return nil
}

// Store is the templates of one daemon.
type Store struct {
	dir, runDir string
	holder      string // the unilet-shim binary, run as a RAM holder
	mu          sync.Mutex
	uses        map[string]int64 // clones started since load, by name
}

// Open returns the store under dir (templates) and runDir (the sockets of
// their RAM holders, run by holder: the unilet-shim binary).
func Open(dir, runDir, holder string) (*Store, error) {
	for _, d := range []string{dir, runDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, err
		}
	}
	s := &Store{dir: dir, runDir: runDir, holder: holder, uses: map[string]int64{}}
	// Templates half-made by a daemon that died are dropped.
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if len(e.Name()) > 5 && e.Name()[:5] == ".new-" {
			_ = os.RemoveAll(filepath.Join(dir, e.Name()))
		}
	}
	return s, nil
}

// Stage makes a new directory a template is written to (Commit publishes it).
func (s *Store) Stage(name string) (string, error) {
	if err := CheckName(name); err != nil {
		return "", err
	}
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	d := filepath.Join(s.dir, ".new-"+name+"-"+hex.EncodeToString(b))
	return d, os.Mkdir(d, 0o700)
}

// Commit publishes the template staged in staged: sizes and digests of
// its files are recorded, then it appears under its name (refused if that
// exists). The staged directory is removed on error.
func (s *Store) Commit(staged string, t Template) (err error) {
	defer func() {
		if err != nil {
			_ = os.RemoveAll(staged)
		}
	}()
	if err := CheckName(t.Name); err != nil {
		return err
	}
	if t.StateSize, t.StateDigest, err = digest(filepath.Join(staged, StateFile)); err != nil {
		return err
	}
	if t.RAMSize, t.RAMDigest, err = digest(filepath.Join(staged, RAMFile)); err != nil {
		return err
	}
	b, _ := json.MarshalIndent(t, "", "  ")
	if err := writeSynced(filepath.Join(staged, MetaFile), b); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	final := filepath.Join(s.dir, t.Name)
	if _, err := os.Lstat(final); err == nil {
		return fmt.Errorf("template %q: %w", t.Name, ErrExists)
	}
	return os.Rename(staged, final)
}

func writeSynced(path string, b []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// digest returns the size and SHA-256 of the regular file at path.
func digest(path string) (int64, string, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, "", err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil || !st.Mode().IsRegular() {
		return 0, "", fmt.Errorf("%s is not a regular file", path)
	}
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return 0, "", err
	}
	return n, "sha256:" + hex.EncodeToString(h.Sum(nil)), nil
}

// Exists reports whether a template of that name exists.
func (s *Store) Exists(name string) bool {
	_, err := s.Get(name)
	return err == nil
}

// Get reads template name's record.
func (s *Store) Get(name string) (Template, error) {
	var t Template
	if err := CheckName(name); err != nil {
		return t, err
	}
	b, err := os.ReadFile(filepath.Join(s.dir, name, MetaFile))
	if errors.Is(err, os.ErrNotExist) {
		return t, fmt.Errorf("template %q: %w", name, ErrNotFound)
	}
	if err != nil {
		return t, err
	}
	if err := json.Unmarshal(b, &t); err != nil || t.Name != name {
		return t, fmt.Errorf("template %q: its record is unreadable or names another template", name)
	}
	s.mu.Lock()
	t.Uses += s.uses[name]
	s.mu.Unlock()
	return t, nil
}

// List returns every template, by name.
func (s *Store) List() ([]Template, error) {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, err
	}
	var out []Template
	for _, e := range ents {
		if !e.IsDir() || !validName.MatchString(e.Name()) {
			continue
		}
		if t, err := s.Get(e.Name()); err == nil {
			out = append(out, t)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// Remove deletes template name; clones running from it keep their memory.
func (s *Store) Remove(name string) error {
	if err := CheckName(name); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	dir := filepath.Join(s.dir, name)
	if _, err := os.Lstat(dir); errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("template %q: %w", name, ErrNotFound)
	}
	// Renamed away first: a half-removed template is never taken for one.
	gone := filepath.Join(s.dir, ".new-gone-"+name)
	if err := os.Rename(dir, gone); err != nil {
		return err
	}
	delete(s.uses, name)
	return os.RemoveAll(gone)
}

// RemoveForImage removes every template made from image imageID; it
// returns their names.
func (s *Store) RemoveForImage(imageID string) []string {
	list, _ := s.List()
	var out []string
	for _, t := range list {
		if t.ImageID == imageID && s.Remove(t.Name) == nil {
			out = append(out, t.Name)
		}
	}
	return out
}

// holderSocket is where the holder of t's RAM serves (named by its digest,
// so a template made anew under the same name gets a holder of its own).
func (s *Store) holderSocket(t Template) string {
	d := strings.TrimPrefix(t.RAMDigest, "sha256:")
	if len(d) > 16 {
		d = d[:16]
	}
	return filepath.Join(s.runDir, t.Name+"-"+d+".sock")
}

// Prepare readies template t for a clone: its state file is verified, and
// a holder serves its RAM — a sealed memfd the holder verified while
// loading it, shared by every clone — started unless one runs. It returns
// what the clone's shim opens.
func (s *Store) Prepare(t Template) (*vmm.RestoreSpec, error) {
	dir := filepath.Join(s.dir, t.Name)
	state := filepath.Join(dir, StateFile)
	if n, d, err := digest(state); err != nil || n != t.StateSize || d != t.StateDigest {
		return nil, fmt.Errorf("template %q: its state file is missing or changed (want %d bytes %s)", t.Name, t.StateSize, t.StateDigest)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	sock := s.holderSocket(t)
	ram, err := shim.FetchTemplateRAM(sock)
	if err != nil {
		if s.holder == "" {
			return nil, errors.New("no template holder binary configured")
		}
		if err := shim.StartHolder(s.holder, filepath.Join(dir, RAMFile), t.RAMSize, t.RAMDigest, sock); err != nil {
			return nil, fmt.Errorf("template %q: %w", t.Name, err)
		}
	} else {
		st, serr := ram.Stat()
		ram.Close()
		if serr != nil || st.Size() != t.RAMSize {
			return nil, fmt.Errorf("template %q: its RAM holder serves %d bytes, want %d", t.Name, st.Size(), t.RAMSize)
		}
	}
	return &vmm.RestoreSpec{RAM: sock, State: state}, nil
}

// Used counts a clone started from template name.
func (s *Store) Used(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.uses[name]++
}

// Dir is the directory of template name.
func (s *Store) Dir(name string) string { return filepath.Join(s.dir, name) }
