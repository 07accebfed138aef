// Command cluster brings up, and tears down, a single-node Kubernetes cluster
// on 127.0.0.1 whose kubelet talks to unilet: etcd, kube-apiserver,
// kube-controller-manager, kube-scheduler, kubelet, kube-proxy (nftables),
// CoreDNS and kubectl built from Go modules (e2e/kube/build.sh), containerd
// from Debian behind unilet for plain pods, a CNI bridge in 198.19.0.0/24
// shared by both runtimes (Services in 198.19.255.0/24, cluster DNS at
// 198.19.255.10), and a loopback image registry. Every process runs
// detached with its log in <dir>/logs.
//
//	cluster up   [--dir DIR] [--kube-bin DIR] [--unilet-bin DIR]   (UNILET_ARGS: extra unilet flags)
//	cluster down [--dir DIR]
//	cluster port NAME [--dir DIR]                                   (prints one of its ports: registry, apiserver, ...)
//	cluster registry --addr ADDR                                    (the registry process itself)
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/internal/testimages"
	"github.com/unilet-dev/unilet/internal/testutil"
	"github.com/unilet-dev/unilet/pkg/cgroups"
)

// Fixed names of the e2e cluster; its ports are free ones (ports.go).
const (
	NodeName      = "localhost" // resolves to 127.0.0.1; kubelet refuses a loopback --node-ip
	Bridge        = "unilet-k8s0"
	PodSubnet     = "198.19.0.0/24"
	ServiceSubnet = "198.19.255.0/24"
)

type cluster struct {
	dir, kubeBin, unileBin, repo string
	containerdBin                string // "" = Debian's containerd
	nodes                        int    // 1, or 2 with the second node (node2.go)
	ports                        Ports
}

func (c *cluster) p(parts ...string) string {
	return filepath.Join(append([]string{c.dir}, parts...)...)
}

func main() {
	log.SetFlags(0)
	log.SetPrefix(">> ")
	if len(os.Args) < 2 {
		log.Fatal("usage: cluster up|down|registry [flags]")
	}
	cmd := os.Args[1]
	fs := flag.NewFlagSet(cmd, flag.ExitOnError)
	wd, _ := os.Getwd()
	c := &cluster{}
	fs.StringVar(&c.dir, "dir", filepath.Join(wd, "_output", "cluster"), "cluster state directory")
	fs.StringVar(&c.kubeBin, "kube-bin", filepath.Join(wd, "_output", "kube", "bin"), "Kubernetes binaries (e2e/kube/build.sh)")
	fs.StringVar(&c.unileBin, "unilet-bin", filepath.Join(wd, "bin"), "unilet, unilet-shim, uniletctl")
	fs.StringVar(&c.repo, "repo", wd, "repository root")
	fs.StringVar(&c.containerdBin, "containerd-bin", "", "directory of a containerd 2.x build (hack/containerd2/build.sh); empty: Debian's containerd")
	fs.IntVar(&c.nodes, "nodes", 1, "1, or 2: a second node without KVM beside the first (up)")
	addr := fs.String("addr", "", "registry address (registry)")
	var name string
	args := os.Args[2:]
	if cmd == "port" && len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		name, args = args[0], args[1:]
	}
	_ = fs.Parse(args)
	// Absolute paths: every process is later proven ours by the cluster
	// directory in its command line.
	for _, p := range []*string{&c.dir, &c.kubeBin, &c.unileBin, &c.repo} {
		if abs, err := filepath.Abs(*p); err == nil {
			*p = abs
		}
	}
	var err error
	switch cmd {
	case "up":
		err = c.up()
	case "down":
		err = c.down()
	case "port":
		err = port(c.dir, name)
	case "registry":
		err = http.ListenAndServe(*addr, registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	default:
		err = fmt.Errorf("unknown command %q", cmd)
	}
	if err != nil {
		log.Fatal(err)
	}
}

// start runs a component detached (own session) with its log and pid file.
func (c *cluster) start(name, bin string, args ...string) error {
	return c.startEnv(name, nil, bin, args...)
}

