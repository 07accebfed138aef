package main

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
)

// cert is one certificate signed by the cluster CA.
type cert struct {
	name, cn, org string
	ips, dns      []string
	server        bool
}

func (c *cluster) openssl(args ...string) error {
	cmd := exec.Command("openssl", args...)
	cmd.Dir = c.p("pki")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("openssl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return nil
}

// pki makes the cluster CA, serving and client certificates and the
// service-account key pair with openssl.
func (c *cluster) pki() error {
	if err := c.openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
		"-days", "365", "-subj", "/CN=unilet-e2e-ca"); err != nil {
		return err
	}
	if err := c.openssl("genrsa", "-out", "sa.key", "2048"); err != nil {
		return err
	}
	if err := c.openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"); err != nil {
		return err
	}
	for _, ct := range []cert{
		{name: "apiserver", cn: "kube-apiserver", server: true, ips: []string{"127.0.0.1", "198.19.255.1"},
			dns: []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"}},
		{name: "kubelet", cn: NodeName, server: true, ips: []string{"127.0.0.1"}, dns: []string{NodeName, "localhost"}},
		{name: "apiserver-kubelet", cn: "kube-apiserver-kubelet-client", org: "system:masters"},
		{name: "admin", cn: "unilet-e2e-admin", org: "system:masters"},
		{name: "kubelet-client", cn: "system:node:" + NodeName, org: "system:nodes"},
		{name: "kubelet2", cn: Node2Name, server: true, ips: []string{Node2Name}},
		{name: "kubelet2-client", cn: "system:node:" + Node2Name, org: "system:nodes"},
		{name: "controller-manager", cn: "system:kube-controller-manager"},
		{name: "scheduler", cn: "system:kube-scheduler"},
		{name: "kube-proxy", cn: "system:kube-proxy"}, // bound to system:node-proxier by default
		{name: "coredns", cn: "system:coredns"},
	} {
		subj := "/CN=" + ct.cn
		if ct.org != "" {
			subj = "/O=" + ct.org + subj
		}
		if err := c.openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", ct.name+".key", "-out", ct.name+".csr", "-subj", subj); err != nil {
			return err
		}
		ext := "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
		if ct.server {
			var san []string
			for _, ip := range ct.ips {
				san = append(san, "IP:"+ip)
			}
			for _, d := range ct.dns {
				san = append(san, "DNS:"+d)
			}
			ext += "extendedKeyUsage=serverAuth\nsubjectAltName=" + strings.Join(san, ",") + "\n"
		} else {
			ext += "extendedKeyUsage=clientAuth\n"
		}
		if err := os.WriteFile(c.p("pki", ct.name+".ext"), []byte(ext), 0o644); err != nil {
			return err
		}
		if err := c.openssl("x509", "-req", "-in", ct.name+".csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
			"-out", ct.name+".crt", "-days", "365", "-extfile", ct.name+".ext"); err != nil {
			return err
		}
	}
	return nil
}

// kubeconfigs writes the admin, kubelet, controller-manager, scheduler, kube-proxy and CoreDNS kubeconfigs.
func (c *cluster) kubeconfigs() error {
	for file, user := range map[string]string{"kubeconfig": "admin", "kubelet.kubeconfig": "kubelet-client", "kubelet2.kubeconfig": "kubelet2-client",
		"controller-manager.kubeconfig": "controller-manager", "scheduler.kubeconfig": "scheduler",
		"kube-proxy.kubeconfig": "kube-proxy", "coredns.kubeconfig": "coredns"} {
		kc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: unilet-e2e
  cluster: {server: "https://127.0.0.1:%d", certificate-authority: %q}
users:
- name: %s
  user: {client-certificate: %q, client-key: %q}
contexts:
- name: unilet-e2e
  context: {cluster: unilet-e2e, user: %s}
current-context: unilet-e2e
`, c.ports.APIServer, c.p("pki", "ca.crt"), user, c.p("pki", user+".crt"), c.p("pki", user+".key"), user)
		if err := os.WriteFile(c.p(file), []byte(kc), 0o600); err != nil {
			return err
		}
	}
	return nil
}
