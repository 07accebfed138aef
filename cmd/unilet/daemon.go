package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
	"k8s.io/cri-streaming/pkg/streaming"

	"github.com/unilet-dev/unilet/api/admin"
	"github.com/unilet-dev/unilet/cri"
	"github.com/unilet-dev/unilet/cri/unikernel"
	"github.com/unilet-dev/unilet/image"
	"github.com/unilet-dev/unilet/pkg/cni"
	"github.com/unilet-dev/unilet/pkg/config"
	"github.com/unilet-dev/unilet/pkg/metadata"
	"github.com/unilet-dev/unilet/pkg/metrics"
	"github.com/unilet-dev/unilet/pkg/streamtoken"
	"github.com/unilet-dev/unilet/pkg/version"
	"github.com/unilet-dev/unilet/pkg/vmnet"
	"github.com/unilet-dev/unilet/vmm"
	"github.com/unilet-dev/unilet/vmm/manager"
	"github.com/unilet-dev/unilet/vmm/shim"
	"github.com/unilet-dev/unilet/vmm/templates"
)

// setupLogging applies debug.level and debug.format.
func setupLogging(c config.Debug) {
	lvl, _ := logrus.ParseLevel(c.Level) // validated
	logrus.SetLevel(lvl)
	if c.Format == "json" {
		logrus.SetFormatter(&logrus.JSONFormatter{})
	} else {
		logrus.SetFormatter(&logrus.TextFormatter{FullTimestamp: true})
	}
}

// serve wires the daemon from a validated configuration and serves CRI and
// the operator API until SIGTERM or SIGINT.
func serve(cfg config.Config) error {
	setupLogging(cfg.Debug)
	qemuPath, err := exec.LookPath(cfg.VM.QEMU)
	if err != nil {
		return fmt.Errorf("QEMU binary %q not found (--qemu, vm.qemu): %w", cfg.VM.QEMU, err)
	}
	guestNet, _ := vmnet.ParseGuestNetwork(cfg.Network.GuestNetwork) // validated
	stateDir, err := filepath.Abs(cfg.State)
	if err != nil {
		return fmt.Errorf("--state-dir: %w", err)
	}
	resolved, err := vmm.ResolveAccel(context.Background(), cfg.VM.Accel, qemuPath, stateDir)
	if err != nil {
		return err
	}
	images, err := image.Open(filepath.Join(cfg.Root, "images"), cfg.Images.InsecureRegistries)
	if err != nil {
		return err
	}
	defer images.Close()
	images.SetLimits(image.Limits{Kernel: cfg.Images.MaxKernelMiB << 20, Initrd: cfg.Images.MaxInitrdMiB << 20,
		Unpacked: cfg.Images.MaxUnpackedMiB << 20, Stall: time.Duration(cfg.Images.PullStallTimeout)})
	for host, mirror := range cfg.Images.Mirrors {
		if err := images.AddMirror(host, mirror); err != nil {
			return err
		}
	}
	meta, err := metadata.Open(cfg.Root)
	if err != nil {
		return err
	}
	defer meta.Close()
	shimPath, err := findShim(cfg.VM.Shim)
	if err != nil {
		return err
	}
	var jail *manager.JailIDs
	if cfg.Jail.Enabled {
		r, _ := cfg.JailIDs() // validated
		jail = &r
	} else {
		logrus.Warn("THE JAIL IS OFF (--jail=false): every QEMU runs as root with its shim's capabilities, in the daemon's mount and network namespaces, without a seccomp sandbox; a guest that breaks out of QEMU owns this node")
	}
	network := cni.New(cni.Config{ConfDir: cfg.Network.CNIConfDir, BinDirs: cfg.Network.CNIBinDirs, CacheDir: cfg.CNICacheDir()})
	if err := network.Status(); err != nil {
		logrus.WithError(err).Warn("no pod network yet: unikernel pods wait for a CNI configuration (NetworkReady=false)")
	}
	var pool *shim.Pool
	if cfg.VM.ShimPool > 0 {
		if pool, err = shim.NewPool(shimPath, filepath.Join(stateDir, "pool"), cfg.VM.ShimPool, time.Duration(cfg.VM.ShimPoolQuiet)); err != nil {
			return fmt.Errorf("shim pool: %w", err)
		}
		defer pool.Close()
	}
	vms, err := manager.New(manager.Config{QEMU: qemuPath, StateDir: stateDir, ShimBinary: shimPath,
		CgroupRoot: cfg.VM.CgroupRoot, Pool: pool, Jail: jail})
	if err != nil {
		return err
	}
	tmpls, err := templates.Open(filepath.Join(cfg.Root, "templates"), filepath.Join(stateDir, "templates"), shimPath)
	if err != nil {
		return fmt.Errorf("templates: %w", err)
	}
	limits := unikernel.Limits{OverheadMiB: cfg.VM.OverheadMiB, DefaultMemMiB: cfg.VM.DefaultMemMiB, MaxMemMiB: cfg.VM.MaxMemMiB,
		MaxVCPUs: cfg.VM.MaxVCPUs, AllowLibParams: cfg.VM.AllowLibParams}
	effective, err := cfg.Encode()
	if err != nil {
		return err
	}
	svc, err := unikernel.New(unikernel.Config{Effective: effective, QEMU: qemuPath, Accel: resolved, StateDir: stateDir, Version: version.Version,
		Limits: limits, Network: network, NetNSDir: cfg.Network.NetNSDir, GuestNet: guestNet, LogRoots: cfg.Pods.LogRoots,
		Templates: tmpls, TemplateWarm: cfg.VM.TemplateWarm}, vms, images, meta)
	if err != nil {
		return err
	}
	if err := svc.Load(); err != nil {
		return fmt.Errorf("restore state from %s: %w", cfg.Root, err)
	}
	if cfg.Debug.PprofAddress != "" {
		if err := servePprof(cfg.Debug.PprofAddress); err != nil {
			return err
		}
	}
	if cfg.Metrics.Address != "" {
		stopMetrics, err := metrics.Serve(cfg.Metrics.Address, metrics.Registry(svc.Collector()))
		if err != nil {
			return err
		}
		defer stopMetrics()
	}
	stop, err := serveStreaming(cfg.Stream, svc)
	if err != nil {
		return err
	}
	defer stop()
	router, err := cri.NewRouter(cri.Config{Annotation: cfg.Pods.Annotation, AnnotationValue: cfg.Pods.AnnotationValue,
		Handler: cfg.Pods.RuntimeHandler, Registries: cfg.Images.UnikernelRegistries, Upstream: cfg.Upstream.Endpoint}, svc)
	if err != nil {
		return err
	}
	defer router.Close()

	sock := cfg.SocketPath()
	lis, err := listenUnix(sock)
	if err != nil {
		return err
	}
	// The metrics interceptors come first: they count the code clients get.
	srv := grpc.NewServer(append(router.ServerOptions(), grpc.MaxRecvMsgSize(16<<20),
		grpc.ChainUnaryInterceptor(metrics.UnaryInterceptor, cri.UnaryErrors), grpc.ChainStreamInterceptor(metrics.StreamInterceptor, cri.StreamErrors))...)
	router.Register(srv)
	admin.RegisterAdminServer(srv, svc)

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		s := <-sigs
		logrus.WithField("signal", s.String()).Info("shutting down")
		srv.GracefulStop()
	}()
	logrus.WithFields(logrus.Fields{"listen": sock, "accel": resolved, "upstream": cfg.Upstream.Endpoint, "version": version.Version}).Info("unilet serving CRI")
	if err := srv.Serve(lis); err != nil {
		return err
	}
	svc.Shutdown()
	_ = os.Remove(sock)
	return nil
}