// startEnv is start with extra environment variables.
func (c *cluster) startEnv(name string, env []string, bin string, args ...string) error {
	lf, err := os.OpenFile(c.p("logs", name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer lf.Close()
	cmd := exec.Command(bin, args...)
	if env != nil {
		cmd.Env = append(os.Environ(), env...)
	}
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", name, err)
	}
	if err := os.WriteFile(c.p("pids", name+".pid"), []byte(strconv.Itoa(cmd.Process.Pid)), 0o644); err != nil {
		return err
	}
	go func() { _ = cmd.Wait() }() // reap if it dies while we wait for the cluster
	return nil
}

func waitFor(what string, timeout time.Duration, ok func() error) error {
	deadline := time.Now().Add(timeout)
	var err error
	for time.Now().Before(deadline) {
		if err = ok(); err == nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("%s not ready after %s: %v", what, timeout, err)
}

func dial(network, addr string) error {
	conn, err := net.DialTimeout(network, addr, time.Second)
	if err == nil {
		conn.Close()
	}
	return err
}

func (c *cluster) kubectl(args ...string) (string, error) {
	cmd := exec.Command(filepath.Join(c.kubeBin, "kubectl"), append([]string{"--kubeconfig", c.p("kubeconfig")}, args...)...)
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

func (c *cluster) up() error {
	for _, b := range []string{"kubelet", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "etcd", "kube-proxy", "coredns"} {
		if _, err := os.Stat(filepath.Join(c.kubeBin, b)); err != nil {
			return fmt.Errorf("%s missing in %s: run e2e/kube/build.sh (make cluster-up does)", b, c.kubeBin)
		}
	}
	if err := c.down(); err != nil { // leftovers of an earlier run
		return err
	}
	_ = os.RemoveAll(c.p("logs")) // each run's logs are its own
	for _, d := range []string{"logs", "pids", "pki", "etcd", "containerd", "kubelet", "unilet", "cni/net.d", "cni/ipam", "netns", "work"} {
		if err := os.MkdirAll(c.p(d), 0o755); err != nil {
			return err
		}
	}
	t0 := time.Now()
	log.Printf("cluster state in %s", c.dir)
	var err error
	if c.ports, err = freePorts(); err != nil {
		return err
	}
	if err := c.savePorts(); err != nil {
		return err
	}
	if err := c.pki(); err != nil {
		return err
	}
	if err := c.kubeconfigs(); err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	if err := c.start("registry", self, "registry", "--addr", c.registryAddr(), "--dir", c.dir); err != nil {
		return err
	}
	if err := c.start("etcd", filepath.Join(c.kubeBin, "etcd"), "--data-dir", c.p("etcd"), "--name", "e2e",
		"--listen-client-urls", fmt.Sprintf("http://127.0.0.1:%d", c.ports.Etcd), "--advertise-client-urls", fmt.Sprintf("http://127.0.0.1:%d", c.ports.Etcd),
		"--listen-peer-urls", fmt.Sprintf("http://127.0.0.1:%d", c.ports.EtcdPeer), "--initial-advertise-peer-urls", fmt.Sprintf("http://127.0.0.1:%d", c.ports.EtcdPeer),
		"--initial-cluster", fmt.Sprintf("e2e=http://127.0.0.1:%d", c.ports.EtcdPeer), "--listen-metrics-urls", fmt.Sprintf("http://127.0.0.1:%d", c.ports.EtcdMetrics)); err != nil {
		return err
	}
	if err := waitFor("etcd", 30*time.Second, func() error { return dial("tcp", fmt.Sprintf("127.0.0.1:%d", c.ports.Etcd)) }); err != nil {
		return c.fail(err, "etcd")
	}
	pki := func(f string) string { return c.p("pki", f) }
	if err := c.start("kube-apiserver", filepath.Join(c.kubeBin, "kube-apiserver"),
		"--etcd-servers", fmt.Sprintf("http://127.0.0.1:%d", c.ports.Etcd), "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
		"--secure-port", strconv.Itoa(c.ports.APIServer), "--tls-cert-file", pki("apiserver.crt"), "--tls-private-key-file", pki("apiserver.key"),
		"--client-ca-file", pki("ca.crt"), "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file", pki("sa.pub"), "--service-account-signing-key-file", pki("sa.key"),
		"--service-cluster-ip-range", ServiceSubnet, "--authorization-mode", "Node,RBAC", "--allow-privileged=true",
		"--kubelet-client-certificate", pki("apiserver-kubelet.crt"), "--kubelet-client-key", pki("apiserver-kubelet.key"),
		"--kubelet-preferred-address-types", "Hostname,InternalIP", "--endpoint-reconciler-type", "none"); err != nil {
		return err
	}
	if err := waitFor("kube-apiserver", 90*time.Second, func() error {
		out, err := c.kubectl("get", "--raw", "/readyz")
		if err != nil || out != "ok" {
			return fmt.Errorf("%v %s", err, out)
		}
		return nil
	}); err != nil {
		return c.fail(err, "kube-apiserver")
	}
	if err := c.start("kube-controller-manager", filepath.Join(c.kubeBin, "kube-controller-manager"),
		"--kubeconfig", c.p("controller-manager.kubeconfig"), "--leader-elect=false", "--use-service-account-credentials",
		"--service-account-private-key-file", pki("sa.key"), "--root-ca-file", pki("ca.crt"),
		"--cluster-signing-cert-file", pki("ca.crt"), "--cluster-signing-key-file", pki("ca.key"),
		"--bind-address", "127.0.0.1", "--secure-port", "0"); err != nil {
		return err
	}
	if err := c.start("kube-scheduler", filepath.Join(c.kubeBin, "kube-scheduler"),
		"--kubeconfig", c.p("scheduler.kubeconfig"), "--leader-elect=false", "--bind-address", "127.0.0.1", "--secure-port", "0"); err != nil {
		return err
	}
	if err := c.bridge(); err != nil {
		return err
	}
	if err := c.coreDNS(); err != nil {
		return err
	}
	if err := c.containerd(); err != nil {
		return err
	}
	if err := c.unilet(); err != nil {
		return err
	}
	if err := c.kubelet(); err != nil {
		return err
	}
	if err := c.waitNode(NodeName, "kubelet"); err != nil {
		return err
	}
	if c.nodes == 2 {
		if err := c.node2(); err != nil {
			return err
		}
	} else if c.nodes != 1 {
		return fmt.Errorf("--nodes %d: want 1 or 2", c.nodes)
	}
	if err := c.kubeProxy(); err != nil {
		return err
	}
	if err := c.waitDNS(); err != nil {
		return err
	}
	if err := waitFor("default service account", 60*time.Second, func() error {
		_, err := c.kubectl("get", "serviceaccount", "default", "-n", "default")
		return err
	}); err != nil {
		return c.fail(err, "kube-controller-manager")
	}
	if out, err := c.kubectl("apply", "-f", filepath.Join(c.repo, "deploy", "runtimeclass.yaml")); err != nil {
		return fmt.Errorf("apply RuntimeClass: %v: %s", err, out)
	}
	log.Printf("cluster up in %s: export KUBECONFIG=%s", time.Since(t0).Round(time.Second), c.p("kubeconfig"))
	return nil
}

// waitNode waits until node reports Ready (its kubelet logs to component).
func (c *cluster) waitNode(node, component string) error {
	if err := waitFor("node "+node, 120*time.Second, func() error {
		out, err := c.kubectl("get", "node", node, "-o", `jsonpath={.status.conditions[?(@.type=="Ready")].status}`)
		if err != nil || out != "True" {
			return fmt.Errorf("Ready=%q %v", out, err)
		}
		return nil
	}); err != nil {
		return c.fail(err, component)
	}
	return nil
}

// fail adds the tail of a component's log to an error.
func (c *cluster) fail(err error, component string) error {
	b, _ := os.ReadFile(c.p("logs", component+".log"))
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 25 {
		lines = lines[len(lines)-25:]
	}
	return fmt.Errorf("%w\n--- %s log (tail) ---\n%s", err, component, strings.Join(lines, "\n"))
}

func (c *cluster) containerd() error {
	return c.nodeContainerd("containerd", c.dir, "unilet-e2e", Bridge, PodSubnet, BridgeIP)
}

// nodeContainerd writes a node's CNI network (bridge + host-local + portmap
// in subnet, gateway gw) and starts its containerd (component name, state
// under dir), then imports the offline base images into it.
func (c *cluster) nodeContainerd(name, dir, network, bridge, subnet, gw string) error {
	in := func(parts ...string) string { return filepath.Join(append([]string{dir}, parts...)...) }
	conf := fmt.Sprintf(`{"cniVersion": "1.0.0", "name": %q, "plugins": [
  {"type": "bridge", "bridge": %q, "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": %q, "ranges": [[{"subnet": %q, "gateway": %q}]], "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}`, network, bridge, in("cni", "ipam"), subnet, gw)
	if err := os.WriteFile(in("cni", "net.d", "10-"+network+".conflist"), []byte(conf), 0o644); err != nil {
		return err
	}
	sock := in("containerd", "containerd.sock")
	bin, env := "containerd", []string(nil)
	if c.containerdBin != "" { // containerd 2.x (hack/containerd2), its own shim first on PATH
		bin = filepath.Join(c.containerdBin, "containerd")
		env = []string{"PATH=" + c.containerdBin + ":" + os.Getenv("PATH")}
	}
	cfg := testimages.ContainerdDirs{Root: in("containerd", "root"), State: in("containerd", "state"), Sock: sock,
		CNIBin: testutil.CNIBinDir(), CNIConf: in("cni", "net.d")}.Config(c.containerdBin != "")
	if err := os.WriteFile(in("containerd", "config.toml"), []byte(cfg), 0o644); err != nil {
		return err
	}
	if err := c.startEnv(name, env, bin, "--config", in("containerd", "config.toml")); err != nil {
		return err
	}
	if err := waitFor(name, 30*time.Second, func() error { return dial("unix", sock) }); err != nil {
		return c.fail(err, name)
	}
	return testimages.ImportBase(c.repo, c.p("work"), sock)
}

func (c *cluster) unilet() error {
	sock := c.p("unilet", "unilet.sock")
	args := []string{"--listen", "unix://" + sock, "--root", c.p("unilet", "root"), "--state-dir", c.p("unilet", "run"),
		"--upstream-endpoint", "unix://" + c.p("containerd", "containerd.sock"), "--insecure-registry", c.registryAddr(),
		"--registry-mirror", RegistryName + "=http://" + c.registryAddr(),
		"--cni-conf-dir", c.p("cni", "net.d"), "--cni-bin-dir", testutil.CNIBinDir(), "--netns-dir", c.p("netns"),
		"--stream-address", "127.0.0.1:0", "--pod-log-root", c.p("pod-logs")}
	args = append(args, strings.Fields(os.Getenv("UNILET_ARGS"))...)
	if err := c.start("unilet", filepath.Join(c.unileBin, "unilet"), args...); err != nil {
		return err
	}
	return waitFor("unilet", 30*time.Second, func() error { return dial("unix", sock) })
}

func (c *cluster) kubelet() error {
	pki := func(f string) string { return c.p("pki", f) }
	cfg := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: %d
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: %d
tlsCertFile: %s
tlsPrivateKeyFile: %s
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: %s}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://%s
clusterDomain: cluster.local
clusterDNS: [%s]
resolvConf: /etc/resolv.conf
serializeImagePulls: false
imageGCHighThresholdPercent: 100
evictionHard: {"memory.available": "100Mi", "nodefs.available": "1%%", "imagefs.available": "1%%", "nodefs.inodesFree": "1%%"}
maxPods: 150
syncFrequency: 10s
podLogsDir: %s
`, c.ports.Kubelet, c.ports.KubeletHealthz, pki("kubelet.crt"), pki("kubelet.key"), pki("ca.crt"), c.p("unilet", "unilet.sock"), DNSServiceIP, c.p("pod-logs"))
	if err := os.WriteFile(c.p("kubelet", "config.yaml"), []byte(cfg), 0o644); err != nil {
		return err
	}
	return c.start("kubelet", filepath.Join(c.kubeBin, "kubelet"), "--config", c.p("kubelet", "config.yaml"),
		"--kubeconfig", c.p("kubelet.kubeconfig"), "--root-dir", c.p("kubelet", "root"), "--hostname-override", NodeName,
		"--node-labels", "unilet.dev/kvm=true,unilet.dev/ready=true") // the installer's label: the tool supervises unilet here
}

// down stops everything up started and removes what it made: pods (VMs and
// containers), processes, mounts, namespaces, the bridge, cgroups.
func (c *cluster) down() error {
	if _, err := os.Stat(c.dir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	c.downNode2()
	c.stop("kubelet")
	c.removePodsAt(c.p("unilet", "unilet.sock"))
	c.removePodsAt(c.p("containerd", "containerd.sock"))
	c.stop("unilet")
	c.stop("containerd")
	for _, n := range []string{"coredns", "kube-proxy", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd", "registry"} {
		c.stop(n)
	}
	c.proxyCleanup()
	// VMs and runc containers that outlived their runtimes.
	testutil.KillProcsUnder("unilet-shim", c.dir)
	testutil.KillQEMUsUnder(c.dir)
	testutil.KillProcsUnder("containerd-shim-runc-v2", c.p("containerd"))
	testutil.UnmountUnder(c.dir)
	_ = exec.Command("ip", "link", "del", Bridge).Run()
	for _, cg := range []string{"/kubepods", "/unilet"} {
		cgroups.RemoveTree(cg)
	}
	for _, d := range []string{"etcd", "containerd", "kubelet", "unilet", "cni", "netns", "work", "pki", "pids", "host-bin", "pod-logs",
		"kubeconfig", "kubelet.kubeconfig", "controller-manager.kubeconfig", "scheduler.kubeconfig", "kube-proxy.kubeconfig", "coredns.kubeconfig",
		"kube-proxy.yaml", "dns.yaml", "Corefile", "node2", "kubelet2.kubeconfig"} {
		if err := os.RemoveAll(c.p(d)); err != nil {
			return fmt.Errorf("remove %s: %w", c.p(d), err)
		}
	}
	return nil
}

// removePodsAt stops and removes every pod through the CRI socket sock
// (unilet: unikernel pods; containerd: plain pods), so no VM, shim, netns or runc
// container is left.
func (c *cluster) removePodsAt(sock string) {
	if dial("unix", sock) != nil {
		return
	}
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return
	}
	defer conn.Close()
	rt := runtimeapi.NewRuntimeServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if l, err := rt.ListPodSandbox(ctx, &runtimeapi.ListPodSandboxRequest{}); err == nil {
		for _, p := range l.GetItems() {
			_, _ = rt.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: p.GetId()})
			_, _ = rt.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: p.GetId()})
		}
	}
}

// stop ends a component by its pid file: SIGTERM (twice, containerd needs
// it sometimes), then SIGKILL. A pid that is no longer the component is left alone.
func (c *cluster) stop(name string) {
	pf := c.p("pids", name+".pid")
	b, err := os.ReadFile(pf)
	if err != nil {
		return
	}
	defer os.Remove(pf)
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	alive := func() bool {
		cmd, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil || !strings.Contains(string(cmd), c.dir) {
			return false
		}
		st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		return !strings.Contains(string(st), ") Z ")
	}
	if pid <= 0 || !alive() {
		return
	}
	for i := 0; i < 2 && alive(); i++ {
		_ = syscall.Kill(pid, syscall.SIGTERM)
		for j := 0; j < 50 && alive(); j++ {
			time.Sleep(100 * time.Millisecond)
		}
	}
	if alive() {
		_ = syscall.Kill(pid, syscall.SIGKILL)
		for j := 0; j < 50 && alive(); j++ {
			time.Sleep(100 * time.Millisecond)
		}
	}
}
