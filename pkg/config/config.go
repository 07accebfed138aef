// Package config owns the unilet daemon's configuration: the TOML file
// (/etc/unilet/config.toml, or --config FILE), the command-line flags that
// override it, their defaults and validation. It touches no system state, so
// it is tested without root; cmd/unilet wires the result into the daemon.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	toml "github.com/pelletier/go-toml/v2"
	"github.com/sirupsen/logrus"

	"github.com/unilet-dev/unilet/cri"
	"github.com/unilet-dev/unilet/cri/unikernel"
	"github.com/unilet-dev/unilet/image"
	"github.com/unilet-dev/unilet/pkg/vmnet"
	"github.com/unilet-dev/unilet/vmm/manager"
	"github.com/unilet-dev/unilet/vmm/shim"
)

// DefaultPath is where the daemon reads its configuration unless --config
// names another file. A missing default file is not an error; a missing
// named one is.
const DefaultPath = "/etc/unilet/config.toml"

// Version is the schema version this daemon reads.
const Version = 1

// Config is the daemon's whole configuration. Every field has a flag of the
// same meaning (see Bind); the TOML keys are the field tags.
type Config struct {
	Version int    `toml:"version" comment:"Schema version of this file."`
	Root    string `toml:"root" comment:"Persistent state: images, pod and container records, templates (--root)."`
	State   string `toml:"state" comment:"Runtime state: VM sockets, consoles, the shim pool (--state-dir)."`

	GRPC     GRPC     `toml:"grpc" comment:"The CRI socket kubelet and uniletctl talk to."`
	Upstream Upstream `toml:"upstream" comment:"Where pods that are not unikernels go."`
	Pods     Pods     `toml:"pods" comment:"Which pods become VMs, and where their logs may go."`
	Images   Images   `toml:"images" comment:"Unikernel image pulls."`
	VM       VM       `toml:"vm" comment:"QEMU, guest sizes, shims and templates."`
	Jail     Jail     `toml:"jail" comment:"The sandbox every QEMU runs in."`
	Network  Network  `toml:"network" comment:"Pod networking (CNI) and the network every guest sees."`
	Stream   Stream   `toml:"stream" comment:"The CRI streaming server: attach and port-forward."`
	Debug    Debug    `toml:"debug" comment:"Logging and profiling."`
	Metrics  Metrics  `toml:"metrics" comment:"Prometheus metrics."`
}

type GRPC struct {
	Address string `toml:"address" comment:"unix:///PATH of the socket (--listen)."`
}

type Upstream struct {
	Endpoint string `toml:"endpoint" comment:"CRI endpoint of the runtime for other pods, e.g. containerd; empty: none (--upstream-endpoint)."`
}

type Pods struct {
	Annotation      string   `toml:"annotation" comment:"Pod annotation that selects the unikernel runtime (--annotation)."`
	AnnotationValue string   `toml:"annotation_value" comment:"Its value (--annotation-value)."`
	RuntimeHandler  string   `toml:"runtime_handler" comment:"RuntimeClass handler that selects the unikernel runtime (--runtime-handler)."`
	LogRoots        []string `toml:"log_roots" comment:"Directories unikernel pods' log directories must lie in: kubelet's podLogsDir (--pod-log-root)."`
}

type Images struct {
	UnikernelRegistries []string          `toml:"unikernel_registries" comment:"Images under these registry hosts go to the VM store (--unikernel-registry)."`
	InsecureRegistries  []string          `toml:"insecure_registries" comment:"HOST:PORT reachable over plain HTTP (--insecure-registry)."`
	Mirrors             map[string]string `toml:"mirrors" comment:"REGISTRY = MIRROR: images under REGISTRY are fetched from MIRROR (host[:port], or http://host[:port]) and keep their names (--registry-mirror REGISTRY=MIRROR)."`
	MaxKernelMiB        int64             `toml:"max_kernel_mib" comment:"Largest kernel a pull may write, MiB (--image-max-kernel-mib)."`
	MaxInitrdMiB        int64             `toml:"max_initrd_mib" comment:"Largest initrd a pull may write, MiB (--image-max-initrd-mib)."`
	MaxUnpackedMiB      int64             `toml:"max_unpacked_mib" comment:"Most bytes one image's layers may download and unpack to, MiB (--image-max-unpacked-mib)."`
	PullStallTimeout    Duration          `toml:"pull_stall_timeout" comment:"A pull that makes no progress this long fails with DeadlineExceeded (--image-pull-stall-timeout)."`
}

