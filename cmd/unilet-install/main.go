// Command unilet-install is the DaemonSet's installer (deploy/unilet.yaml).
// It runs in a privileged pod with the host's / mounted at --host-root and
// the host's PID namespace, and:
//
//  1. copies unilet, unilet-shim, unilet-jail, uniletctl and itself from the image onto the
//     host (--bin-dir), atomically (write + rename: a running daemon keeps its
//     old file);
//  2. where the host's PID 1 is systemd, installs and (re)starts a systemd
//     unit (KillMode=process: VMs and their shims survive restarts);
//  3. elsewhere, supervises the daemon itself: unilet is started in the
//     host's namespaces (nsenter -t 1) and moved into the host's root cgroups,
//     so it runs on the host, not inside the pod it serves; it is restarted
//     when it dies or when new binaries were installed. A daemon started by an
//     earlier installer (or by hand, found through --pid-file) is adopted; its
//     flags are reused unless --daemon-args (UNILET_ARGS) gives new ones.
//
// Once the daemon answers on its CRI socket, the installer labels its node
// --ready-label=true (--node-name, from the downward API), which RuntimeClass
// unikraft schedules on; it removes the label when it ends.
//
// SIGTERM (pod deleted, DaemonSet rolled) ends the installer only: the daemon
// and every VM go on, and the next installer takes over (and labels the node
// again). Optionally
// (--kubelet-config, systemd hosts) it points kubelet's containerRuntimeEndpoint
// at unilet and restarts kubelet.
//
// The "exec-daemon" subcommand is internal: it runs in the host's namespaces,
// leaves the pod's cgroups, writes the pid file and execs unilet.
package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/unilet-dev/unilet/pkg/version"
)

var binaries = []string{"unilet", "unilet-shim", "unilet-jail", "uniletctl", "unilet-install"}

type config struct {
	hostRoot, binDir, imageBin, pidFile, logFile, daemonArgs, init, kubeletConfig, socket string
	nodeName, readyLabel, configSource, configFile                                        string
	// useConfig: the daemon is started with --config=configFile.
	useConfig bool
}

func main() {
	logrus.SetFormatter(&logrus.TextFormatter{FullTimestamp: true})
	if len(os.Args) > 1 && os.Args[1] == "exec-daemon" {
		if err := execDaemon(os.Args[2:]); err != nil {
			fmt.Fprintln(os.Stderr, "unilet-install exec-daemon:", err)
			os.Exit(1)
		}
		return
	}
	var c config
	flag.StringVar(&c.hostRoot, "host-root", "/host", "where the host's / is mounted")
	flag.StringVar(&c.binDir, "bin-dir", "/opt/unilet/bin", "host directory for the binaries")
	flag.StringVar(&c.imageBin, "image-bin", "/unilet/bin", "the binaries inside this image")
	flag.StringVar(&c.pidFile, "pid-file", "/run/unilet/unilet.pid", "host path of the daemon's pid file (supervise mode)")
	flag.StringVar(&c.logFile, "log-file", "/var/log/unilet.log", "host path of the daemon's log (supervise mode)")
	flag.StringVar(&c.daemonArgs, "daemon-args", os.Getenv("UNILET_ARGS"), "unilet flags (default: those of the running daemon, else none)")
	flag.StringVar(&c.init, "init", "auto", "auto (systemd if the host runs it as PID 1), systemd, or supervise")
	flag.StringVar(&c.kubeletConfig, "kubelet-config", "", "host path of kubelet's config file to point at unilet (systemd hosts; empty: leave kubelet alone)")
	flag.StringVar(&c.socket, "socket", "unix:///run/unilet/unilet.sock", "unilet's CRI endpoint on the host (readiness, --kubelet-config)")
	flag.StringVar(&c.nodeName, "node-name", os.Getenv("NODE_NAME"), "this node's name: labelled --ready-label=true while the daemon answers (empty: no label)")
	flag.StringVar(&c.readyLabel, "ready-label", "unilet.dev/ready", "the node label RuntimeClass unikraft schedules on")
	flag.StringVar(&c.configSource, "config-source", "/etc/unilet-config/config.toml", "the daemon's configuration in this pod (the ConfigMap); absent: the host's file is left alone")
	flag.StringVar(&c.configFile, "config-file", "/etc/unilet/config.toml", "host path the configuration is installed at; the daemon is started with --config naming it")
	showVersion := flag.Bool("version", false, "print the version")
	flag.Parse()
	if *showVersion {
		fmt.Println("unilet-install", version.Version)
		return
	}
	if err := run(c); err != nil {
		logrus.Fatal(err)
	}
}

