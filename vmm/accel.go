package vmm

import (
	"bytes"
	"context"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
)

//go:embed kvmprobe/probe.elf
var probeKernel []byte

const probeMarker = "unilet-kvm-ok"

// ProbeKVM boots a tiny guest that executes an SSE instruction under KVM and
// reports whether it printed its marker. A KVM device that exists but cannot
// run guests (nested PVM: MSR failures, emulation failures that leave QEMU
// paused in internal-error) fails the probe; the error says why.
func ProbeKVM(ctx context.Context, qemu string) error {
	if _, err := os.Stat("/dev/kvm"); err != nil {
		return fmt.Errorf("/dev/kvm is not available: %w", err)
	}
	dir, err := os.MkdirTemp("", "unilet-kvmprobe-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	kernel := filepath.Join(dir, "probe.elf")
	if err := os.WriteFile(kernel, probeKernel, 0o644); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	cmd := probeCommand(ctx, qemu, kernel)
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	err = cmd.Run()
	if strings.Contains(out.String(), probeMarker) {
		return nil
	}
	msg := strings.TrimSpace(stderr.String())
	if i := strings.LastIndexByte(msg, '\n'); i >= 0 && len(msg) > 300 {
		msg = msg[i+1:]
	}
	if ctx.Err() != nil {
		return fmt.Errorf("KVM probe guest did not finish within 5s (KVM cannot run it; QEMU likely stuck in internal-error) %s", msg)
	}
	return fmt.Errorf("KVM probe guest failed (%v): %s", err, msg)
}

// probeCommand is the probe's QEMU. It dies with the daemon: killed during
// start-up, the daemon would otherwise leave it running forever, paused in
// internal-error.
func probeCommand(ctx context.Context, qemu, kernel string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, qemu, "-machine", "pc,accel=kvm", "-cpu", "host", "-m", "16",
		"-nographic", "-nodefaults", "-no-user-config", "-no-reboot", "-kernel", kernel,
		"-serial", "stdio", "-fw_cfg", "name=etc/sercon-port,string=0")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	return cmd
}

// ResolveAccel turns the --accel setting (auto|kvm|tcg) into the accelerator
// to use. auto uses KVM only when ProbeKVM proves it works and otherwise falls
// back to TCG with one loud warning; kvm fails if the probe fails. The
// probe's verdict is kept in cacheDir (the runtime state directory, empty
// after a reboot; "" keeps nothing) for this boot of the host and this QEMU
// binary: a failing probe costs up to 5 s, at every daemon start otherwise.
func ResolveAccel(ctx context.Context, setting, qemu, cacheDir string) (string, error) {
	switch setting {
	case AccelTCG:
		return AccelTCG, nil
	case AccelKVM:
		if err := cachedProbe(ctx, qemu, cacheDir); err != nil {
			return "", fmt.Errorf("--accel=kvm requested but KVM cannot run guests here: %w", err)
		}
		return AccelKVM, nil
	case "", "auto":
		if err := cachedProbe(ctx, qemu, cacheDir); err != nil {
			logrus.WithError(err).Warn("KVM is not usable; running every VM under TCG software emulation (much slower). Use --accel=tcg to silence this probe.")
			return AccelTCG, nil
		}
		return AccelKVM, nil
	default:
		return "", fmt.Errorf("unknown --accel %q (want auto, kvm or tcg)", setting)
	}
}

// ProbeCacheFile holds the KVM probe's verdict in the cache directory.
const ProbeCacheFile = "kvm-probe.json"

// probeVerdict is a kept probe result and what it holds for.
type probeVerdict struct {
	BootID string `json:"bootID"`
	QEMU   string `json:"qemu"` // path, size and modification time of the binary
	Error  string `json:"error,omitempty"`
}

// ProbeVerdict reads the KVM probe's kept verdict in cacheDir: found says
// whether there is one, err is what the probe found wrong (nil: KVM runs
// guests).
func ProbeVerdict(cacheDir string) (found bool, err error) {
	var v probeVerdict
	b, rerr := os.ReadFile(filepath.Join(cacheDir, ProbeCacheFile))
	if rerr != nil {
		return false, rerr
	}
	if jerr := json.Unmarshal(b, &v); jerr != nil {
		return false, fmt.Errorf("unreadable verdict in %s: %w", ProbeCacheFile, jerr)
	}
	if v.Error != "" {
		return true, errors.New(v.Error)
	}
	return true, nil
}

// probe is ProbeKVM (a variable for tests).
var probe = ProbeKVM

// probeKey names the host boot and the QEMU binary a verdict holds for.
func probeKey(qemu string) (boot, bin string, ok bool) {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	fi, serr := os.Stat(qemu)
	if err != nil || serr != nil {
		return "", "", false
	}
	return strings.TrimSpace(string(b)), fmt.Sprintf("%s %d %d", qemu, fi.Size(), fi.ModTime().UnixNano()), true
}

func cachedProbe(ctx context.Context, qemu, cacheDir string) error {
	boot, bin, ok := probeKey(qemu)
	file := filepath.Join(cacheDir, ProbeCacheFile)
	if ok && cacheDir != "" {
		var v probeVerdict
		if b, err := os.ReadFile(file); err == nil && json.Unmarshal(b, &v) == nil && v.BootID == boot && v.QEMU == bin {
			logrus.WithField("file", file).Debug("KVM probe verdict kept from earlier in this boot")
			if v.Error != "" {
				return fmt.Errorf("%s (probed earlier in this boot; remove %s to probe again)", v.Error, file)
			}
			return nil
		}
	}
	err := probe(ctx, qemu)
	if ok && cacheDir != "" && ctx.Err() == nil {
		v := probeVerdict{BootID: boot, QEMU: bin}
		if err != nil {
			v.Error = err.Error()
		}
		b, _ := json.Marshal(v)
		if merr := os.MkdirAll(cacheDir, 0o700); merr == nil {
			tmp := file + ".tmp"
			if os.WriteFile(tmp, b, 0o600) == nil {
				_ = os.Rename(tmp, file)
			}
		}
	}
	return err
}
