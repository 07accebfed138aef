package config

import (
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/unilet-dev/unilet/cri/unikernel"
	"github.com/unilet-dev/unilet/image"
)

// Bind registers the daemon's flags on fs, each writing into c. Bind after
// the file is loaded: a flag's default is then the file's value, so only
// flags given on the command line override it. A repeatable flag given at
// all replaces the file's list.
func Bind(fs *pflag.FlagSet, c *Config) {
	fs.StringVar(&c.GRPC.Address, "listen", c.GRPC.Address, "CRI socket to serve (unix:///PATH)")
	fs.StringVar(&c.Root, "root", c.Root, "persistent state (images, metadata)")
	fs.StringVar(&c.State, "state-dir", c.State, "runtime state (VM sockets)")
	fs.StringVar(&c.Upstream.Endpoint, "upstream-endpoint", c.Upstream.Endpoint, "CRI endpoint for non-unikernel pods (empty: none)")
	fs.StringArrayVar(&c.Images.InsecureRegistries, "insecure-registry", c.Images.InsecureRegistries, "HOST:PORT reachable over plain HTTP (repeatable)")
	fs.Var(&mirrorsValue{m: &c.Images.Mirrors}, "registry-mirror", "REGISTRY=MIRROR: unikernel images under REGISTRY are fetched from MIRROR (host[:port], or http://host[:port] for plain HTTP) and keep their names (repeatable)")
	fs.Int64Var(&c.Images.MaxKernelMiB, "image-max-kernel-mib", c.Images.MaxKernelMiB, "largest unikernel kernel a pull may write (MiB); a bigger one fails with ResourceExhausted")
	fs.Int64Var(&c.Images.MaxInitrdMiB, "image-max-initrd-mib", c.Images.MaxInitrdMiB, "largest initrd a pull may write (MiB)")
	fs.Int64Var(&c.Images.MaxUnpackedMiB, "image-max-unpacked-mib", c.Images.MaxUnpackedMiB, "most bytes one image's layers may download and unpack to, all entries counted (MiB; bounds gzip bombs)")
	fs.DurationVar((*time.Duration)(&c.Images.PullStallTimeout), "image-pull-stall-timeout", time.Duration(c.Images.PullStallTimeout), fmt.Sprintf("a pull that receives less than %d bytes in this long fails with DeadlineExceeded", image.StallBytes))
	fs.StringArrayVar(&c.Images.UnikernelRegistries, "unikernel-registry", c.Images.UnikernelRegistries, "images under this registry host go to the VM store (repeatable)")
	fs.StringVar(&c.VM.Accel, "accel", c.VM.Accel, "accelerator: auto (probe KVM, else TCG), kvm or tcg")
	fs.StringVar(&c.VM.QEMU, "qemu", c.VM.QEMU, "QEMU binary")
	fs.StringVar(&c.VM.Shim, "shim", c.VM.Shim, "unilet-shim binary (default: next to unilet, else on PATH)")
	fs.StringVar(&c.Stream.Address, "stream-address", c.Stream.Address, "address of the CRI streaming server (attach, port-forward); a non-loopback one needs --stream-tls-cert and --stream-tls-key")
	fs.StringVar(&c.Stream.TLSCert, "stream-tls-cert", c.Stream.TLSCert, "TLS certificate (PEM) of the streaming server")
	fs.StringVar(&c.Stream.TLSKey, "stream-tls-key", c.Stream.TLSKey, "TLS key (PEM) of the streaming server")
	fs.StringVar(&c.Debug.Level, "log-level", c.Debug.Level, "log level (debug, info, warn, error)")
	fs.StringVar(&c.Debug.Format, "log-format", c.Debug.Format, "log format (text, json)")
	fs.StringVar(&c.Pods.Annotation, "annotation", c.Pods.Annotation, "pod annotation that selects the unikernel runtime")
	fs.StringVar(&c.Pods.AnnotationValue, "annotation-value", c.Pods.AnnotationValue, "value of that annotation")
	fs.StringVar(&c.Pods.RuntimeHandler, "runtime-handler", c.Pods.RuntimeHandler, "RuntimeClass handler that selects the unikernel runtime")
	fs.StringVar(&c.Network.CNIConfDir, "cni-conf-dir", c.Network.CNIConfDir, "CNI network configuration directory (the first file is used)")
	fs.StringArrayVar(&c.Network.CNIBinDirs, "cni-bin-dir", c.Network.CNIBinDirs, "directory of CNI plugins (repeatable)")
	fs.StringVar(&c.Network.CNICacheDir, "cni-cache-dir", c.Network.CNICacheDir, "CNI results cache (default <root>/cni)")
	fs.StringVar(&c.Network.NetNSDir, "netns-dir", c.Network.NetNSDir, "where pod network namespaces are bound")
	fs.StringVar(&c.Network.GuestNetwork, "guest-network", c.Network.GuestNetwork, "the fixed IPv4 network (/8../30) every guest sees: its gateway is the first address, the guest the second; each pod's namespace translates it to the pod IP")
	fs.StringArrayVar(&c.Pods.LogRoots, "pod-log-root", c.Pods.LogRoots, "directory unikernel pods' log directories must lie in: kubelet's podLogsDir (repeatable)")
	fs.StringVar(&c.VM.CgroupRoot, "cgroup-root", c.VM.CgroupRoot, "cgroup parent for VMs of pods that name none (\"\" disables cgroups)")
	fs.IntVar(&c.VM.OverheadMiB, "vmm-overhead", c.VM.OverheadMiB, "MiB of a container's memory limit kept for QEMU itself; guest RAM = limit - overhead")
	fs.IntVar(&c.VM.DefaultMemMiB, "default-memory", c.VM.DefaultMemMiB, "guest RAM (MiB) of containers without a memory limit")
	fs.IntVar(&c.VM.MaxMemMiB, "max-memory", c.VM.MaxMemMiB, "most guest RAM (MiB) a pod may ask for")
	fs.IntVar(&c.VM.MaxVCPUs, "max-vcpus", c.VM.MaxVCPUs, "most vCPUs a pod may ask for")
	fs.StringArrayVar(&c.VM.AllowLibParams, "allow-lib-param", c.VM.AllowLibParams, "Unikraft library parameter pods may set with "+unikernel.AnnotationLibParams+" (name or prefix.*; repeatable)")
	fs.IntVar(&c.VM.TemplateWarm, "template-warm", c.VM.TemplateWarm, "warm clones kept ready per VM template: restored and paused, so a templated pod's start only moves one into the pod and runs it (0: none; each costs a paused QEMU, about 20 MB)")
	fs.IntVar(&c.VM.ShimPool, "shim-pool", c.VM.ShimPool, "idle pre-forked unilet-shims kept ready, so a VM start does not wait for one to exec (0: none)")
	fs.DurationVar((*time.Duration)(&c.VM.ShimPoolQuiet), "shim-pool-quiet", time.Duration(c.VM.ShimPoolQuiet), "the shim pool refills once no VM started for this long, off the path of the VM just started (0: at once; an empty pool refills at once)")
	fs.BoolVar(&c.Jail.Enabled, "jail", c.Jail.Enabled, "run every QEMU jailed: its own unprivileged uid, no capabilities, NoNewPrivs, a root of its own, QEMU's seccomp sandbox (false: QEMU runs as root, logged as a warning)")
	fs.StringVar(&c.Jail.IDs, "jail-ids", c.Jail.IDs, "FIRST:COUNT: uids (and gids) jailed QEMUs run as, one per pod; used by nothing else on the node")
	fs.StringVar(&c.Debug.PprofAddress, "pprof-address", c.Debug.PprofAddress, "serve Go's net/http/pprof profiles on this loopback HOST:PORT (empty: off)")
	fs.StringVar(&c.Metrics.Address, "metrics-address", c.Metrics.Address, "serve Prometheus metrics at /metrics on this HOST:PORT (empty: off)")
}

// mirrorsValue is --registry-mirror REGISTRY=MIRROR (repeatable): the first
// use replaces the file's mirrors, later ones add.
type mirrorsValue struct {
	m   *map[string]string
	set bool
}

func (v *mirrorsValue) String() string {
	if v.m == nil {
		return ""
	}
	var s []string
	for k, val := range *v.m {
		s = append(s, k+"="+val)
	}
	sort.Strings(s)
	return strings.Join(s, ",")
}

func (v *mirrorsValue) Set(s string) error {
	reg, mirror, ok := strings.Cut(s, "=")
	if !ok || reg == "" || mirror == "" {
		return fmt.Errorf("%q: want REGISTRY=MIRROR", s)
	}
	if !v.set {
		*v.m = map[string]string{}
		v.set = true
	}
	(*v.m)[reg] = mirror
	return nil
}

func (v *mirrorsValue) Type() string { return "REGISTRY=MIRROR" }