func (c config) host(p string) string { return filepath.Join(c.hostRoot, p) }

func run(c config) error {
	changed, err := c.install()
	if err != nil {
		return err
	}
	logrus.WithFields(logrus.Fields{"dir": c.binDir, "changed": changed, "version": version.Version}).Info("binaries installed")
	cfgChanged, useConfig, err := c.installConfig()
	if err != nil {
		// The running daemon keeps its configuration: a bad file loses nothing.
		logrus.WithError(err).Error("configuration NOT installed; the daemon keeps its current one. Fix the ConfigMap, then: kubectl -n unilet-system rollout restart daemonset/unilet")
	}
	changed, c.useConfig = changed || cfgChanged, useConfig
	mode := c.init
	if mode == "auto" {
		mode = "supervise"
		if comm, _ := os.ReadFile("/proc/1/comm"); strings.TrimSpace(string(comm)) == "systemd" {
			mode = "systemd"
		}
	}
	if mode != "systemd" && mode != "supervise" {
		return fmt.Errorf("--init %q: want auto, systemd or supervise", c.init)
	}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	// The node is labelled ready once the daemon answers, and unlabelled
	// when the installer ends.
	ctx, cancel := context.WithCancel(context.Background())
	labelled := make(chan struct{})
	go func() { c.readiness(ctx); close(labelled) }()
	defer func() { cancel(); <-labelled }()
	if mode == "systemd" {
		if err := c.systemd(changed); err != nil {
			return err
		}
		<-stop
		return nil
	}
	return c.supervise(changed, stop)
}

// install copies the image's binaries to the host; it reports whether any changed.
func (c config) install() (bool, error) {
	dir := c.host(c.binDir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return false, err
	}
	changed := false
	for _, b := range binaries {
		src, err := os.ReadFile(filepath.Join(c.imageBin, b))
		if err != nil {
			return false, fmt.Errorf("image binary %s: %w", b, err)
		}
		dst := filepath.Join(dir, b)
		if old, err := os.ReadFile(dst); err == nil && sha256.Sum256(old) == sha256.Sum256(src) {
			continue
		}
		tmp := dst + ".new"
		if err := os.WriteFile(tmp, src, 0o755); err != nil {
			return false, err
		}
		if err := os.Rename(tmp, dst); err != nil {
			return false, err
		}
		changed = true
	}
	return changed, nil
}

// installConfig puts --config-source on the host at --config-file once this
// image's unilet accepts it (`unilet config dump` validates every key and
// value); it reports whether the host's file changed and whether the daemon
// is to be started with it.
func (c config) installConfig() (changed, have bool, err error) {
	src, err := os.ReadFile(c.configSource)
	if errors.Is(err, os.ErrNotExist) {
		return false, false, nil
	}
	if err != nil {
		return false, false, fmt.Errorf("config: %w", err)
	}
	dst := c.host(c.configFile)
	old, oldErr := os.ReadFile(dst)
	if oldErr == nil && bytes.Equal(old, src) {
		return false, true, nil
	}
	if out, err := exec.Command(filepath.Join(c.imageBin, "unilet"), "config", "dump", "--config", c.configSource).CombinedOutput(); err != nil {
		return false, oldErr == nil, fmt.Errorf("unilet refuses %s: %s", c.configSource, bytes.TrimSpace(out))
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return false, false, err
	}
	if err := os.WriteFile(dst+".new", src, 0o644); err != nil {
		return false, false, err
	}
	if err := os.Rename(dst+".new", dst); err != nil {
		return false, false, err
	}
	logrus.WithField("file", c.configFile).Info("configuration installed")
	return true, true, nil
}

// args are the daemon's arguments: the given ones, naming the installed
// configuration file.
func (c config) args(given []string) []string {
	if !c.useConfig {
		return given
	}
	return withConfigFlag(given, c.configFile)
}

// withConfigFlag sets --config=path in the daemon's arguments, replacing any
// --config given before.
func withConfigFlag(args []string, path string) []string {
	var out []string
	for i := 0; i < len(args); i++ {
		switch {
		case args[i] == "--config" || args[i] == "-config":
			i++ // and its value
		case strings.HasPrefix(args[i], "--config=") || strings.HasPrefix(args[i], "-config="):
		default:
			out = append(out, args[i])
		}
	}
	return append(out, "--config="+path)
}

