package critest_test

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/unilet-dev/unilet/image"
	"github.com/unilet-dev/unilet/internal/testimages"
)

// The suite's image names (cri-tools v1.34.0 pkg/validate and pkg/framework).
// They are served from a loopback registry that containerd's hosts.toml
// files put in place of these registries.
const (
	e2eImages   = "registry.k8s.io/e2e-test-images/"
	critoolsReg = "gcr.io/k8s-staging-cri-tools/"
)

// mirroredRegistries are the registry hosts of the suite's images.
var mirroredRegistries = []string{"registry.k8s.io", "gcr.io"}

// standIns builds an offline stand-in for every image the suite pulls (the
// digest-pinned test-image-digest cannot be reproduced: its digest names
// content we do not have). Returns full reference → image.
//
//   - busybox:1.29-2: Debian's busybox package (dynamically linked: its shell
//     runs programs from the filesystem, as the official image does, which
//     the MaskedPaths spec relies on) with its libc, the host's pgrep and ipcs
//     (busybox lacks them) and a passwd/group like the official image's.
//   - nginx, httpd, hostnet-nginx: that busybox plus e2e/critest/images/webserver
//     installed as nginx (port 80, /var/run/nginx.pid, "master process" in its
//     command line), httpd (port 80) or nginx on port 12003.
//   - nonewprivs: e2e/critest/images/nnp, setuid root, prints its effective uid.
//   - test-image-*: one file each (test-image-tags:1..3 are one image), with
//     the users the image specs expect; test-image-predefined-group: busybox
//     plus default-user (1000) in group 50000.
func standIns(repoRoot, work, cache string) (map[string]remote.Taggable, error) {
	bb, err := busyboxRootfs(cache)
	if err != nil {
		return nil, err
	}
	bins := map[string][]byte{}
	for _, prog := range []string{"webserver", "nnp"} {
		out := filepath.Join(work, prog)
		cmd := exec.Command("go", "build", "-o", out, "./e2e/critest/images/"+prog)
		cmd.Dir, cmd.Env = repoRoot, append(os.Environ(), "CGO_ENABLED=0")
		if b, err := cmd.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("build %s: %v\n%s", prog, err, b)
		}
		if bins[prog], err = os.ReadFile(out); err != nil {
			return nil, err
		}
	}
	const path = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	with := func(extra ...testimages.Entry) []testimages.Entry {
		return append(append([]testimages.Entry(nil), bb...), extra...)
	}
	imgs := map[string]remote.Taggable{}
	add := func(ref string, entries []testimages.Entry, cfg v1.Config) {
		if err != nil {
			return
		}
		if cfg.Env == nil {
			cfg.Env = []string{path}
		}
		imgs[ref], err = testimages.BuildEntries(entries, cfg)
	}
	add(e2eImages+"busybox:1.29-2", bb, v1.Config{Cmd: []string{"sh"}})
	add(e2eImages+"nginx:1.14-2", with(testimages.Entry{Path: "usr/sbin/nginx", Data: bins["webserver"]}),
		v1.Config{Cmd: []string{"nginx", "-g", "daemon off; master process"}, ExposedPorts: map[string]struct{}{"80/tcp": {}}})
	add(e2eImages+"httpd:2.4.39-4", with(testimages.Entry{Path: "usr/local/bin/httpd", Data: bins["webserver"]}),
		v1.Config{Cmd: []string{"httpd", "-DFOREGROUND"}, ExposedPorts: map[string]struct{}{"80/tcp": {}}})
	add(critoolsReg+"hostnet-nginx-amd64:latest", with(testimages.Entry{Path: "usr/sbin/nginx", Data: bins["webserver"]}),
		v1.Config{Cmd: []string{"nginx"}, Env: []string{path, "PORT=12003"}})
	add(e2eImages+"nonewprivs:1.3", []testimages.Entry{{Path: "usr/local/bin/nnp", Data: bins["nnp"], Mode: 0o4755}},
		v1.Config{Cmd: []string{"/usr/local/bin/nnp"}})

	file := func(name string) []testimages.Entry {
		return []testimages.Entry{{Path: "test-image", Data: []byte(name + "\n"), Mode: 0o644}}
	}
	for _, u := range []struct{ ref, user string }{
		{"test-image-user-uid", "1002"}, {"test-image-user-username", "www-data"},
		{"test-image-user-uid-group", "1003:1003"}, {"test-image-user-username-group", "www-data:www-data"},
	} {
		add(critoolsReg+u.ref+":latest", file(u.ref), v1.Config{User: u.user})
	}
	for _, ref := range []string{"test-image-latest:latest", "test-image-tag:test", "test-image-tag:all",
		"test-image-1:latest", "test-image-2:latest", "test-image-3:latest"} {
		add(critoolsReg+ref, file(ref), v1.Config{})
	}
	add(critoolsReg+"test-image-tags:1", file("test-image-tags"), v1.Config{})
	imgs[critoolsReg+"test-image-tags:2"] = imgs[critoolsReg+"test-image-tags:1"]
	imgs[critoolsReg+"test-image-tags:3"] = imgs[critoolsReg+"test-image-tags:1"]
	predefined := replaceEntries(bb, map[string]string{
		"etc/passwd": passwd + "default-user:x:1000:1000::/home/default-user:/bin/sh\n",
		"etc/group":  group + "default-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n",
	})
	add(critoolsReg+"test-image-predefined-group:latest", predefined, v1.Config{Cmd: []string{"sh"}, User: "1000"})
	return imgs, err
}