type VM struct {
	QEMU           string   `toml:"qemu" comment:"QEMU binary, a path or a name on PATH (--qemu)."`
	Accel          string   `toml:"accel" comment:"auto (probe KVM, else TCG), kvm or tcg (--accel)."`
	Shim           string   `toml:"shim" comment:"unilet-shim binary; empty: next to unilet, else on PATH (--shim)."`
	ShimPool       int      `toml:"shim_pool" comment:"Idle pre-forked shims kept ready (--shim-pool)."`
	ShimPoolQuiet  Duration `toml:"shim_pool_quiet" comment:"The pool refills once no VM started for this long (--shim-pool-quiet)."`
	CgroupRoot     string   `toml:"cgroup_root" comment:"cgroup parent for VMs of pods that name none; empty disables cgroups (--cgroup-root)."`
	OverheadMiB    int      `toml:"vmm_overhead_mib" comment:"MiB of a container's memory limit kept for QEMU itself (--vmm-overhead)."`
	DefaultMemMiB  int      `toml:"default_memory_mib" comment:"Guest RAM of containers without a memory limit, MiB (--default-memory)."`
	MaxMemMiB      int      `toml:"max_memory_mib" comment:"Most guest RAM a pod may ask for, MiB (--max-memory)."`
	MaxVCPUs       int      `toml:"max_vcpus" comment:"Most vCPUs a pod may ask for (--max-vcpus)."`
	AllowLibParams []string `toml:"allow_lib_params" comment:"Unikraft library parameters pods may set (name or prefix.*) (--allow-lib-param)."`
	TemplateWarm   int      `toml:"template_warm" comment:"Warm clones kept ready per VM template (--template-warm)."`
}

type Jail struct {
	Enabled bool   `toml:"enabled" comment:"Run every QEMU jailed; false runs QEMU as root (--jail)."`
	IDs     string `toml:"ids" comment:"FIRST:COUNT: uids and gids jailed QEMUs run as, one per pod; used by nothing else on the node (--jail-ids)."`
}

type Network struct {
	CNIConfDir   string   `toml:"cni_conf_dir" comment:"CNI network configuration directory; the first file is used (--cni-conf-dir)."`
	CNIBinDirs   []string `toml:"cni_bin_dirs" comment:"Directories of CNI plugins (--cni-bin-dir)."`
	CNICacheDir  string   `toml:"cni_cache_dir" comment:"CNI results cache; empty: ROOT/cni (--cni-cache-dir)."`
	NetNSDir     string   `toml:"netns_dir" comment:"Where pod network namespaces are bound (--netns-dir)."`
	GuestNetwork string   `toml:"guest_network" comment:"The fixed IPv4 network every guest sees (--guest-network)."`
}

type Stream struct {
	Address string `toml:"address" comment:"Address of the streaming server; a non-loopback one needs tls_cert and tls_key (--stream-address)."`
	TLSCert string `toml:"tls_cert" comment:"TLS certificate, PEM (--stream-tls-cert)."`
	TLSKey  string `toml:"tls_key" comment:"TLS key, PEM (--stream-tls-key)."`
}

type Debug struct {
	Level        string `toml:"level" comment:"Log level: debug, info, warn or error (--log-level)."`
	Format       string `toml:"format" comment:"Log format: text or json (--log-format)."`
	PprofAddress string `toml:"pprof_address" comment:"Serve Go's pprof profiles on this loopback HOST:PORT; empty: off (--pprof-address)."`
}

