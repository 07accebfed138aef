package main

import (
	"fmt"
	"io"
	"log"
	"net"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/vishvananda/netlink"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/internal/testimages"
	"github.com/unilet-dev/unilet/internal/testutil"
	"github.com/unilet-dev/unilet/pkg/cgroups"
	"github.com/unilet-dev/unilet/pkg/netns"
	"github.com/unilet-dev/unilet/pkg/vmnet"
)

const (
	bridge    = "ubench0"
	subnet    = "198.18.200" // .0/22: room for 200+ pods
	benchCgrp = "/unilet-bench"
)

type env struct {
	dir, bin, image, accel string
	kernel                 string // the test kernel (host path)
	reg                    *httptest.Server
	daemon, ctrd           *exec.Cmd
	rt, ctrdRT             runtimeapi.RuntimeServiceClient
	img                    runtimeapi.ImageServiceClient
	conns                  []*grpc.ClientConn
	bareNS                 string
	logDir                 string
	run                    string   // tmpfs, as /run on a node
	argv                   []string // the QEMU argv of a unilet VM (for bare runs)
	machine                string   // unilet.dev/machine of new pods ("": the default)
	done                   bool
}

func sh(dir string, name string, args ...string) error {
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return nil
}

func waitSock(p string) error {
	for i := 0; i < 600; i++ {
		if c, err := net.Dial("unix", p); err == nil {
			c.Close()
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("%s did not come up", p)
}

func dialCRI(sock string) (*grpc.ClientConn, error) {
	return grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
}

func setup() (*env, error) {
	repo, _ := os.Getwd()
	dir, err := os.MkdirTemp("", "unilet-bench-")
	if err != nil {
		return nil, err
	}
	e := &env{dir: dir, bin: filepath.Join(dir, "bin"), logDir: filepath.Join(dir, "logs"), run: filepath.Join(dir, "run")}
	// Runtime state (sockets, pid files) lives on tmpfs on a real node (/run):
	// creating a socket on this machine's ext4 costs a journalled inode, which
	// showed in the 100-VM burst. So the daemon's and containerd's state and
	// the bare QEMUs' QMP sockets go to a tmpfs here as well.
	if err := os.MkdirAll(e.run, 0o755); err != nil {
		return e, err
	}
	if err := syscall.Mount("tmpfs", e.run, "tmpfs", 0, "mode=0755"); err != nil {
		return e, fmt.Errorf("mount a tmpfs for runtime state: %w", err)
	}
	_ = os.MkdirAll(filepath.Join(e.run, "bare"), 0o755)
	log.Printf("building unilet and the test kernel")
	if err := sh(repo, "go", "build", "-o", e.bin+"/", "./cmd/unilet", "./cmd/unilet-shim", "./cmd/unilet-jail", "./cmd/uniletctl"); err != nil {
		return e, err
	}
	kernel := filepath.Join(dir, "testkernel.elf")
	e.kernel = kernel
	if err := sh(repo, "./e2e/guest/testkernel/build.sh", kernel); err != nil {
		return e, err
	}
	e.reg = httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	u, _ := url.Parse(e.reg.URL)
	e.image = u.Host + "/unikraft/testkernel:bench"
	if err := sh(repo, filepath.Join(e.bin, "uniletctl"), "pack", "--kernel", kernel, "--push", e.image, "--insecure"); err != nil {
		return e, err
	}

	// containerd (Debian) for the passthrough comparison, with offline images.
	ctrdSock := filepath.Join(dir, "containerd.sock")
	cfg := testimages.ContainerdDirs{Root: filepath.Join(dir, "ctrd-root"), State: filepath.Join(e.run, "containerd"), Sock: ctrdSock}.Config16()
	if err := os.WriteFile(filepath.Join(dir, "containerd.toml"), []byte(cfg), 0o644); err != nil {
		return e, err
	}
	e.ctrd = exec.Command("containerd", "--config", filepath.Join(dir, "containerd.toml"))
	e.ctrd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := e.ctrd.Start(); err != nil {
		return e, err
	}
	if err := waitSock(ctrdSock); err != nil {
		return e, err
	}
	if err := testimages.ImportBase(repo, dir, ctrdSock); err != nil {
		return e, err
	}

	// The pod network: a bridge in 198.18.200.0/22 (a benchmarking range).
	cniDir := filepath.Join(dir, "cni")
	_ = os.MkdirAll(cniDir, 0o755)
	conf := fmt.Sprintf(`{"cniVersion": "1.0.0", "name": "unilet-bench", "plugins": [{"type": "bridge", "bridge": %q, "isGateway": true,
  "ipam": {"type": "host-local", "dataDir": %q, "ranges": [[{"subnet": "%s.0/22"}]], "routes": [{"dst": "0.0.0.0/0"}]}}]}`,
		bridge, filepath.Join(dir, "ipam"), subnet)
	if err := os.WriteFile(filepath.Join(cniDir, "10-bench.conflist"), []byte(conf), 0o644); err != nil {
		return e, err
	}
	sock := filepath.Join(dir, "unilet.sock")
	e.daemon = exec.Command(filepath.Join(e.bin, "unilet"), "--listen", "unix://"+sock, "--root", filepath.Join(dir, "root"),
		"--state-dir", e.stateDir(), "--upstream-endpoint", "unix://"+ctrdSock, "--insecure-registry", u.Host,
		"--cni-conf-dir", cniDir, "--cni-bin-dir", testutil.CNIBinDir(), "--netns-dir", filepath.Join(dir, "netns"),
		"--cgroup-root", benchCgrp, "--pod-log-root", e.logDir, "--shim-pool", strconv.Itoa(shimPool), "--log-level", "info")
	if a := os.Getenv("UNILET_BENCH_PPROF"); a != "" { // profile the daemon during a run
		e.daemon.Args = append(e.daemon.Args, "--pprof-address", a)
	}
	lf, _ := os.Create(filepath.Join(dir, "unilet.log"))
	e.daemon.Stdout, e.daemon.Stderr = lf, lf
	if err := e.daemon.Start(); err != nil {
		return e, err
	}
	if err := waitSock(sock); err != nil {
		return e, err
	}
	for _, s := range []string{sock, ctrdSock} {
		c, err := dialCRI(s)
		if err != nil {
			return e, err
		}
		e.conns = append(e.conns, c)
	}
	e.rt = runtimeapi.NewRuntimeServiceClient(e.conns[0])
	e.img = runtimeapi.NewImageServiceClient(e.conns[0])
	e.ctrdRT = runtimeapi.NewRuntimeServiceClient(e.conns[1])
	if st, err := e.rt.Status(bg, &runtimeapi.StatusRequest{Verbose: true}); err == nil {
		e.accel = st.GetInfo()["accel"]
	}
	if _, err := e.img.PullImage(bg, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: e.image},
		SandboxConfig: e.podConfig("pull")}); err != nil {
		return e, err
	}
	// A namespace with a CNI-like eth0 and a tap joined to it, so bare QEMU
	// gets the same NIC (tap fd 3) as a unilet VM.
	if e.bareNS, err = netns.Create(filepath.Join(dir, "netns"), "bare"); err != nil {
		return e, err
	}
	if err := netns.Do(e.bareNS, func() error {
		return netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0"}, PeerName: "eth0p"})
	}); err != nil {
		return e, err
	}
	if _, err := vmnet.SetupTap(e.bareNS, "eth0", "tap0"); err != nil {
		return e, err
	}
	return e, nil
}

