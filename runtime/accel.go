package runtime

import (
	"bytes"
	"context"
	_ "embed"
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
// back to TCG with one loud warning; kvm fails if the probe fails.
func ResolveAccel(ctx context.Context, setting, qemu string) (string, error) {
	switch setting {
	case AccelTCG:
		return AccelTCG, nil
	case AccelKVM:
		if err := ProbeKVM(ctx, qemu); err != nil {
			return "", fmt.Errorf("--accel=kvm requested but KVM cannot run guests here: %w", err)
		}
		return AccelKVM, nil
	case "", "auto":
		if err := ProbeKVM(ctx, qemu); err != nil {
			logrus.WithError(err).Warn("KVM is not usable; running every VM under TCG software emulation (much slower). Use --accel=tcg to silence this probe.")
			return AccelTCG, nil
		}
		return AccelKVM, nil
	default:
		return "", fmt.Errorf("unknown --accel %q (want auto, kvm or tcg)", setting)
	}
}