type Metrics struct {
	Address string `toml:"address" comment:"Serve Prometheus /metrics on HOST:PORT; empty: off. A non-loopback address exposes pod names to the network (--metrics-address)."`
}

// Default returns the configuration the daemon runs with when neither a
// file nor a flag says otherwise.
func Default() Config {
	return Config{
		Version:  Version,
		Root:     "/var/lib/unilet",
		State:    "/run/unilet",
		GRPC:     GRPC{Address: "unix:///run/unilet/unilet.sock"},
		Upstream: Upstream{Endpoint: "unix:///run/containerd/containerd.sock"},
		Pods: Pods{Annotation: cri.DefaultAnnotation, AnnotationValue: cri.DefaultAnnotationValue,
			RuntimeHandler: cri.DefaultHandler, LogRoots: []string{"/var/log/pods"}},
		Images: Images{UnikernelRegistries: []string{"unikraft.org"}, InsecureRegistries: []string{}, Mirrors: map[string]string{},
			MaxKernelMiB: image.DefaultLimits.Kernel >> 20, MaxInitrdMiB: image.DefaultLimits.Initrd >> 20,
			MaxUnpackedMiB: image.DefaultLimits.Unpacked >> 20, PullStallTimeout: Duration(image.DefaultLimits.Stall)},
		VM: VM{QEMU: "qemu-system-x86_64", Accel: "auto", ShimPool: 2, ShimPoolQuiet: Duration(shim.RefillQuiet),
			CgroupRoot: "/unilet", OverheadMiB: unikernel.DefaultOverheadMiB, DefaultMemMiB: unikernel.DefaultMemMiB,
			MaxMemMiB: unikernel.DefaultMaxMemMiB, MaxVCPUs: unikernel.DefaultMaxVCPUs, AllowLibParams: []string{}, TemplateWarm: 1},
		Jail: Jail{Enabled: true, IDs: fmt.Sprintf("%d:%d", manager.DefaultJailIDs.First, manager.DefaultJailIDs.Count)},
		Network: Network{CNIConfDir: "/etc/cni/net.d", CNIBinDirs: []string{"/opt/cni/bin"}, NetNSDir: "/var/run/netns",
			GuestNetwork: vmnet.DefaultGuestNetwork},
		Stream: Stream{Address: "127.0.0.1:0"},
		Debug:  Debug{Level: "info", Format: "text"},
	}
}

// Decode reads a TOML document over c: keys it names replace c's values,
// others stay. An unknown key is an error naming it and its line.
func (c *Config) Decode(b []byte) error {
	d := toml.NewDecoder(bytes.NewReader(b)).DisallowUnknownFields()
	// Decoded into a copy, so a refused document changes nothing; maps and
	// lists the document names replace the defaults rather than merge.
	next := c.clone()
	mirrors := next.Images.Mirrors
	next.Images.Mirrors = nil
	if err := d.Decode(&next); err != nil {
		var strict *toml.StrictMissingError
		if errors.As(err, &strict) {
			var keys []string
			for _, e := range strict.Errors {
				row, _ := e.Position()
				keys = append(keys, fmt.Sprintf("%q (line %d)", strings.Join(e.Key(), "."), row))
			}
			return fmt.Errorf("unknown key %s; `unilet config default` lists every key", strings.Join(keys, ", "))
		}
		var de *toml.DecodeError
		if errors.As(err, &de) {
			row, col := de.Position()
			return fmt.Errorf("line %d column %d: %s", row, col, de.Error())
		}
		return err
	}
	if next.Images.Mirrors == nil {
		next.Images.Mirrors = mirrors
	}
	*c = next
	return nil
}