// hostCmd runs a command in the host's mount, UTS, IPC and network namespaces
// (the pod shares the host's PID namespace, so nsenter execs without forking).
func hostCmd(args ...string) *exec.Cmd {
	return exec.Command("nsenter", append([]string{"-t", hostNSPid(), "-m", "-u", "-i", "-n", "--"}, args...)...)
}

// hostNSPid names a process in the host's namespaces: PID 1, or — where PID
// 1's namespaces cannot be opened (some sandboxed inits refuse it) — this
// pod's parent, the container runtime's shim, which runs on the host.
func hostNSPid() string {
	if _, err := os.Readlink("/proc/1/ns/mnt"); err == nil {
		return "1"
	}
	return strconv.Itoa(os.Getppid())
}

const unit = `[Unit]
Description=unilet: Kubernetes CRI runtime for Unikraft unikernels
After=network-online.target containerd.service
Before=kubelet.service

[Service]
ExecStart=%s %s
Restart=always
RestartSec=2
# VMs run under their own unilet-shim: a restart or upgrade must not stop them.
KillMode=process
Delegate=yes

[Install]
WantedBy=multi-user.target
`

// renderUnit is the systemd unit running binDir/unilet with args.
func renderUnit(binDir, args string) string {
	return fmt.Sprintf(unit, filepath.Join(binDir, "unilet"), strings.Join(strings.Fields(args), " "))
}

func (c config) systemd(changed bool) error {
	path := c.host("/etc/systemd/system/unilet.service")
	content := renderUnit(c.binDir, strings.Join(c.args(strings.Fields(c.daemonArgs)), " "))
	old, _ := os.ReadFile(path)
	if !bytes.Equal(old, []byte(content)) {
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			return err
		}
		changed = true
	}
	for _, a := range [][]string{{"systemctl", "daemon-reload"}, {"systemctl", "enable", "unilet"}} {
		if out, err := hostCmd(a...).CombinedOutput(); err != nil {
			return fmt.Errorf("%s: %v: %s", strings.Join(a, " "), err, out)
		}
	}
	verb := "start"
	if changed {
		verb = "restart"
	}
	if out, err := hostCmd("systemctl", verb, "unilet").CombinedOutput(); err != nil {
		return fmt.Errorf("systemctl %s unilet: %v: %s", verb, err, out)
	}
	logrus.WithField("action", verb).Info("unilet runs as systemd unit unilet.service")
	return c.switchKubelet(true)
}

// switchKubelet points kubelet at unilet (optional).
func (c config) switchKubelet(systemd bool) error {
	if c.kubeletConfig == "" {
		return nil
	}
	p := c.host(c.kubeletConfig)
	b, err := os.ReadFile(p)
	if err != nil {
		return fmt.Errorf("kubelet config: %w", err)
	}
	updated, changed := pointKubeletAt(b, c.socket)
	if !changed {
		return nil
	}
	if err := os.WriteFile(p, updated, 0o644); err != nil {
		return err
	}
	if !systemd {
		logrus.Warn("kubelet's config now points at unilet; restart kubelet to apply it (no systemd on this host)")
		return nil
	}
	if out, err := hostCmd("systemctl", "restart", "kubelet").CombinedOutput(); err != nil {
		return fmt.Errorf("restart kubelet: %v: %s", err, out)
	}
	logrus.Info("kubelet now uses unilet")
	return nil
}

// pointKubeletAt sets containerRuntimeEndpoint in a KubeletConfiguration
// file (YAML, top level) to socket; it reports whether anything changed.
func pointKubeletAt(config []byte, socket string) ([]byte, bool) {
	var out []string
	found := false
	for _, l := range strings.Split(string(config), "\n") {
		if strings.HasPrefix(l, "containerRuntimeEndpoint:") {
			if strings.Trim(strings.TrimSpace(strings.TrimPrefix(l, "containerRuntimeEndpoint:")), `"'`) == socket {
				return config, false
			}
			l, found = "containerRuntimeEndpoint: "+socket, true
		}
		out = append(out, l)
	}
	if !found {
		if len(out) > 0 && out[len(out)-1] == "" {
			out = out[:len(out)-1]
		}
		out = append(out, "containerRuntimeEndpoint: "+socket, "")
	}
	return []byte(strings.Join(out, "\n")), true
}

