package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	"github.com/unilet-dev/unilet/internal/testutil"
)

// RegistryName is the registry the cluster's images are named under
// (examples and tests as written). Nothing listens there: the cluster's
// unilet fetches it from the registry's real, free port (--registry-mirror).
const RegistryName = "127.0.0.1:5000"

// Ports are a cluster's loopback ports: free ones, taken at `up` and kept
// in <dir>/ports.json (PortsFile) for the tests and `cluster port NAME`.
type Ports struct {
	Registry        int `json:"registry"`
	APIServer       int `json:"apiserver"`
	Etcd            int `json:"etcd"`
	EtcdPeer        int `json:"etcdPeer"`
	EtcdMetrics     int `json:"etcdMetrics"`
	Kubelet         int `json:"kubelet"` // both nodes': they listen on different addresses
	KubeletHealthz  int `json:"kubeletHealthz"`
	Kubelet2Healthz int `json:"kubelet2Healthz"`
	ProxyHealthz    int `json:"proxyHealthz"`
	ProxyMetrics    int `json:"proxyMetrics"`
}

// PortsFile holds a cluster's Ports.
const PortsFile = "ports.json"

// freePorts takes a distinct free loopback port for each field.
func freePorts() (Ports, error) {
	var p Ports
	seen := map[int]bool{}
	for _, f := range []*int{&p.Registry, &p.APIServer, &p.Etcd, &p.EtcdPeer, &p.EtcdMetrics, &p.Kubelet, &p.KubeletHealthz,
		&p.Kubelet2Healthz, &p.ProxyHealthz, &p.ProxyMetrics} {
		for {
			n, err := testutil.FreePort()
			if err != nil {
				return p, err
			}
			if !seen[n] {
				seen[n], *f = true, n
				break
			}
		}
	}
	return p, nil
}

func (c *cluster) savePorts() error {
	b, err := json.MarshalIndent(c.ports, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(c.p(PortsFile), b, 0o644)
}

func loadPorts(dir string) (Ports, error) {
	var p Ports
	b, err := os.ReadFile(filepath.Join(dir, PortsFile))
	if err != nil {
		return p, fmt.Errorf("no cluster ports (is the cluster up?): %w", err)
	}
	return p, json.Unmarshal(b, &p)
}

// registryAddr is where the registry really listens.
func (c *cluster) registryAddr() string { return fmt.Sprintf("127.0.0.1:%d", c.ports.Registry) }

// port prints one of dir's ports by its JSON name (`cluster port registry`).
func port(dir, name string) error {
	p, err := loadPorts(dir)
	if err != nil {
		return err
	}
	var m map[string]int
	b, _ := json.Marshal(p)
	_ = json.Unmarshal(b, &m)
	n, ok := m[name]
	if !ok {
		return fmt.Errorf("no port %q (have registry, apiserver, etcd, kubelet, ...)", name)
	}
	fmt.Println(n)
	return nil
}