// clone copies c deeply.
func (c *Config) clone() Config {
	n := *c
	for _, l := range []*[]string{&n.Pods.LogRoots, &n.Images.UnikernelRegistries, &n.Images.InsecureRegistries,
		&n.VM.AllowLibParams, &n.Network.CNIBinDirs} {
		*l = append([]string{}, *l...)
	}
	n.Images.Mirrors = make(map[string]string, len(c.Images.Mirrors))
	for k, v := range c.Images.Mirrors {
		n.Images.Mirrors[k] = v
	}
	return n
}

// Load reads the file at path over c. A missing file is an error only when
// required (the operator named it).
func (c *Config) Load(path string, required bool) error {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) && !required {
		return nil
	}
	if err != nil {
		return fmt.Errorf("config: %w", err)
	}
	if err := c.Decode(b); err != nil {
		return fmt.Errorf("config %s: %w", path, err)
	}
	return nil
}

// Encode writes c as a TOML document with a comment over every key; the
// result decodes to c.
func (c Config) Encode() ([]byte, error) {
	var buf bytes.Buffer
	buf.WriteString("# unilet daemon configuration. Every key has a flag of the same name in\n# parentheses; flags override this file.\n\n")
	e := toml.NewEncoder(&buf).SetIndentTables(true)
	if err := e.Encode(c); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// Validate checks every value that can be checked without touching the
// system; the messages name the flag and the file key.
func (c *Config) Validate() error {
	var errs []error
	bad := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }
	if c.Version != Version {
		bad("version %d: this unilet reads version %d", c.Version, Version)
	}
	if !strings.HasPrefix(c.GRPC.Address, "unix://") || len(c.GRPC.Address) == len("unix://") {
		bad("--listen (grpc.address) %q: want unix:///PATH", c.GRPC.Address)
	}
	if c.Root == "" || c.State == "" {
		bad("--root (root) and --state-dir (state) must not be empty")
	}
	if c.Images.MaxKernelMiB <= 0 || c.Images.MaxInitrdMiB <= 0 || c.Images.MaxUnpackedMiB <= 0 || c.Images.PullStallTimeout <= 0 {
		bad("--image-max-kernel-mib, --image-max-initrd-mib, --image-max-unpacked-mib and --image-pull-stall-timeout (images.*) must be positive")
	}
	for reg, mirror := range c.Images.Mirrors {
		if reg == "" || mirror == "" {
			bad("--registry-mirror (images.mirrors) %q = %q: want REGISTRY = MIRROR", reg, mirror)
		}
	}
	if len(c.Images.UnikernelRegistries) == 0 {
		bad("--unikernel-registry (images.unikernel_registries): name at least one registry")
	}
	switch c.VM.Accel {
	case "auto", "kvm", "tcg":
	default:
		bad("--accel (vm.accel) %q: want auto, kvm or tcg", c.VM.Accel)
	}
	if c.VM.QEMU == "" {
		bad("--qemu (vm.qemu) must not be empty")
	}
	if c.VM.TemplateWarm < 0 || c.VM.ShimPool < 0 || c.VM.ShimPoolQuiet < 0 {
		bad("--template-warm, --shim-pool and --shim-pool-quiet (vm.*) must be 0 or more")
	}
	if c.VM.OverheadMiB < 0 || c.VM.DefaultMemMiB <= 0 || c.VM.MaxMemMiB <= 0 || c.VM.MaxVCPUs <= 0 {
		bad("--vmm-overhead must be 0 or more; --default-memory, --max-memory and --max-vcpus (vm.*) must be positive")
	}
	if c.Jail.Enabled {
		if _, err := c.JailIDs(); err != nil {
			bad("--jail-ids (jail.ids): %v", err)
		}
	}
	if len(c.Pods.LogRoots) == 0 {
		bad("--pod-log-root (pods.log_roots): name at least one directory")
	}
	for _, r := range c.Pods.LogRoots {
		if !filepath.IsAbs(r) || filepath.Clean(r) == "/" {
			bad("--pod-log-root (pods.log_roots) %q: want an absolute directory other than /", r)
		}
	}
	if c.Pods.Annotation == "" && c.Pods.RuntimeHandler == "" {
		bad("--annotation and --runtime-handler (pods.*) are both empty: no pod could become a VM")
	}
	if len(c.Network.CNIBinDirs) == 0 {
		bad("--cni-bin-dir (network.cni_bin_dirs): name at least one directory")
	}
	if _, err := vmnet.ParseGuestNetwork(c.Network.GuestNetwork); err != nil {
		bad("--guest-network (network.guest_network): %v", err)
	}
	if err := checkStreamAddress(c.Stream); err != nil {
		errs = append(errs, err)
	}
	if _, err := logrus.ParseLevel(c.Debug.Level); err != nil {
		bad("--log-level (debug.level) %q: want debug, info, warn or error", c.Debug.Level)
	}
	if c.Debug.Format != "text" && c.Debug.Format != "json" {
		bad("--log-format (debug.format) %q: want text or json", c.Debug.Format)
	}
	if a := c.Debug.PprofAddress; a != "" {
		host, _, err := net.SplitHostPort(a)
		if ip := net.ParseIP(host); err != nil || ip == nil || !ip.IsLoopback() {
			bad("--pprof-address (debug.pprof_address) %q: want a loopback HOST:PORT such as 127.0.0.1:6060 (profiles expose the daemon's memory)", a)
		}
	}
	if a := c.Metrics.Address; a != "" {
		if _, _, err := net.SplitHostPort(a); err != nil {
			bad("--metrics-address (metrics.address) %q: want HOST:PORT such as 127.0.0.1:9460", a)
		}
	}
	return errors.Join(errs...)
}

