// Package testimages builds the offline container images the e2e tests and
// the e2e cluster give containerd: a static pause (e2e/images/pause) and
// Debian's static busybox, imported under fixed names so nothing is pulled
// from a remote registry.
package testimages

import (
	"archive/tar"
	"bytes"
	_ "embed"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// Image names containerd knows them by.
const (
	Pause   = "unilet.test/pause:1"
	Busybox = "unilet.test/busybox:1"
)

// NetGuestKConfig is the KConfig the network test guest's init honours (a
// Unikraft image with lwip, 9pfs, vfscore automount and posix-environ), as
// `uniletctl pack --kconfig` reads it (make demo passes this file).
//
//go:embed netguest.kconfig
var NetGuestKConfig string

// NetGuestFeatures is NetGuestKConfig's lines.
var NetGuestFeatures = strings.Fields(NetGuestKConfig)

// Entry is one file, symlink or directory of an image layer.
type Entry struct {
	Path string // relative, e.g. "bin/sh"
	Data []byte // a regular file's content
	Link string // a symlink's target (Data unused)
	// HardLink: a hard link to this entry path of the same layer (as the
	// official busybox image links its applets: masking one of them masks
	// that path alone, not the binary a symlink resolves to).
	HardLink string
	Dir      bool  // a directory
	Mode     int64 // permission bits (0 = 0755; setuid etc. allowed)
}

// Build builds a linux/amd64 image from files (path → content, mode 0755)
// and symlinks (path → target).
func Build(files map[string][]byte, links map[string]string, cmd []string) (v1.Image, error) {
	var entries []Entry
	for p, b := range files {
		entries = append(entries, Entry{Path: p, Data: b})
	}
	for p, target := range links {
		entries = append(entries, Entry{Path: p, Link: target})
	}
	return BuildEntries(entries, v1.Config{Cmd: cmd, Env: []string{"PATH=/bin"}})
}

// BuildEntries builds a one-layer linux/amd64 image of entries (parent
// directories created as needed, entries sorted by path so equal inputs give
// equal digests) with the given config.
func BuildEntries(entries []Entry, cfg v1.Config) (v1.Image, error) {
	entries = slices.Clone(entries)
	slices.SortFunc(entries, func(a, b Entry) int { // hard links after their targets
		if ha, hb := a.HardLink != "", b.HardLink != ""; ha != hb {
			if ha {
				return 1
			}
			return -1
		}
		return strings.Compare(a.Path, b.Path)
	})
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	seen := map[string]bool{}
	var mkdirs func(string) error
	mkdirs = func(d string) error {
		if d == "." || d == "/" || seen[d] {
			return nil
		}
		if err := mkdirs(filepath.Dir(d)); err != nil {
			return err
		}
		seen[d] = true
		return tw.WriteHeader(&tar.Header{Name: d + "/", Typeflag: tar.TypeDir, Mode: 0o755})
	}
	for _, e := range entries {
		mode := e.Mode
		if mode == 0 {
			mode = 0o755
		}
		if e.Dir {
			if err := mkdirs(filepath.Dir(e.Path)); err != nil {
				return nil, err
			}
			if !seen[e.Path] {
				seen[e.Path] = true
				if err := tw.WriteHeader(&tar.Header{Name: e.Path + "/", Typeflag: tar.TypeDir, Mode: mode}); err != nil {
					return nil, err
				}
			}
			continue
		}
		if err := mkdirs(filepath.Dir(e.Path)); err != nil {
			return nil, err
		}
		hdr := &tar.Header{Name: e.Path, Typeflag: tar.TypeReg, Mode: mode, Size: int64(len(e.Data))}
		switch {
		case e.Link != "":
			hdr = &tar.Header{Name: e.Path, Typeflag: tar.TypeSymlink, Linkname: e.Link, Mode: 0o777}
		case e.HardLink != "":
			hdr = &tar.Header{Name: e.Path, Typeflag: tar.TypeLink, Linkname: e.HardLink, Mode: mode}
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, err
		}
		if hdr.Typeflag == tar.TypeReg {
			if _, err := tw.Write(e.Data); err != nil {
				return nil, err
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	data := buf.Bytes()
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(data)), nil })
	if err != nil {
		return nil, err
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", "amd64"
	cf.Config = cfg
	return mutate.ConfigFile(img, cf)
}

// ImportBase builds pause and busybox and imports them into the containerd
// at sock (namespace k8s.io). repoRoot locates e2e/images/pause; work is a
// scratch directory.
func ImportBase(repoRoot, work, sock string) error {
	pauseBin := filepath.Join(work, "pause")
	if out, err := exec.Command("go", "build", "-o", pauseBin, filepath.Join(repoRoot, "e2e", "images", "pause")).CombinedOutput(); err != nil {
		return fmt.Errorf("build pause: %v\n%s", err, out)
	}
	pb, err := os.ReadFile(pauseBin)
	if err != nil {
		return err
	}
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		return fmt.Errorf("Debian busybox-static is required (make deps installs it): %w", err)
	}
	links := map[string]string{}
	for _, a := range []string{"sh", "echo", "sleep", "cat", "ls", "true", "nc", "wget", "httpd", "date"} {
		links["bin/"+a] = "busybox"
	}
	pause, err := Build(map[string][]byte{"pause": pb}, nil, []string{"/pause"})
	if err != nil {
		return err
	}
	busybox, err := Build(map[string][]byte{"bin/busybox": bb}, links, []string{"/bin/sh"})
	if err != nil {
		return err
	}
	return Import(work, sock, map[string]v1.Image{Pause: pause, Busybox: busybox})
}

// Import imports images (by tag) into the containerd at sock (namespace k8s.io).
func Import(work, sock string, imgs map[string]v1.Image) error {
	byTag := map[name.Tag]v1.Image{}
	for ref, img := range imgs {
		tag, err := name.NewTag(ref)
		if err != nil {
			return err
		}
		byTag[tag] = img
	}
	archive, err := os.CreateTemp(work, "images-*.tar")
	if err != nil {
		return err
	}
	archive.Close()
	defer os.Remove(archive.Name())
	if err := tarball.MultiWriteToFile(archive.Name(), byTag); err != nil {
		return err
	}
	if out, err := exec.Command("ctr", "-a", sock, "-n", "k8s.io", "images", "import", archive.Name()).CombinedOutput(); err != nil {
		return fmt.Errorf("import images into containerd: %v\n%s", err, out)
	}
	return nil
}

// ContainerdDirs is where a test's containerd keeps its state and finds its
// CNI plugins, networks and registry hosts.
type ContainerdDirs struct {
	Root, State, Sock string
	// CNIBin and CNIConf: CNI plugins and network configs ("" = none).
	CNIBin, CNIConf string
	// RegistryHosts: a hosts.toml directory (config_path) that maps
	// registries to a loopback mirror ("" = none).
	RegistryHosts string
}

// Config2 is a containerd 2.x config (version 3: the CRI plugin split into
// images and runtime) with what Config16 sets.
func (d ContainerdDirs) Config2() string {
	cfg := fmt.Sprintf(`version = 3
root = %q
state = %q
[grpc]
  address = %q
[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = %q
[plugins.'io.containerd.cri.v1.runtime']
  restrict_oom_score_adj = true
`, d.Root, d.State, d.Sock, Pause)
	if d.CNIBin != "" {
		cfg += fmt.Sprintf("[plugins.'io.containerd.cri.v1.runtime'.cni]\n  bin_dirs = [%q]\n  conf_dir = %q\n", d.CNIBin, d.CNIConf)
	}
	if d.RegistryHosts != "" {
		cfg += fmt.Sprintf("[plugins.'io.containerd.cri.v1.images'.registry]\n  config_path = %q\n", d.RegistryHosts)
	}
	return cfg
}

// Config16 is a containerd 1.6 config for the tests: private root, state
// and socket, the offline pause image, restrict_oom_score_adj (root lacks
// CAP_SYS_RESOURCE here), CNI and registry hosts when given.
func (d ContainerdDirs) Config16() string {
	cfg := fmt.Sprintf(`version = 2
root = %q
state = %q
[grpc]
  address = %q
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %q
  restrict_oom_score_adj = true
`, d.Root, d.State, d.Sock, Pause)
	if d.CNIBin != "" {
		cfg += fmt.Sprintf("  [plugins.\"io.containerd.grpc.v1.cri\".cni]\n    bin_dir = %q\n    conf_dir = %q\n", d.CNIBin, d.CNIConf)
	}
	if d.RegistryHosts != "" {
		cfg += fmt.Sprintf("  [plugins.\"io.containerd.grpc.v1.cri\".registry]\n    config_path = %q\n", d.RegistryHosts)
	}
	return cfg
}

// Config is Config2 for a containerd 2.x and Config16 otherwise.
func (d ContainerdDirs) Config(v2 bool) string {
	if v2 {
		return d.Config2()
	}
	return d.Config16()
}
