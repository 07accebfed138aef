// Command unilet is the CRI daemon: kubelet (or crictl) talks CRI v1 to it on
// a unix socket; unikernel pods run as QEMU microVMs, other pods pass through
// to the upstream runtime.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
	"k8s.io/cri-streaming/pkg/streaming"

	"github.com/unilet-dev/unilet/api/admin"
	"github.com/unilet-dev/unilet/cri"
	"github.com/unilet-dev/unilet/cri/vm"
	"github.com/unilet-dev/unilet/image"
	"github.com/unilet-dev/unilet/pkg/cni"
	"github.com/unilet-dev/unilet/pkg/metadata"
	"github.com/unilet-dev/unilet/pkg/streamtoken"
	"github.com/unilet-dev/unilet/pkg/version"
	"github.com/unilet-dev/unilet/pkg/vmnet"
	vmruntime "github.com/unilet-dev/unilet/runtime"
	"github.com/unilet-dev/unilet/runtime/manager"
	"github.com/unilet-dev/unilet/runtime/shim"
	"github.com/unilet-dev/unilet/runtime/templates"
)

type multi []string

func (m *multi) String() string     { return strings.Join(*m, ",") }
func (m *multi) Set(v string) error { *m = append(*m, v); return nil }

func main() {
	if err := run(); err != nil {
		logrus.Error(err)
		os.Exit(1)
	}
}

// servePprof serves the Go profiles (for `go tool pprof`) on addr, which
// must be a loopback address: profiles expose the daemon's memory.
func servePprof(addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if ip := net.ParseIP(host); err != nil || ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("--pprof-address %q: want a loopback HOST:PORT such as 127.0.0.1:6060", addr)
	}
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("--pprof-address: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	logrus.WithField("address", lis.Addr().String()).Info("serving pprof")
	go func() { _ = http.Serve(lis, mux) }()
	return nil
}