// JailIDs parses jail.ids (FIRST:COUNT).
func (c *Config) JailIDs() (manager.JailIDs, error) {
	first, count, ok := strings.Cut(c.Jail.IDs, ":")
	f, err1 := strconv.ParseUint(first, 10, 32)
	n, err2 := strconv.ParseUint(count, 10, 32)
	if !ok || err1 != nil || err2 != nil {
		return manager.JailIDs{}, fmt.Errorf("%q: want FIRST:COUNT", c.Jail.IDs)
	}
	r := manager.JailIDs{First: uint32(f), Count: uint32(n)}
	return r, r.Validate()
}

// CNICacheDir is network.cni_cache_dir, defaulting to ROOT/cni.
func (c *Config) CNICacheDir() string {
	if c.Network.CNICacheDir != "" {
		return c.Network.CNICacheDir
	}
	return filepath.Join(c.Root, "cni")
}

// SocketPath is the filesystem path of grpc.address.
func (c *Config) SocketPath() string { return strings.TrimPrefix(c.GRPC.Address, "unix://") }

// checkStreamAddress: attach and port-forward reach into pods, so the
// streaming server listens on loopback unless it has TLS.
func checkStreamAddress(s Stream) error {
	if (s.TLSCert == "") != (s.TLSKey == "") {
		return fmt.Errorf("--stream-tls-cert and --stream-tls-key (stream.tls_cert, stream.tls_key) go together")
	}
	host, _, err := net.SplitHostPort(s.Address)
	if err != nil {
		return fmt.Errorf("--stream-address (stream.address) %q: %w", s.Address, err)
	}
	ip := net.ParseIP(host)
	if host == "localhost" || (ip != nil && ip.IsLoopback()) || s.TLSCert != "" {
		return nil
	}
	return fmt.Errorf("--stream-address (stream.address) %q is not a loopback address: attach and port-forward would be served without TLS to the network; give --stream-tls-cert and --stream-tls-key, or keep the default 127.0.0.1:0", s.Address)
}

// Duration is a time.Duration written as "30s" in TOML and on flags.
type Duration time.Duration

func (d Duration) String() string { return time.Duration(d).String() }

func (d Duration) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("%q: want a duration such as 30s or 2m", b)
	}
	*d = Duration(v)
	return nil
}
