package cri_test

import (
	"os"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/unilet-dev/unilet/internal/testutil"
)

// qemuStatus returns /proc/<pid>/status of the daemon's only QEMU.
func qemuStatus(t *testing.T, d *daemon) string {
	t.Helper()
	var qs []testutil.QEMUProc
	require.Eventually(t, func() bool { qs = testutil.QEMUsUnder(d.stateDir); return len(qs) == 1 }, 10*time.Second, 20*time.Millisecond)
	b, err := os.ReadFile("/proc/" + strconv.Itoa(qs[0].Pid) + "/status")
	require.NoError(t, err)
	return string(b)
}

// Each live VM's QEMU has a uid of its own; --jail=false runs QEMU as root,
// unconfined, and says so loudly.
func TestJailPerVMAndOff(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "", "--jail-ids", "1500000000:4")
	pod1, _ := d.runVM(t, "vm-jail-a", "tick=100")
	pod2, _ := d.runVM(t, "vm-jail-b", "tick=100")
	var uids []string
	require.Eventually(t, func() bool { return len(testutil.QEMUsUnder(d.stateDir)) == 2 }, 10*time.Second, 20*time.Millisecond)
	for _, q := range testutil.QEMUsUnder(d.stateDir) {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(q.Pid) + "/status")
		require.NoError(t, err)
		m := regexp.MustCompile(`(?m)^Uid:\s+(\d+)`).FindStringSubmatch(string(b))
		require.NotNil(t, m)
		uids = append(uids, m[1])
	}
	require.NotEqual(t, uids[0], uids[1], "two VMs share a uid")
	// The shims keep only what they need (shim.Caps), with NoNewPrivs.
	for _, q := range testutil.QEMUsUnder(d.stateDir) {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(q.Pid) + "/status")
		require.NoError(t, err)
		ppid := regexp.MustCompile(`(?m)^PPid:\s+(\d+)`).FindStringSubmatch(string(b))[1]
		sh, err := os.ReadFile("/proc/" + ppid + "/status")
		require.NoError(t, err)
		for _, re := range []string{`(?m)^CapBnd:\s+00000000002011e0$`, `(?m)^CapEff:\s+00000000002011e0$`, `(?m)^NoNewPrivs:\s+1$`} {
			require.Regexp(t, re, string(sh), "the shim")
		}
	}
	for _, u := range uids {
		n, _ := strconv.Atoi(u)
		require.True(t, n >= 1500000000 && n < 1500000004, "uid %d outside --jail-ids", n)
	}
	d.must("rmp", "-f", pod1)
	d.must("rmp", "-f", pod2)

	off := startDaemon(t, "--upstream-endpoint", "", "--jail=false")
	off.runVM(t, "vm-unjailed", "tick=100")
	st := qemuStatus(t, off)
	require.Regexp(t, `(?m)^Uid:\s+0\s`, st)
	require.Regexp(t, `(?m)^Seccomp:\s+0$`, st)
	b, err := os.ReadFile(off.logFile)
	require.NoError(t, err)
	require.Contains(t, string(b), "THE JAIL IS OFF")
}