const (
	passwd = "root:x:0:0:root:/root:/bin/sh\ndaemon:x:1:1:daemon:/usr/sbin:/bin/false\nbin:x:2:2:bin:/bin:/bin/false\n" +
		"www-data:x:33:33:www-data:/var/www:/bin/false\nnobody:x:65534:65534:nobody:/home:/bin/false\n"
	group = "root:x:0:\ndaemon:x:1:\nbin:x:2:\nwww-data:x:33:\nusers:x:100:\nnogroup:x:65534:\n"
)

func replaceEntries(entries []testimages.Entry, files map[string]string) []testimages.Entry {
	out := make([]testimages.Entry, 0, len(entries))
	for _, e := range entries {
		if c, ok := files[e.Path]; ok {
			e.Data = []byte(c)
		}
		out = append(out, e)
	}
	return out
}

// busyboxRootfs: Debian's (dynamic) busybox package, downloaded once into
// cache, with its applets as hard links (as in the official image), the shared libraries it and the host's pgrep
// and ipcs need, and the usual directories and account files.
func busyboxRootfs(cache string) ([]testimages.Entry, error) {
	if err := os.MkdirAll(cache, 0o755); err != nil {
		return nil, err
	}
	debs, _ := filepath.Glob(filepath.Join(cache, "busybox_*.deb"))
	if len(debs) == 0 {
		cmd := exec.Command("apt-get", "download", "busybox")
		cmd.Dir = cache
		if out, err := cmd.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("apt-get download busybox: %v\n%s", err, out)
		}
		if debs, _ = filepath.Glob(filepath.Join(cache, "busybox_*.deb")); len(debs) == 0 {
			return nil, fmt.Errorf("apt-get download busybox left no .deb in %s", cache)
		}
	}
	fsys, err := exec.Command("dpkg-deb", "--fsys-tarfile", debs[0]).Output()
	if err != nil {
		return nil, fmt.Errorf("dpkg-deb %s: %v", debs[0], err)
	}
	var bb []byte
	tr := tar.NewReader(bytes.NewReader(fsys))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, err
		}
		if strings.TrimPrefix(h.Name, "./") == "bin/busybox" {
			if bb, err = io.ReadAll(tr); err != nil {
				return nil, err
			}
		}
	}
	if bb == nil {
		return nil, fmt.Errorf("%s holds no bin/busybox", debs[0])
	}
	bbPath := filepath.Join(cache, "busybox")
	if err := os.WriteFile(bbPath, bb, 0o755); err != nil {
		return nil, err
	}
	list, err := exec.Command(bbPath, "--list").Output()
	if err != nil {
		return nil, fmt.Errorf("busybox --list: %v", err)
	}
	entries := []testimages.Entry{{Path: "bin/busybox", Data: bb},
		{Path: "etc/passwd", Data: []byte(passwd), Mode: 0o644}, {Path: "etc/group", Data: []byte(group), Mode: 0o644},
		{Path: "tmp", Dir: true, Mode: 0o1777}, {Path: "var/run", Dir: true}, {Path: "root", Dir: true, Mode: 0o700},
		{Path: "home", Dir: true}, {Path: "usr/bin", Dir: true}, {Path: "usr/sbin", Dir: true}}
	for _, applet := range strings.Fields(string(list)) {
		if applet != "busybox" {
			entries = append(entries, testimages.Entry{Path: "bin/" + applet, HardLink: "bin/busybox"})
		}
	}
	libs := map[string]bool{}
	for _, tool := range []string{"pgrep", "ipcs"} {
		host, err := exec.LookPath(tool)
		if err != nil {
			return nil, fmt.Errorf("%s is required (procps, util-linux): %w", tool, err)
		}
		b, err := os.ReadFile(host)
		if err != nil {
			return nil, err
		}
		entries = append(entries, testimages.Entry{Path: "usr/bin/" + tool, Data: b})
		if err := sharedLibs(host, libs); err != nil {
			return nil, err
		}
	}
	if err := sharedLibs(bbPath, libs); err != nil {
		return nil, err
	}
	for lib := range libs {
		b, err := os.ReadFile(lib) // follows the soname link: the file lands under the name the loader asks for
		if err != nil {
			return nil, err
		}
		entries = append(entries, testimages.Entry{Path: strings.TrimPrefix(lib, "/"), Data: b})
	}
	return entries, nil
}

