package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"

	"github.com/unilet-dev/unilet/internal/testutil"
	"github.com/unilet-dev/unilet/pkg/cgroups"
)

// The second node: a node without KVM, as a real cluster has beside its
// unilet nodes — its own kubelet and containerd (no unilet: kubelet talks
// to containerd directly), root and state directories, cgroup root, CNI
// bridge and subnet, and node name. It shares the host's network namespace
// with the first node, so the two pod subnets route to each other through
// the host and the one kube-proxy serves both. Its kubelet listens on its
// bridge address, which is also its name (a name the API server can dial
// without any host name resolution). It carries a NoSchedule taint so that
// the specs written for one node keep their pods on the first; the specs
// about the second node tolerate it.
const (
	Node2Name     = "198.19.1.1"
	Node2Bridge   = "unilet-k8s1"
	Node2Subnet   = "198.19.1.0/24"
	Node2Taint    = "unilet.dev/e2e-second-node=true:NoSchedule"
	Node2CgroupRt = "/unilet-e2e-node2"
)

func (c *cluster) n2(parts ...string) string { return c.p(append([]string{"node2"}, parts...)...) }

// node2 starts the second node once the first is up.
func (c *cluster) node2() error {
	for _, d := range []string{"containerd", "kubelet", "cni/net.d", "cni/ipam", "pod-logs"} {
		if err := os.MkdirAll(c.n2(d), 0o755); err != nil {
			return err
		}
	}
	if err := makeBridge(Node2Bridge, Node2Name); err != nil {
		return err
	}
	if err := c.nodeContainerd("node2-containerd", c.n2(), "unilet-e2e-node2", Node2Bridge, Node2Subnet, Node2Name); err != nil {
		return err
	}
	sock := c.n2("containerd", "containerd.sock")
	// kubelet checks that its cgroup root exists.
	if err := cgroups.MakeTree(Node2CgroupRt); err != nil {
		return err
	}
	pki := func(f string) string { return c.p("pki", f) }
	kcfg := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: %s
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
cgroupRoot: %s
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://%s
clusterDomain: cluster.local
clusterDNS: [%s]
resolvConf: /etc/resolv.conf
serializeImagePulls: false
imageGCHighThresholdPercent: 100
evictionHard: {"memory.available": "100Mi", "nodefs.available": "1%%", "imagefs.available": "1%%", "nodefs.inodesFree": "1%%"}
maxPods: 50
syncFrequency: 10s
podLogsDir: %s
registerWithTaints:
- {key: unilet.dev/e2e-second-node, value: "true", effect: NoSchedule}
`, Node2Name, c.ports.Kubelet, c.ports.Kubelet2Healthz, pki("kubelet2.crt"), pki("kubelet2.key"), pki("ca.crt"), Node2CgroupRt, sock, DNSServiceIP, c.n2("pod-logs"))
	if err := os.WriteFile(c.n2("kubelet", "config.yaml"), []byte(kcfg), 0o644); err != nil {
		return err
	}
	if err := c.start("node2-kubelet", filepath.Join(c.kubeBin, "kubelet"), "--config", c.n2("kubelet", "config.yaml"),
		"--kubeconfig", c.p("kubelet2.kubeconfig"), "--root-dir", c.n2("kubelet", "root"), "--hostname-override", Node2Name,
		"--node-ip", Node2Name); err != nil {
		return err
	}
	return c.waitNode(Node2Name, "node2-kubelet")
}

// downNode2 stops the second node and removes what it made.
func (c *cluster) downNode2() {
	c.stop("node2-kubelet")
	c.removePodsAt(c.n2("containerd", "containerd.sock"))
	c.stop("node2-containerd")
	testutil.KillProcsUnder("containerd-shim-runc-v2", c.n2("containerd"))
	_ = exec.Command("ip", "link", "del", Node2Bridge).Run()
	cgroups.RemoveTree(Node2CgroupRt)
}