// listenUnix opens the CRI socket, readable and writable by root only.
func listenUnix(sock string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(sock), 0o755); err != nil {
		return nil, err
	}
	_ = os.Remove(sock)
	old := syscall.Umask(0o177)
	lis, err := net.Listen("unix", sock)
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", sock, err)
	}
	if err := os.Chmod(sock, 0o600); err != nil {
		lis.Close()
		return nil, err
	}
	return lis, nil
}

// serveStreaming starts the CRI streaming server (attach, port-forward).
// Its listener is opened here, before its URLs are handed out: its own
// Start fills in the address of a ":0" port while CRI calls may already
// read it (a data race).
func serveStreaming(c config.Stream, svc *unikernel.Service) (stop func(), err error) {
	scfg := streaming.DefaultConfig
	if c.TLSCert != "" {
		kp, err := tls.LoadX509KeyPair(c.TLSCert, c.TLSKey)
		if err != nil {
			return nil, fmt.Errorf("streaming server TLS: %w", err)
		}
		scfg.TLSConfig = &tls.Config{Certificates: []tls.Certificate{kp}, MinVersion: tls.VersionTLS12}
	}
	lis, err := net.Listen("tcp", c.Address)
	if err != nil {
		return nil, fmt.Errorf("streaming server: %w", err)
	}
	scfg.Addr = lis.Addr().String()
	if scfg.TLSConfig != nil {
		lis = tls.NewListener(lis, scfg.TLSConfig)
	}
	srv, err := streaming.NewServer(scfg, svc.StreamRuntime())
	if err != nil {
		lis.Close()
		return nil, fmt.Errorf("streaming server: %w", err)
	}
	// Only 128-bit single-use tokens reach the server (pkg/streamtoken).
	front := streamtoken.New(srv)
	svc.SetStreamServer(srv, front.Wrap)
	h := &http.Server{Handler: front, ReadHeaderTimeout: 30 * time.Second}
	go func() {
		if err := h.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
			logrus.WithError(err).Error("streaming server stopped")
		}
	}()
	return func() { h.Close() }, nil
}

// servePprof serves the Go profiles (for `go tool pprof`) on addr, a
// loopback address (validated): profiles expose the daemon's memory.
func servePprof(addr string) error {
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