func run() error {
	var (
		listen, root, stateDir, upstream, accel, qemu, logLevel string
		streamAddr, shimBin, pprofAddr                          string
		streamCert, streamKey                                   string
		annotation, annotationValue, handler                    string
		insecureRegs, registries, mirrors                       multi
		imgLimitMiB                                             struct{ kernel, initrd, unpacked int64 }
		pullStall                                               time.Duration
		showVersion                                             bool
		cniConf, cniCache, netnsDir, cgroupRoot                 string
		guestNetwork                                            string
		cniBins, allowParams, logRoots                          multi
		limits                                                  vm.Limits
		shimPool, templateWarm                                  int
		shimPoolQuiet                                           time.Duration
		jailOn                                                  bool
		jailIDs                                                 string
	)
	flag.StringVar(&listen, "listen", "unix:///run/unilet/unilet.sock", "CRI socket to serve")
	flag.StringVar(&root, "root", "/var/lib/unilet", "persistent state (images, metadata)")
	flag.StringVar(&stateDir, "state-dir", "/run/unilet", "runtime state (VM sockets)")
	flag.StringVar(&upstream, "upstream-endpoint", "unix:///run/containerd/containerd.sock", "CRI endpoint for non-unikernel pods (empty: none)")
	flag.Var(&insecureRegs, "insecure-registry", "HOST:PORT reachable over plain HTTP (repeatable)")
	flag.Var(&mirrors, "registry-mirror", "REGISTRY=MIRROR: unikernel images under REGISTRY are fetched from MIRROR (host[:port], or http://host[:port] for plain HTTP) and keep their names (repeatable)")
	flag.Int64Var(&imgLimitMiB.kernel, "image-max-kernel-mib", image.DefaultLimits.Kernel>>20, "largest unikernel kernel a pull may write (MiB); a bigger one fails with ResourceExhausted")
	flag.Int64Var(&imgLimitMiB.initrd, "image-max-initrd-mib", image.DefaultLimits.Initrd>>20, "largest initrd a pull may write (MiB)")
	flag.Int64Var(&imgLimitMiB.unpacked, "image-max-unpacked-mib", image.DefaultLimits.Unpacked>>20, "most bytes one image's layers may download and unpack to, all entries counted (MiB; bounds gzip bombs)")
	flag.DurationVar(&pullStall, "image-pull-stall-timeout", image.DefaultLimits.Stall, fmt.Sprintf("a pull that receives less than %d bytes in this long fails with DeadlineExceeded", image.StallBytes))
	flag.Var(&registries, "unikernel-registry", "images under this registry host go to the VM store (repeatable; default unikraft.org)")
	flag.StringVar(&accel, "accel", "auto", "accelerator: auto (probe KVM, else TCG), kvm or tcg")
	flag.StringVar(&qemu, "qemu", "qemu-system-x86_64", "QEMU binary")
	flag.StringVar(&shimBin, "shim", "", "unilet-shim binary (default: next to unilet, else on PATH)")
	flag.StringVar(&streamAddr, "stream-address", "127.0.0.1:0", "address of the CRI streaming server (attach, port-forward); a non-loopback one needs --stream-tls-cert and --stream-tls-key")
	flag.StringVar(&streamCert, "stream-tls-cert", "", "TLS certificate (PEM) of the streaming server")
	flag.StringVar(&streamKey, "stream-tls-key", "", "TLS key (PEM) of the streaming server")
	flag.StringVar(&logLevel, "log-level", "info", "log level (debug, info, warn, error)")
	flag.StringVar(&annotation, "annotation", cri.DefaultAnnotation, "pod annotation that selects the unikernel runtime")
	flag.StringVar(&annotationValue, "annotation-value", cri.DefaultAnnotationValue, "value of that annotation")
	flag.StringVar(&handler, "runtime-handler", cri.DefaultHandler, "RuntimeClass handler that selects the unikernel runtime")
	flag.StringVar(&cniConf, "cni-conf-dir", "/etc/cni/net.d", "CNI network configuration directory (the first file is used)")
	flag.Var(&cniBins, "cni-bin-dir", "directory of CNI plugins (repeatable; default /opt/cni/bin)")
	flag.StringVar(&cniCache, "cni-cache-dir", "", "CNI results cache (default <root>/cni)")
	flag.StringVar(&netnsDir, "netns-dir", "/var/run/netns", "where pod network namespaces are bound")
	flag.StringVar(&guestNetwork, "guest-network", vmnet.DefaultGuestNetwork, "the fixed IPv4 network (/8../30) every guest sees: its gateway is the first address, the guest the second; each pod's namespace translates it to the pod IP")
	flag.Var(&logRoots, "pod-log-root", "directory unikernel pods' log directories must lie in: kubelet's podLogsDir (repeatable; default /var/log/pods)")
	flag.StringVar(&cgroupRoot, "cgroup-root", "/unilet", "cgroup parent for VMs of pods that name none (\"\" disables cgroups)")
	flag.IntVar(&limits.OverheadMiB, "vmm-overhead", vm.DefaultOverheadMiB, "MiB of a container's memory limit kept for QEMU itself; guest RAM = limit - overhead")
	flag.IntVar(&limits.DefaultMemMiB, "default-memory", vm.DefaultMemMiB, "guest RAM (MiB) of containers without a memory limit")
	flag.IntVar(&limits.MaxMemMiB, "max-memory", vm.DefaultMaxMemMiB, "most guest RAM (MiB) a pod may ask for")
	flag.IntVar(&limits.MaxVCPUs, "max-vcpus", vm.DefaultMaxVCPUs, "most vCPUs a pod may ask for")
	flag.Var(&allowParams, "allow-lib-param", "Unikraft library parameter pods may set with "+vm.AnnotationLibParams+" (name or prefix.*; repeatable)")
	flag.IntVar(&templateWarm, "template-warm", 1, "warm clones kept ready per VM template: restored and paused, so a templated pod's start only moves one into the pod and runs it (0: none; each costs a paused QEMU, about 20 MB)")
	flag.IntVar(&shimPool, "shim-pool", 2, "idle pre-forked unilet-shims kept ready, so a VM start does not wait for one to exec (0: none)")
	flag.DurationVar(&shimPoolQuiet, "shim-pool-quiet", shim.RefillQuiet, "the shim pool refills once no VM started for this long, off the path of the VM just started (0: at once; an empty pool refills at once)")
	flag.BoolVar(&jailOn, "jail", true, "run every QEMU jailed: its own unprivileged uid, no capabilities, NoNewPrivs, a root of its own, QEMU's seccomp sandbox (false: QEMU runs as root, logged as a warning)")
	flag.StringVar(&jailIDs, "jail-ids", fmt.Sprintf("%d:%d", manager.DefaultJailIDs.First, manager.DefaultJailIDs.Count), "FIRST:COUNT: uids (and gids) jailed QEMUs run as, one per VM; used by nothing else on the node")
	flag.StringVar(&pprofAddr, "pprof-address", "", "serve Go's net/http/pprof profiles on this loopback HOST:PORT (empty: off)")
	flag.BoolVar(&showVersion, "version", false, "print the version and exit")
	flag.Parse()
	if showVersion {
		fmt.Println("unilet", version.Version)
		return nil
	}
	lvl, err := logrus.ParseLevel(logLevel)
	if err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	logrus.SetLevel(lvl)
	logrus.SetFormatter(&logrus.TextFormatter{FullTimestamp: true})
	if err := checkStreamAddress(streamAddr, streamCert, streamKey); err != nil {
		return err
	}
	if len(registries) == 0 {
		registries = multi{"unikraft.org"}
	}
	qemuPath, err := exec.LookPath(qemu)
	if err != nil {
		return fmt.Errorf("QEMU binary %q not found: %w", qemu, err)
	}
	guestNet, err := vmnet.ParseGuestNetwork(guestNetwork)
	if err != nil {
		return fmt.Errorf("--guest-network: %w", err)
	}
	if stateDir, err = filepath.Abs(stateDir); err != nil {
		return fmt.Errorf("--state-dir: %w", err)
	}
	resolved, err := vmruntime.ResolveAccel(context.Background(), accel, qemuPath, stateDir)
	if err != nil {
		return err
	}
	images, err := image.Open(filepath.Join(root, "images"), insecureRegs)
	if err != nil {
		return err
	}
	defer images.Close()
	if imgLimitMiB.kernel <= 0 || imgLimitMiB.initrd <= 0 || imgLimitMiB.unpacked <= 0 || pullStall <= 0 {
		return fmt.Errorf("--image-max-kernel-mib, --image-max-initrd-mib, --image-max-unpacked-mib and --image-pull-stall-timeout must be positive")
	}
	images.SetLimits(image.Limits{Kernel: imgLimitMiB.kernel << 20, Initrd: imgLimitMiB.initrd << 20,
		Unpacked: imgLimitMiB.unpacked << 20, Stall: pullStall})
	for _, m := range mirrors {
		host, mirror, ok := strings.Cut(m, "=")
		if !ok {
			return fmt.Errorf("--registry-mirror %q: want REGISTRY=MIRROR", m)
		}
		if err := images.AddMirror(host, mirror); err != nil {
			return err
		}
	}
	meta, err := metadata.Open(root)
	if err != nil {
		return err
	}
	defer meta.Close()
	shimPath, err := findShim(shimBin)
	if err != nil {
		return err
	}
	if len(cniBins) == 0 {
		cniBins = multi{"/opt/cni/bin"}
	}
	if templateWarm < 0 {
		return fmt.Errorf("--template-warm %d: want 0 or more", templateWarm)
	}
	if len(logRoots) == 0 {
		logRoots = multi{"/var/log/pods"}
	}
	for _, r := range logRoots {
		if !filepath.IsAbs(r) || filepath.Clean(r) == "/" {
			return fmt.Errorf("--pod-log-root %q: want an absolute directory other than /", r)
		}
	}
	if cniCache == "" {
		cniCache = filepath.Join(root, "cni")
	}
	limits.AllowLibParams = allowParams
	var jail *manager.JailIDs
	if jailOn {
		r, err := parseJailIDs(jailIDs)
		if err != nil {
			return fmt.Errorf("--jail-ids: %w", err)
		}
		jail = &r
	} else {
		logrus.Warn("THE JAIL IS OFF (--jail=false): every QEMU runs as root with its shim's capabilities, in the daemon's mount and network namespaces, without a seccomp sandbox; a guest that breaks out of QEMU owns this node")
	}
	network := cni.New(cni.Config{ConfDir: cniConf, BinDirs: cniBins, CacheDir: cniCache})
	if err := network.Status(); err != nil {
		logrus.WithError(err).Warn("no pod network yet: unikernel pods wait for a CNI configuration (NetworkReady=false)")
	}
	var pool *shim.Pool
	if shimPool > 0 {
		if pool, err = shim.NewPool(shimPath, filepath.Join(stateDir, "pool"), shimPool, shimPoolQuiet); err != nil {
			return fmt.Errorf("shim pool: %w", err)
		}
		defer pool.Close()
	}
	vms, err := manager.New(manager.Config{QEMU: qemuPath, StateDir: stateDir, ShimBinary: shimPath,
		CgroupRoot: cgroupRoot, Pool: pool, Jail: jail})
	if err != nil {
		return err
	}
	tmpls, err := templates.Open(filepath.Join(root, "templates"), filepath.Join(stateDir, "templates"), shimPath)
	if err != nil {
		return fmt.Errorf("templates: %w", err)
	}
	svc, err := vm.New(vm.Config{QEMU: qemuPath, Accel: resolved, StateDir: stateDir, Version: version.Version,
		Limits: limits, Network: network, NetNSDir: netnsDir, GuestNet: guestNet, LogRoots: logRoots, Templates: tmpls, TemplateWarm: templateWarm}, vms, images, meta)
	if err != nil {
		return err
	}
	if err := svc.Load(); err != nil {
		return fmt.Errorf("restore state from %s: %w", root, err)
	}
	if pprofAddr != "" {
		if err := servePprof(pprofAddr); err != nil {
			return err
		}
	}
	// The streaming server's listener is opened here, before its URLs are
	// handed out: its own Start fills in the address of a ":0" port while
	// CRI calls may already read it (a data race).
	scfg := streaming.DefaultConfig
	if streamCert != "" {
		kp, err := tls.LoadX509KeyPair(streamCert, streamKey)
		if err != nil {
			return fmt.Errorf("streaming server TLS: %w", err)
		}
		scfg.TLSConfig = &tls.Config{Certificates: []tls.Certificate{kp}, MinVersion: tls.VersionTLS12}
	}
	streamLis, err := net.Listen("tcp", streamAddr)
	if err != nil {
		return fmt.Errorf("streaming server: %w", err)
	}
	scfg.Addr = streamLis.Addr().String()
	if scfg.TLSConfig != nil {
		streamLis = tls.NewListener(streamLis, scfg.TLSConfig)
	}
	streamSrv, err := streaming.NewServer(scfg, svc.StreamRuntime())
	if err != nil {
		streamLis.Close()
		return fmt.Errorf("streaming server: %w", err)
	}
	// Only 128-bit single-use tokens reach the server (pkg/streamtoken).
	front := streamtoken.New(streamSrv)
	svc.SetStreamServer(streamSrv, front.Wrap)
	streamHTTP := &http.Server{Handler: front, ReadHeaderTimeout: 30 * time.Second}
	go func() {
		if err := streamHTTP.Serve(streamLis); err != nil && !errors.Is(err, http.ErrServerClosed) {
			logrus.WithError(err).Error("streaming server stopped")
		}
	}()
	defer streamHTTP.Close()
	router, err := cri.NewRouter(cri.Config{Annotation: annotation, AnnotationValue: annotationValue, Handler: handler,
		Registries: registries, Upstream: upstream}, svc)
	if err != nil {
		return err
	}
	defer router.Close()

	sock := strings.TrimPrefix(listen, "unix://")
	if err := os.MkdirAll(filepath.Dir(sock), 0o755); err != nil {
		return err
	}
	_ = os.Remove(sock)
	old := syscall.Umask(0o177)
	lis, err := net.Listen("unix", sock)
	syscall.Umask(old)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", sock, err)
	}
	if err := os.Chmod(sock, 0o600); err != nil {
		return err
	}
	srv := grpc.NewServer(append(router.ServerOptions(), grpc.MaxRecvMsgSize(16<<20), grpc.ChainUnaryInterceptor(cri.UnaryErrors))...)
	router.Register(srv)
	admin.RegisterAdminServer(srv, svc)

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		s := <-sigs
		logrus.WithField("signal", s.String()).Info("shutting down")
		srv.GracefulStop()
	}()
	logrus.WithFields(logrus.Fields{"listen": sock, "accel": resolved, "upstream": upstream, "version": version.Version}).Info("unilet serving CRI")
	if err := srv.Serve(lis); err != nil {
		return err
	}
	svc.Shutdown()
	_ = os.Remove(sock)
	return nil
}

