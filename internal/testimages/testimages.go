// Package testimages builds the offline container images the e2e tests and
// the e2e cluster give containerd: a static pause (e2e/images/pause) and
// Debian's static busybox, imported under fixed names so nothing is pulled
// from a remote registry.
package testimages

import (
	"archive/tar"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"

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

// Build builds a linux/amd64 image from files (path → content) and symlinks
// (path → target).
func Build(files map[string][]byte, links map[string]string, cmd []string) (v1.Image, error) {
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
	for p, b := range files {
		if err := mkdirs(filepath.Dir(p)); err != nil {
			return nil, err
		}
		if err := tw.WriteHeader(&tar.Header{Name: p, Typeflag: tar.TypeReg, Mode: 0o755, Size: int64(len(b))}); err != nil {
			return nil, err
		}
		if _, err := tw.Write(b); err != nil {
			return nil, err
		}
	}
	for p, target := range links {
		if err := mkdirs(filepath.Dir(p)); err != nil {
			return nil, err
		}
		if err := tw.WriteHeader(&tar.Header{Name: p, Typeflag: tar.TypeSymlink, Linkname: target, Mode: 0o777}); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	data := buf.Bytes()
	layer, err := tarball.LayerFromReader(bytes.NewReader(data))
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
	cf.Config.Cmd = cmd
	cf.Config.Env = []string{"PATH=/bin"}
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

// Containerd2Config is ContainerdConfig for containerd 2.x (config
// version 3: the CRI plugin split into images and runtime).
func Containerd2Config(root, state, sock, cniBin, cniConf string) string {
	cfg := fmt.Sprintf(`version = 3
root = %q
state = %q
[grpc]
  address = %q
[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = %q
[plugins.'io.containerd.cri.v1.runtime']
  restrict_oom_score_adj = true
`, root, state, sock, Pause)
	if cniBin != "" {
		cfg += fmt.Sprintf("[plugins.'io.containerd.cri.v1.runtime'.cni]\n  bin_dirs = [%q]\n  conf_dir = %q\n", cniBin, cniConf)
	}
	return cfg
}

// ContainerdConfig is a containerd 1.6 config for the tests: private root,
// state and socket, the offline pause image, restrict_oom_score_adj (root
// lacks CAP_SYS_RESOURCE here), and CNI from cniBin/cniConf when given.
func ContainerdConfig(root, state, sock, cniBin, cniConf string) string {
	cfg := fmt.Sprintf(`version = 2
root = %q
state = %q
[grpc]
  address = %q
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %q
  restrict_oom_score_adj = true
`, root, state, sock, Pause)
	if cniBin != "" {
		cfg += fmt.Sprintf("  [plugins.\"io.containerd.grpc.v1.cri\".cni]\n    bin_dir = %q\n    conf_dir = %q\n", cniBin, cniConf)
	}
	return cfg
}
