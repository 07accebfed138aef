// Package cni runs CNI for unikernel pods with libcni: it loads the first
// network configuration of a directory (as kubelet's runtimes do), attaches a
// pod's network namespace (ADD), detaches it (DEL, idempotent) and reports
// readiness. The results it returns are what a VM NIC needs.
package cni

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sort"
	"strings"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
	types100 "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/unilet-dev/unilet/pkg/netns"
)

// IfName is the interface CNI creates in the pod namespace.
const IfName = "eth0"

// Config locates CNI configuration and plugins.
type Config struct {
	ConfDir  string
	BinDirs  []string
	CacheDir string // results cache (kept across restarts for DEL)
}

// PodInfo identifies a pod to the plugins (CNI_ARGS) and carries port mappings.
type PodInfo struct {
	ID, Name, Namespace, UID string
	PortMappings             []PortMapping
}

// PortMapping is a hostPort mapping for the portmap plugin.
type PortMapping struct {
	HostPort      int32  `json:"hostPort"`
	ContainerPort int32  `json:"containerPort"`
	Protocol      string `json:"protocol"`
	HostIP        string `json:"hostIP,omitempty"`
}

// Result is what the VM needs from an ADD.
type Result struct {
	Network string   `json:"network"`
	IPs     []string `json:"ips"` // CIDR notation, first is the primary
	Gateway string   `json:"gateway,omitempty"`
	DNS     []string `json:"dns,omitempty"`
	Search  []string `json:"search,omitempty"`
}

// Manager runs CNI.
type Manager struct {
	cfg Config
	cni *libcni.CNIConfig
}

// New returns a Manager; configuration is read at each call, so networks
// installed after start (e.g. by a CNI DaemonSet) are picked up.
func New(cfg Config) *Manager {
	// An explicit exec: with nil, libcni creates one lazily on every call
	// without synchronisation, a data race between concurrent pod starts.
	exec := &invoke.DefaultExec{RawExec: &invoke.RawExec{Stderr: os.Stderr}, PluginDecoder: version.PluginDecoder{}}
	return &Manager{cfg: cfg, cni: libcni.NewCNIConfigWithCacheDir(cfg.BinDirs, cfg.CacheDir, exec)}
}

// ErrNoConfig means the configuration directory holds no network.
var ErrNoConfig = errors.New("no CNI network configuration")

// Load returns the network list unilet uses: the first configuration file of
// ConfDir in lexical order.
func (m *Manager) Load() (*libcni.NetworkConfigList, error) {
	files, err := libcni.ConfFiles(m.cfg.ConfDir, []string{".conf", ".conflist", ".json"})
	if err != nil {
		return nil, fmt.Errorf("%w in %s: %v", ErrNoConfig, m.cfg.ConfDir, err)
	}
	sort.Strings(files)
	var errs []string
	for _, f := range files {
		var list *libcni.NetworkConfigList
		if strings.HasSuffix(f, ".conflist") {
			list, err = libcni.ConfListFromFile(f)
		} else {
			var c *libcni.PluginConfig
			if c, err = libcni.ConfFromFile(f); err == nil {
				list, err = libcni.ConfListFromConf(c)
			}
		}
		if err != nil {
			errs = append(errs, fmt.Sprintf("%s: %v", f, err))
			continue
		}
		if len(list.Plugins) == 0 {
			errs = append(errs, f+": no plugins")
			continue
		}
		return list, nil
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("%w in %s (%s)", ErrNoConfig, m.cfg.ConfDir, strings.Join(errs, "; "))
	}
	return nil, fmt.Errorf("%w in %s", ErrNoConfig, m.cfg.ConfDir)
}

// Status is nil when a usable network configuration exists.
func (m *Manager) Status() error {
	_, err := m.Load()
	return err
}

func (m *Manager) runtimeConf(p PodInfo, netnsPath string) *libcni.RuntimeConf {
	rt := &libcni.RuntimeConf{
		ContainerID: p.ID, NetNS: netnsPath, IfName: IfName,
		Args: [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", p.Namespace}, {"K8S_POD_NAME", p.Name},
			{"K8S_POD_INFRA_CONTAINER_ID", p.ID}, {"K8S_POD_UID", p.UID}},
	}
	if len(p.PortMappings) > 0 {
		rt.CapabilityArgs = map[string]any{"portMappings": p.PortMappings}
	}
	return rt
}

// Setup attaches the namespace at netnsPath (CNI ADD).
func (m *Manager) Setup(ctx context.Context, p PodInfo, netnsPath string) (*Result, error) {
	list, err := m.Load()
	if err != nil {
		return nil, err
	}
	res, err := m.cni.AddNetworkList(ctx, list, m.runtimeConf(p, netnsPath))
	if err != nil {
		return nil, fmt.Errorf("CNI network %q ADD: %w", list.Name, err)
	}
	return convert(list.Name, res)
}

// Teardown detaches the pod (CNI DEL). A namespace that is already gone is
// passed as empty, as the CNI spec allows; DEL of a pod never set up succeeds.
func (m *Manager) Teardown(ctx context.Context, p PodInfo, netnsPath string) error {
	list, err := m.Load()
	if err != nil {
		return err
	}
	// A namespace that is gone — or a bind file whose mount never happened
	// (a daemon killed while creating it) — is passed as empty, as the spec
	// allows for DEL: plugins then release what they can (IPAM).
	if netnsPath != "" && !netns.Exists(netnsPath) {
		netnsPath = ""
	}
	if err := m.cni.DelNetworkList(ctx, list, m.runtimeConf(p, netnsPath)); err != nil {
		return fmt.Errorf("CNI network %q DEL: %w", list.Name, err)
	}
	return nil
}

func convert(network string, r types.Result) (*Result, error) {
	res, err := types100.NewResultFromResult(r)
	if err != nil {
		return nil, fmt.Errorf("CNI result: %w", err)
	}
	out := &Result{Network: network, DNS: res.DNS.Nameservers, Search: res.DNS.Search}
	for _, ip := range res.IPs {
		if ip.Interface != nil && *ip.Interface >= 0 && *ip.Interface < len(res.Interfaces) && res.Interfaces[*ip.Interface].Sandbox == "" {
			continue // a host-side address
		}
		out.IPs = append(out.IPs, ip.Address.String())
		if out.Gateway == "" && ip.Gateway != nil && ip.Address.IP.To4() != nil {
			out.Gateway = ip.Gateway.String()
		}
	}
	if out.Gateway == "" {
		for _, rt := range res.Routes {
			if rt.GW != nil && rt.GW.To4() != nil && (rt.Dst.IP.Equal(net.IPv4zero) && isZero(rt.Dst.Mask)) {
				out.Gateway = rt.GW.String()
			}
		}
	}
	if len(out.IPs) == 0 {
		return nil, fmt.Errorf("CNI network %q returned no IP address for the pod", network)
	}
	return out, nil
}

func isZero(m net.IPMask) bool {
	ones, _ := m.Size()
	return ones == 0
}