// findShim locates unilet-shim: the flag, next to this binary, or on PATH.
func findShim(flagValue string) (string, error) {
	if flagValue != "" {
		return exec.LookPath(flagValue)
	}
	if self, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(self), "unilet-shim")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	p, err := exec.LookPath("unilet-shim")
	if err != nil {
		return "", fmt.Errorf("unilet-shim not found next to unilet or on PATH (use --shim): %w", err)
	}
	return p, nil
}

// checkStreamAddress: attach and port-forward reach into pods, so the
// streaming server listens on loopback unless it has TLS.
func checkStreamAddress(addr, cert, key string) error {
	if (cert == "") != (key == "") {
		return fmt.Errorf("--stream-tls-cert and --stream-tls-key go together")
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("--stream-address %q: %w", addr, err)
	}
	ip := net.ParseIP(host)
	if host == "localhost" || (ip != nil && ip.IsLoopback()) || cert != "" {
		return nil
	}
	return fmt.Errorf("--stream-address %q is not a loopback address: attach and port-forward would be served without TLS to the network; give --stream-tls-cert and --stream-tls-key, or keep the default 127.0.0.1:0", addr)
}

// parseJailIDs reads --jail-ids FIRST:COUNT.
func parseJailIDs(v string) (manager.JailIDs, error) {
	first, count, ok := strings.Cut(v, ":")
	f, err1 := strconv.ParseUint(first, 10, 32)
	c, err2 := strconv.ParseUint(count, 10, 32)
	if !ok || err1 != nil || err2 != nil {
		return manager.JailIDs{}, fmt.Errorf("%q: want FIRST:COUNT", v)
	}
	r := manager.JailIDs{First: uint32(f), Count: uint32(c)}
	return r, r.Validate()
}
