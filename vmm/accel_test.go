package vmm

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// The probe's QEMU must not outlive a daemon killed during start-up. A
// child process (this test binary) starts the probe command with a stand-in
// QEMU and is killed with SIGKILL; the stand-in must die with it.
func TestProbeQEMUDiesWithTheDaemon(t *testing.T) {
	if os.Getenv("UNILET_PROBE_CHILD") != "" {
		cmd := probeCommand(context.Background(), os.Getenv("UNILET_PROBE_CHILD"), "probe.elf")
		if err := cmd.Start(); err != nil {
			fmt.Println("error", err)
			os.Exit(1)
		}
		fmt.Println(cmd.Process.Pid)
		time.Sleep(time.Minute)
		os.Exit(0)
	}
	fake := filepath.Join(t.TempDir(), "qemu")
	require.NoError(t, os.WriteFile(fake, []byte("#!/bin/sh\nexec sleep 120\n"), 0o755))
	child := exec.Command(os.Args[0], "-test.run", "^TestProbeQEMUDiesWithTheDaemon$")
	child.Env = append(os.Environ(), "UNILET_PROBE_CHILD="+fake)
	out, err := child.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, child.Start())
	t.Cleanup(func() { _ = child.Process.Kill(); _ = child.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	require.NoError(t, err)
	pid, err := strconv.Atoi(strings.TrimSpace(line))
	require.NoError(t, err, line)
	pidfd, err := unix.PidfdOpen(pid, 0) // only ever signal this very process
	require.NoError(t, err)
	t.Cleanup(func() { _ = unix.PidfdSendSignal(pidfd, unix.SIGKILL, nil, 0); _ = unix.Close(pidfd) })
	require.NoError(t, child.Process.Kill())
	_ = child.Wait()
	require.Eventually(t, func() bool {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		return err != nil || strings.Contains(string(b), ") Z ")
	}, 5*time.Second, 20*time.Millisecond, "the probe's QEMU outlived the daemon")
}
