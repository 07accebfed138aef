package shim

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/ttrpc"
	"golang.org/x/sys/unix"

	"github.com/unilet-dev/unilet/vmm"
	"github.com/unilet-dev/unilet/vmm/shim/api"
)

// Client talks to one shim.
type Client struct {
	api.ShimClient
	conn net.Conn
	tc   *ttrpc.Client
	Dir  string
	// Spawn is how long Launch waited from exec to the shim's first answer,
	// Boot how long its Start RPC took (QEMU spawn to QMP ready).
	Spawn, Boot time.Duration

	pidMu   sync.Mutex
	pidfd   int // pins the shim process (-1: none)
	peerPid int
}

// Launch writes spec into dir, starts `shimBinary --dir dir` detached (own
// session, so it survives the daemon) and connects once the VM runs. A VM
// that fails to start is reported with the shim's recorded reason.
// beforeStart (optional) runs with the shim's pid before the VM boots, e.g.
// to place the shim, and so QEMU, in a cgroup.
func Launch(ctx context.Context, shimBinary, dir string, spec vmm.VMSpec, beforeStart func(pid int) error) (*Client, error) {
	if err := writeSpec(dir, spec); err != nil {
		return nil, err
	}
	logf, err := os.OpenFile(filepath.Join(dir, LogFile), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(shimBinary, "--dir", dir)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", shimBinary, err)
	}
	t0 := time.Now()
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }() // reap; the shim outlives us only if we die
	if beforeStart != nil {
		if err := beforeStart(cmd.Process.Pid); err != nil {
			_ = cmd.Process.Kill()
			<-exited
			return nil, err
		}
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		if c, err := Connect(dir); err == nil {
			if _, err := c.State(ctx, &api.StateRequest{}); err == nil {
				c.Spawn = time.Since(t0)
				return startVM(ctx, c, dir, exited, func() { _ = cmd.Process.Kill() }, t0)
			}
			c.Close()
		}
		select {
		case err := <-exited:
			if st, ok := ReadExit(dir); ok {
				return nil, fmt.Errorf("%s", st.Message)
			}
			out, _ := os.ReadFile(filepath.Join(dir, LogFile))
			return nil, fmt.Errorf("unilet-shim exited (%v): %s", err, out)
		case <-ctx.Done():
			_ = cmd.Process.Kill()
			return nil, ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			return nil, fmt.Errorf("unilet-shim did not serve %s within 15s", filepath.Join(dir, SocketFile))
		}
	}
}

// writeSpec records the VM to run in its directory.
func writeSpec(dir string, spec vmm.VMSpec) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	b, err := json.Marshal(spec)
	if err != nil {
		return err
	}
	// Whole or not at all: a warm clone's spec is rewritten while its shim
	// (and a daemon reading jail ids) may read it.
	tmp := filepath.Join(dir, SpecFile+".tmp")
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(dir, SpecFile))
}

// startVM sends Start to a connected shim. A VM that fails to start is
// reported with the reason the shim recorded; the shim ends itself then
// (kill makes sure).
func startVM(ctx context.Context, c *Client, dir string, exited <-chan error, kill func(), t0 time.Time) (*Client, error) {
	if _, err := c.Start(ctx, &api.StartRequest{}); err != nil {
		c.Close()
		if ctx.Err() != nil {
			kill() // cancelled: the shim would go on starting; QEMU dies with it
		}
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			kill()
			<-exited
		}
		if st, ok := ReadExit(dir); ok {
			return nil, fmt.Errorf("%s", st.Message)
		}
		return nil, fmt.Errorf("start VM: %w", err)
	}
	c.Boot = time.Since(t0) - c.Spawn
	return c, nil
}

// Connect dials the shim of dir. The shim's process is pinned (a pidfd
// of the socket's peer), so KillShim can never hit a recycled PID.
func Connect(dir string) (*Client, error) {
	conn, err := net.Dial("unix", filepath.Join(dir, SocketFile))
	if err != nil {
		return nil, err
	}
	tc := ttrpc.NewClient(conn)
	c := &Client{ShimClient: api.NewShimClient(tc), conn: conn, tc: tc, Dir: dir, pidfd: -1}
	if uc, ok := conn.(*net.UnixConn); ok {
		if raw, err := uc.SyscallConn(); err == nil {
			_ = raw.Control(func(fd uintptr) {
				if cred, err := unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED); err == nil && cred.Pid > 1 {
					if pfd, err := unix.PidfdOpen(int(cred.Pid), 0); err == nil {
						c.pidfd, c.peerPid = pfd, int(cred.Pid)
					}
				}
			})
		}
	}
	return c, nil
}

// Close closes the connection (the shim and VM go on).
func (c *Client) Close() error {
	c.pidMu.Lock()
	if c.pidfd >= 0 {
		_ = unix.Close(c.pidfd)
		c.pidfd = -1
	}
	c.pidMu.Unlock()
	return c.tc.Close()
}

// WaitExit waits until the shim process serving this connection has
// exited (its pidfd turns readable), or ctx ends.
func (c *Client) WaitExit(ctx context.Context) error {
	for {
		c.pidMu.Lock()
		fd := c.pidfd
		var n int
		var err error
		if fd >= 0 {
			n, err = unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 20)
		}
		c.pidMu.Unlock()
		if fd < 0 {
			return errors.New("the shim's process is not known")
		}
		if n > 0 {
			return nil
		}
		if err != nil && !errors.Is(err, unix.EINTR) {
			return err
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
}

// ShimPid is the PID of the shim serving this connection (0: unknown).
func (c *Client) ShimPid() int { return c.peerPid }

// KillShim sends SIGKILL to the shim process serving this connection (a
// stuck shim that answers nothing); its QEMU dies with it.
func (c *Client) KillShim() error {
	c.pidMu.Lock()
	defer c.pidMu.Unlock()
	if c.pidfd < 0 {
		return errors.New("the shim's process is not known")
	}
	return unix.PidfdSendSignal(c.pidfd, unix.SIGKILL, nil, 0)
}
