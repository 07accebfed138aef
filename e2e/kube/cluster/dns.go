package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"time"
)

// Cluster networking beside the pods' bridge: kube-proxy (nftables mode:
// one table of its own, removed at down) makes Services work on the node,
// and CoreDNS — a host process serving the cluster domain from the API —
// answers at the kube-dns Service.
const (
	BridgeIP     = "198.19.0.1"    // the pods' gateway, on the node
	DNSServiceIP = "198.19.255.10" // kube-system/kube-dns
	ClusterDNS   = "cluster.local"
)

// bridge makes the pods' bridge with its gateway address before any pod
// (the CNI bridge plugin takes it as it finds it), so CoreDNS can listen
// there from the start.
func (c *cluster) bridge() error {
	// Service addresses kube-proxy has not translated (yet) stay on the
	// bridge, never the node's default route.
	return makeBridge(Bridge, BridgeIP, []string{"route", "add", ServiceSubnet, "dev", Bridge})
}

// makeBridge creates a node's CNI bridge with its gateway address gw/24,
// then runs the extra ip commands.
func makeBridge(name, gw string, extra ...[]string) error {
	for _, args := range append([][]string{
		{"link", "add", name, "type", "bridge"},
		{"addr", "add", gw + "/24", "dev", name},
		{"link", "set", name, "up"},
	}, extra...) {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			return fmt.Errorf("ip %v: %v: %s", args, err, out)
		}
	}
	return nil
}

// kubeProxy starts kube-proxy once kubelet registered the node: a
// kube-proxy that started first exits when the node's addresses appear
// (it expects a supervisor to restart it).
func (c *cluster) kubeProxy() error {
	cfg := fmt.Sprintf(`apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: %q}
hostnameOverride: %s
mode: nftables
clusterCIDR: %s
bindAddress: 127.0.0.1
healthzBindAddress: 127.0.0.1:%d
metricsBindAddress: 127.0.0.1:%d
nodePortAddresses: [%q]
nftables: {masqueradeAll: true}
conntrack: {maxPerCore: 0, min: 0}
`, c.p("kube-proxy.kubeconfig"), NodeName, PodSubnet, c.ports.ProxyHealthz, c.ports.ProxyMetrics, BridgeIP+"/32")
	if err := os.WriteFile(c.p("kube-proxy.yaml"), []byte(cfg), 0o644); err != nil {
		return err
	}
	return c.start("kube-proxy", filepath.Join(c.kubeBin, "kube-proxy"), "--config", c.p("kube-proxy.yaml"))
}

// dnsObjects: CoreDNS's read access, and the kube-dns Service whose one
// endpoint is CoreDNS on the node's bridge address.
const dnsObjects = `apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:coredns"}
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: "system:coredns"}]
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  clusterIP: ` + DNSServiceIP + `
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-node
  namespace: kube-system
  labels: {kubernetes.io/service-name: kube-dns, endpointslice.kubernetes.io/managed-by: unilet-e2e-cluster}
addressType: IPv4
endpoints: [{addresses: ["` + BridgeIP + `"], conditions: {ready: true}}]
ports:
- {name: dns, port: 53, protocol: UDP}
- {name: dns-tcp, port: 53, protocol: TCP}
`

// coreDNS starts CoreDNS and the kube-dns Service; waitDNS (after
// kube-proxy runs) checks the two through the Service's address.
func (c *cluster) coreDNS() error {
	if err := os.WriteFile(c.p("dns.yaml"), []byte(dnsObjects), 0o644); err != nil {
		return err
	}
	if out, err := c.kubectl("apply", "-f", c.p("dns.yaml")); err != nil {
		return fmt.Errorf("apply the DNS objects: %v: %s", err, out)
	}
	corefile := fmt.Sprintf(`%[1]s:53 in-addr.arpa:53 {
    bind %[2]s
    errors
    kubernetes %[1]s in-addr.arpa {
        kubeconfig %[3]s unilet-e2e
        pods insecure
    }
    cache 5
    loadbalance
}
`, ClusterDNS, BridgeIP, c.p("coredns.kubeconfig"))
	if err := os.WriteFile(c.p("Corefile"), []byte(corefile), 0o644); err != nil {
		return err
	}
	return c.start("coredns", filepath.Join(c.kubeBin, "coredns"), "-conf", c.p("Corefile"))
}

func (c *cluster) waitDNS() error {
	// Ready once the API's own Service resolves through kube-proxy's rules
	// at the kube-dns Service address.
	r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		return (&net.Dialer{Timeout: time.Second}).DialContext(ctx, network, net.JoinHostPort(DNSServiceIP, "53"))
	}}
	if err := waitFor("cluster DNS", 60*time.Second, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		ips, err := r.LookupHost(ctx, "kubernetes.default.svc."+ClusterDNS)
		if err == nil && (len(ips) != 1 || ips[0] != "198.19.255.1") {
			err = fmt.Errorf("kubernetes.default resolved to %v", ips)
		}
		return err
	}); err != nil {
		return c.fail(c.fail(err, "coredns"), "kube-proxy")
	}
	return nil
}

// proxyCleanup removes kube-proxy's nftables tables (kube-proxy --cleanup).
func (c *cluster) proxyCleanup() {
	if _, err := os.Stat(filepath.Join(c.kubeBin, "kube-proxy")); err != nil {
		return
	}
	_ = exec.Command(filepath.Join(c.kubeBin, "kube-proxy"), "--cleanup", "--proxy-mode", "nftables").Run()
}
