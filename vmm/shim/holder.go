package shim

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/unilet-dev/unilet/vmm"
)

// A template holder keeps one template's RAM in a sealed memfd and hands it
// to the shims of the template's clones: a unilet-shim started with
// --template-ram, confined as every shim, detached from the daemon (so the
// clones started before and after a daemon restart share pages). Each
// connection to its socket gets the memfd (SCM_RIGHTS) and is closed. It
// ends when its template's RAM file is gone (the template was removed).

// holderCheck is how often a holder looks whether its template still exists.
const holderCheck = 2 * time.Second

// HolderStartTimeout bounds starting a holder (it reads and hashes the RAM).
const HolderStartTimeout = 60 * time.Second

// ServeTemplateRAM loads ramPath (size bytes) into a sealed memfd, failing
// unless its SHA-256 is digest, then serves it on sock until ctx ends or
// ramPath is gone.
func ServeTemplateRAM(ctx context.Context, ramPath string, size int64, digest, sock string) error {
	before, err := os.Stat(ramPath)
	if err != nil {
		return err
	}
	h := sha256.New()
	ram, err := vmm.LoadRAMFile(ramPath, size, h)
	if err != nil {
		return err
	}
	defer ram.Close()
	if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != digest {
		return fmt.Errorf("template RAM %s: digest %s, want %s", ramPath, got, digest)
	}
	tmp := sock + ".tmp"
	_ = os.Remove(tmp)
	l, err := net.Listen("unix", tmp)
	if err != nil {
		return err
	}
	defer l.Close()
	if err := os.Rename(tmp, sock); err != nil { // it appears ready
		return err
	}
	defer os.Remove(sock)
	go func() {
		t := time.NewTicker(holderCheck)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
			case <-t.C:
				if st, err := os.Stat(ramPath); err == nil && os.SameFile(st, before) {
					continue
				}
			}
			l.Close()
			return
		}
	}()
	rights := unix.UnixRights(int(ram.Fd()))
	for {
		c, err := l.Accept()
		if err != nil {
			return nil // closed: the template is gone or the holder ends
		}
		_, _, _ = c.(*net.UnixConn).WriteMsgUnix([]byte("r"), rights, nil)
		c.Close()
	}
}

// FetchTemplateRAM receives a template's RAM memfd from the holder serving
// sock and checks its seals.
func FetchTemplateRAM(sock string) (*os.File, error) {
	c, err := net.DialTimeout("unix", sock, CallTimeoutLocal)
	if err != nil {
		return nil, fmt.Errorf("template RAM holder: %w", err)
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(CallTimeoutLocal))
	oob := make([]byte, unix.CmsgSpace(4))
	_, oobn, _, _, err := c.(*net.UnixConn).ReadMsgUnix(make([]byte, 1), oob)
	if err != nil {
		return nil, fmt.Errorf("template RAM holder: %w", err)
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) != 1 {
		return nil, errors.New("template RAM holder sent no file")
	}
	fds, err := unix.ParseUnixRights(&msgs[0])
	if err != nil || len(fds) != 1 {
		return nil, errors.New("template RAM holder sent no file")
	}
	f := os.NewFile(uintptr(fds[0]), "template-ram")
	if err := vmm.CheckSealed(f); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// CallTimeoutLocal bounds talking to a local helper socket.
const CallTimeoutLocal = 5 * time.Second

// StartHolder starts a detached holder (binary, a unilet-shim) for the
// template RAM at ramPath and waits until it serves sock; its messages go
// to sock+".log".
func StartHolder(binary, ramPath string, size int64, digest, sock string) error {
	logf, err := os.OpenFile(sock+".log", os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(binary, "--template-ram", ramPath, "--size", strconv.FormatInt(size, 10), "--digest", digest, "--listen", sock)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return err
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	deadline := time.After(HolderStartTimeout)
	for {
		if f, err := FetchTemplateRAM(sock); err == nil {
			f.Close()
			return nil
		}
		select {
		case <-exited:
			b, _ := os.ReadFile(sock + ".log")
			return fmt.Errorf("the template RAM holder ended: %s", string(b))
		case <-deadline:
			_ = cmd.Process.Kill()
			return fmt.Errorf("the template RAM holder did not serve %s within %s", filepath.Base(sock), HolderStartTimeout)
		case <-time.After(20 * time.Millisecond):
		}
	}
}
