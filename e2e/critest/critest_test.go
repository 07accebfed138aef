// Package critest_test runs the CRI validation suite (critest, built from
// sigs.k8s.io/cri-tools v1.34.0) against a real containerd alone and through
// unilet, on Debian's containerd 1.6 and on a containerd 2.x built from Go
// modules, and once more through unilet with --runtime-handler unikraft.
//
// A spec that passes on containerd alone must pass through unilet; a
// containerd-alone failure must be listed in expected/containerd-*.txt (so a
// broken stand-in image cannot hide behind an equal failure on both sides);
// the unikraft run must fail exactly the specs listed, with their reasons, in
// expected/unikraft.txt.
//
// Everything runs inside a network namespace the test creates: containerd,
// unilet, the registry, the suite and the pods it starts (hostNetwork pods
// and host ports included) see only that namespace's loopback and bridges.
// The suite's images are offline stand-ins (images_test.go) served by an
// in-process registry on that loopback; containerd's hosts.toml files put it
// in place of the registries the suite names.
package critest_test

import (
	"context"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"syscall"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/unilet-dev/unilet/internal/testutil"
)

var (
	repoRoot       string
	binDir         string
	critestBin     string
	ginkgoDir      string // holds the ginkgo CLI critest -parallel runs
	containerd2Bin string
	netns          string // the bind-mounted network namespace everything runs in
	mirrorHost     string // the registry, on the namespace's loopback
	vmMirrorHost   string // unilet's mirror: unikernel stand-ins (vmStandIns)
	resultsFile    string
)

func TestMain(m *testing.M) {
	testutil.MainNeedsRoot("e2e/critest", testutil.LaneCritest)
	testutil.MainWith("critest", func() (int, error) { return setup(m) })
}

// run is testutil.Run.
var run = testutil.Run

func setup(m *testing.M) (int, error) {
	wd, _ := os.Getwd()
	repoRoot = filepath.Join(wd, "..", "..")
	tmp, err := os.MkdirTemp("", "unilet-critest-")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(tmp)
	binDir = filepath.Join(tmp, "bin")
	if err := run(repoRoot, nil, "go", "build", "-o", binDir+"/", "./cmd/unilet", "./cmd/unilet-shim", "./cmd/unilet-jail"); err != nil {
		return 0, err
	}
	out := filepath.Join(repoRoot, "_output", "critest")
	critestBin = filepath.Join(out, "critest")
	if err := run(filepath.Join(repoRoot, "hack", "tools"), []string{"GOSUMDB=off", "GOFLAGS=-mod=mod"},
		"go", "test", "-c", "-o", critestBin, "sigs.k8s.io/cri-tools/cmd/critest"); err != nil {
		return 0, err
	}
	// critest -parallel runs its specs on several ginkgo nodes through the
	// ginkgo CLI (the version cri-tools is built with), found on PATH.
	ginkgoDir = filepath.Join(out, "ginkgo-bin")
	if err := run(filepath.Join(repoRoot, "hack", "tools"), []string{"GOSUMDB=off", "GOFLAGS=-mod=mod"},
		"go", "build", "-o", ginkgoDir+"/", "github.com/onsi/ginkgo/v2/ginkgo"); err != nil {
		return 0, err
	}
	containerd2Bin = filepath.Join(repoRoot, "_output", "containerd2", "bin")
	if err := run(repoRoot, nil, "./hack/containerd2/build.sh", containerd2Bin); err != nil {
		return 0, err
	}
	resultsFile = filepath.Join(out, "results.md")

	// The network namespace: a bind mount inside tmp, loopback up.
	netns = filepath.Join(tmp, "netns")
	if err := os.WriteFile(netns, nil, 0o644); err != nil {
		return 0, err
	}
	if err := run("", nil, "unshare", "--net="+netns, "ip", "link", "set", "lo", "up"); err != nil {
		return 0, err
	}
	defer func() { _ = syscall.Unmount(netns, syscall.MNT_DETACH) }()

	imgs, err := standIns(repoRoot, tmp, filepath.Join(out, "cache"))
	if err != nil {
		return 0, err
	}
	vmImgs, err := vmStandIns(repoRoot)
	if err != nil {
		return 0, err
	}
	for _, reg := range []struct {
		host *string
		imgs map[string]remote.Taggable
	}{{&mirrorHost, imgs}, {&vmMirrorHost, vmImgs}} {
		l, err := listenIn(netns)
		if err != nil {
			return 0, err
		}
		srv := &http.Server{Handler: registry.New(registry.Logger(log.New(io.Discard, "", 0)))}
		go func() { _ = srv.Serve(l) }()
		defer srv.Close()
		*reg.host = l.Addr().String()
		if err := pushMirrored(*reg.host, reg.imgs); err != nil {
			return 0, err
		}
	}
	return m.Run(), nil
}