// stateDir is the daemon's --state-dir (its VMs' QEMU argv holds it).
func (e *env) stateDir() string { return filepath.Join(e.run, "unilet") }

// shimPool is the daemon's --shim-pool (its default).
const shimPool = 2

// clearPods removes every pod of the daemon (after a failed section).
func (e *env) clearPods() {
	if e.rt == nil {
		return
	}
	if l, err := e.rt.ListPodSandbox(bg, &runtimeapi.ListPodSandboxRequest{}); err == nil {
		for _, p := range l.GetItems() {
			_, _ = e.rt.RemovePodSandbox(bg, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: p.GetId()})
		}
	}
}

func (e *env) teardown() {
	if e.done {
		return
	}
	e.done = true
	e.clearPods()
	for _, c := range e.conns {
		c.Close()
	}
	for _, c := range []*exec.Cmd{e.daemon, e.ctrd} {
		if c != nil && c.Process != nil {
			_ = c.Process.Signal(syscall.SIGTERM)
			done := make(chan struct{})
			go func() { _ = c.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				_ = c.Process.Kill()
			}
		}
	}
	testutil.KillProcsUnder("unilet-shim", e.dir)
	testutil.KillProcsUnder("qemu-system-x86_64", e.dir) // bare QEMUs (their kernel is here)
	testutil.KillQEMUsUnder(e.run)                       // unilet's, found by UNILET_VM_DIR
	testutil.KillProcsUnder("containerd-shim-runc-v2", e.dir)
	if e.bareNS != "" {
		_ = netns.Remove(e.bareNS)
	}
	testutil.UnmountUnder(e.dir)
	_ = exec.Command("ip", "link", "del", bridge).Run()
	cgroups.RemoveTree(benchCgrp)
	if e.reg != nil {
		e.reg.Close()
	}
	if os.Getenv("UNILET_BENCH_KEEP") != "" { // logs for a post-mortem
		_ = os.Rename(filepath.Join(e.dir, "unilet.log"), os.Getenv("UNILET_BENCH_KEEP"))
	}
	os.RemoveAll(e.dir)
}

func (e *env) podConfig(name string) *runtimeapi.PodSandboxConfig {
	ann := map[string]string{"kubernetes.io/target-runtime": "unikraft"}
	if e.machine != "" {
		ann["unilet.dev/machine"] = e.machine
	}
	return &runtimeapi.PodSandboxConfig{
		Metadata:     &runtimeapi.PodSandboxMetadata{Name: name, Namespace: "bench", Uid: name},
		Annotations:  ann,
		LogDirectory: filepath.Join(e.logDir, name),
	}
}