// daemonPid returns the pid of the running daemon recorded in the pid file.
func (c config) daemonPid() (int, []string) {
	b, err := os.ReadFile(c.host(c.pidFile))
	if err != nil {
		return 0, nil
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	if pid <= 0 {
		return 0, nil
	}
	cmd, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return 0, nil
	}
	args := strings.Split(strings.TrimRight(string(cmd), "\x00"), "\x00")
	st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if len(args) == 0 || filepath.Base(args[0]) != "unilet" || strings.Contains(string(st), ") Z ") {
		return 0, nil
	}
	return pid, args[1:]
}

func alive(pid int) bool {
	if syscall.Kill(pid, 0) != nil {
		return false
	}
	st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	return !strings.Contains(string(st), ") Z ")
}

// supervise keeps the daemon running on the host until SIGTERM.
func (c config) supervise(changed bool, stop <-chan os.Signal) error {
	pid, args := c.daemonPid()
	daemonArgs := strings.Fields(c.daemonArgs)
	if len(daemonArgs) == 0 {
		daemonArgs = args // adopt the running daemon's flags
	}
	daemonArgs = c.args(daemonArgs)
	var child *exec.Cmd
	exited := make(chan struct{})
	if pid > 0 && changed {
		logrus.WithField("pid", pid).Info("new binaries: restarting the daemon (VMs keep running)")
		stopDaemon(pid)
		pid = 0
	}
	if pid > 0 {
		logrus.WithField("pid", pid).Info("adopting the running daemon")
	}
	for {
		if pid == 0 {
			var err error
			if child, err = c.startDaemon(daemonArgs); err != nil {
				logrus.WithError(err).Error("start unilet; retrying")
				select {
				case <-stop:
					return nil
				case <-time.After(2 * time.Second):
				}
				continue
			}
			pid = child.Process.Pid
			exited = make(chan struct{})
			go func(cmd *exec.Cmd, done chan struct{}) { _ = cmd.Wait(); close(done) }(child, exited)
			logrus.WithField("pid", pid).Info("unilet started on the host")
		}
		select {
		case <-stop:
			logrus.Info("installer stopping; the daemon and its VMs go on")
			return nil
		case <-exited:
			logrus.WithField("pid", pid).Warn("unilet exited; restarting it")
			pid = 0
			time.Sleep(time.Second)
		case <-time.After(2 * time.Second):
			if child == nil && !alive(pid) {
				logrus.WithField("pid", pid).Warn("the adopted daemon is gone; starting it")
				pid = 0
			}
		}
	}
}

func stopDaemon(pid int) {
	_ = syscall.Kill(pid, syscall.SIGTERM)
	for i := 0; i < 300 && alive(pid); i++ {
		time.Sleep(100 * time.Millisecond)
	}
	if alive(pid) {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}

func (c config) startDaemon(args []string) (*exec.Cmd, error) {
	cmd := hostCmd(append([]string{filepath.Join(c.binDir, "unilet-install"), "exec-daemon", "--pid-file", c.pidFile,
		"--log-file", c.logFile, "--", filepath.Join(c.binDir, "unilet")}, args...)...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	return cmd, nil
}

// execDaemon (host namespaces): leave the pod's cgroups for the host's root
// cgroups, record the pid, send output to the log file and exec unilet.
func execDaemon(args []string) error {
	fs := flag.NewFlagSet("exec-daemon", flag.ContinueOnError)
	pidFile := fs.String("pid-file", "", "")
	logFile := fs.String("log-file", "", "")
	if err := fs.Parse(args); err != nil {
		return err
	}
	rest := fs.Args()
	if len(rest) == 0 {
		return errors.New("no daemon command")
	}
	self := []byte(strconv.Itoa(os.Getpid()))
	ents, _ := os.ReadDir("/sys/fs/cgroup")
	for _, e := range ents {
		_ = os.WriteFile(filepath.Join("/sys/fs/cgroup", e.Name(), "cgroup.procs"), self, 0o644)
	}
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.procs"); err == nil { // cgroup v2
		_ = os.WriteFile("/sys/fs/cgroup/cgroup.procs", self, 0o644)
	}
	if err := os.MkdirAll(filepath.Dir(*pidFile), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(*pidFile, self, 0o644); err != nil {
		return err
	}
	lf, err := os.OpenFile(*logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	_, _ = io.WriteString(lf, fmt.Sprintf("--- unilet started by unilet-install %s at %s\n", version.Version, time.Now().Format(time.RFC3339)))
	if err := syscall.Dup2(int(lf.Fd()), 1); err != nil {
		return err
	}
	if err := syscall.Dup2(int(lf.Fd()), 2); err != nil {
		return err
	}
	return syscall.Exec(rest[0], rest, os.Environ())
}