// inNetns runs fn on a thread inside the network namespace at nsPath (a
// socket belongs to the namespace it was made in).
func inNetns(nsPath string, fn func()) error {
	runtime.LockOSThread()
	self, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer self.Close()
	target, err := os.Open(nsPath)
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return err
	}
	fn()
	if err := unix.Setns(int(self.Fd()), unix.CLONE_NEWNET); err != nil {
		// The thread stays locked and ends with its goroutine: never reused in the wrong namespace.
		return err
	}
	runtime.UnlockOSThread()
	return nil
}

// listenIn opens a TCP listener on the loopback of the namespace at nsPath.
func listenIn(nsPath string) (l net.Listener, err error) {
	if nerr := inNetns(nsPath, func() { l, err = net.Listen("tcp", "127.0.0.1:0") }); nerr != nil {
		return nil, nerr
	}
	return l, err
}

// pushMirrored pushes each image to the mirror under its path (registry host
// dropped), reaching the registry through the namespace (each dial made
// from inside the namespace).
func pushMirrored(mirror string, imgs map[string]remote.Taggable) error {
	tr := &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		return dialIn(netns, network, addr)
	}}
	for ref, img := range imgs {
		r, err := name.ParseReference(ref)
		if err != nil {
			return err
		}
		mirrored := mirror + "/" + r.Context().RepositoryStr() + ":" + r.Identifier()
		dst, err := name.NewTag(mirrored, name.Insecure)
		if err != nil {
			return err
		}
		switch img := img.(type) {
		case v1.ImageIndex:
			err = remote.WriteIndex(dst, img, remote.WithTransport(tr))
		case v1.Image:
			err = remote.Write(dst, img, remote.WithTransport(tr))
		default:
			err = fmt.Errorf("%T is neither an image nor an index", img)
		}
		if err != nil {
			return fmt.Errorf("push %s: %w", mirrored, err)
		}
	}
	return nil
}

// dialIn dials addr from inside the namespace at nsPath.
func dialIn(nsPath, network, addr string) (c net.Conn, err error) {
	if nerr := inNetns(nsPath, func() { c, err = net.Dial(network, addr) }); nerr != nil {
		return nil, nerr
	}
	return c, err
}

// TestCRIValidation: critest on each containerd alone, then through unilet
// (nothing that passes alone may fail through unilet), then unikernel pods
// (--runtime-handler unikraft) through unilet.
func TestCRIValidation(t *testing.T) {
	var rows []string
	row := func(target, how string, r result) {
		rows = append(rows, fmt.Sprintf("| %s | %s | %d | %d | %d | %d |", target, how,
			len(r)-r.count("skipped"), r.count("passed"), len(r.failed()), r.count("skipped")))
	}
	for _, f := range flavors {
		t.Run(f.name, func(t *testing.T) {
			var alone result
			t.Run("alone", func(t *testing.T) {
				alone = runSuite(t, f.name+" alone", startContainerd(t, f))
				row(f.name, "alone", alone)
				failed, _ := unexpected(alone, expected(t, f.name+".txt"))
				require.Empty(t, failed, "containerd alone failed specs that expected/%s.txt does not list (a stand-in image broken?)", f.name)
			})
			t.Run("through-unilet", func(t *testing.T) {
				through := runSuite(t, f.name+" through unilet", startUnilet(t, startContainerd(t, f)))
				row(f.name, "through unilet", through)
				var regressions []string
				for spec, s := range alone {
					if s == "passed" && through[spec] != "passed" {
						regressions = append(regressions, spec)
					}
				}
				sort.Strings(regressions)
				require.Empty(t, regressions, "specs that pass on %s alone fail through unilet", f.name)
			})
		})
	}
	t.Run("unikraft", func(t *testing.T) {
		res := runSuite(t, "unikraft", startUnilet(t, startContainerd(t, flavors[0])), "-runtime-handler", "unikraft")
		row("unikernel pods (--runtime-handler unikraft)", "through unilet", res)
		failed, passed := unexpected(res, expected(t, "unikraft.txt"))
		require.Empty(t, failed, "unikernel pods failed specs that expected/unikraft.txt does not list")
		require.Empty(t, passed, "specs listed in expected/unikraft.txt as failing passed: take them off the list")
	})
	table := "| runtime | how | ran | passed | failed | skipped |\n|---|---|---|---|---|---|\n" + strings.Join(rows, "\n") + "\n"
	t.Logf("critest v1.34.0:\n%s", table)
	_ = os.WriteFile(resultsFile, []byte(table), 0o644)
}