var lddPath = regexp.MustCompile(`(?m)(?:=>\s*)?(/\S+)\s+\(0x`)

// sharedLibs adds the libraries ldd lists for bin (loader included) to libs.
func sharedLibs(bin string, libs map[string]bool) error {
	out, err := exec.Command("ldd", bin).Output()
	if err != nil {
		return fmt.Errorf("ldd %s: %v", bin, err)
	}
	for _, m := range lddPath.FindAllStringSubmatch(string(out), -1) {
		libs[m[1]] = true
	}
	return nil
}

// vmStandIns: what unikernel pods pull under the suite's image names (unilet
// fetches them from its own mirror): the network test guest (Debian's kernel,
// busybox userland, our init honouring Unikraft's command line), which runs
// the suite's shell commands as its application. nginx and httpd run
// busybox's httpd on port 80.
func vmStandIns(repoRoot string) (map[string]remote.Taggable, error) {
	out := filepath.Join(repoRoot, "_output", "netguest")
	cmd := exec.Command("./e2e/guest/netguest/build.sh", out)
	cmd.Dir = repoRoot
	if b, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("build the network guest: %v\n%s", err, b)
	}
	pack := func(args ...string) (v1.ImageIndex, error) {
		return image.Pack(image.PackOptions{Kernel: filepath.Join(out, "vmlinuz"), Initrd: filepath.Join(out, "initrd.gz"),
			KConfig: testimages.NetGuestFeatures, Args: args, Labels: map[string]string{"dev.unilet.min-memory": "128"}})
	}
	web := func(name string) []string {
		return []string{"sh", "-c", "mkdir -p /www && echo " + name + " > /www/index.html && echo " + name + ": serving on :80 && exec httpd -f -p 80 -h /www"}
	}
	imgs := map[string]remote.Taggable{}
	for ref, args := range map[string][]string{e2eImages + "busybox:1.29-2": {"sh"},
		e2eImages + "nginx:1.14-2": web("nginx"), e2eImages + "httpd:2.4.39-4": web("httpd")} {
		idx, err := pack(args...)
		if err != nil {
			return nil, err
		}
		imgs[ref] = idx
	}
	return imgs, nil
}
