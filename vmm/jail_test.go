package vmm

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/unilet-dev/unilet/internal/testutil"
	"github.com/unilet-dev/unilet/vmm/jail"
)

// The test binary doubles as the jail helper, as unilet-shim does.
func TestMain(m *testing.M) {
	if jail.IsHelper() {
		jail.Main()
	}
	os.Exit(m.Run())
}

// procStatus returns the fields of /proc/<pid>/status.
func procStatus(t *testing.T, pid int) map[string]string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	require.NoError(t, err)
	out := map[string]string{}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok {
			out[k] = strings.TrimSpace(v)
		}
	}
	return out
}

// A jailed QEMU runs as its own uid and gid with no capabilities at all,
// NoNewPrivs and QEMU's seccomp filter, in a root of its own that holds
// only what it needs; the guest boots and its volume works.
func TestJailedVM(t *testing.T) {
	testutil.NeedRoot(t, testutil.LaneUnit, "mount namespaces, uid switch")
	k := testKernel(t)
	spec := bootSpec(t, k, "tick=50")
	vol := t.TempDir()
	require.NoError(t, os.Chmod(vol, 0o777))
	spec.Machine.Shares = []Share{{Tag: "fs1", HostPath: vol}, {Tag: "fs2", HostPath: t.TempDir(), ReadOnly: true}}
	const id = 1<<30 + 4242
	spec.Jail = &JailSpec{UID: id, GID: id, Groups: []uint32{id + 1}}
	vm, err := StartVM(spec)
	require.NoError(t, err)
	defer func() { vm.Kill(); <-vm.Done() }()
	waitLog(t, spec.LogPath, "tick 2")

	st := procStatus(t, vm.Pid())
	want := strconv.Itoa(id)
	require.Equal(t, strings.Repeat(want+"\t", 3)+want, st["Uid"])
	require.Equal(t, strings.Repeat(want+"\t", 3)+want, st["Gid"])
	require.Equal(t, strconv.Itoa(id+1), st["Groups"])
	for _, f := range []string{"CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"} {
		require.Equal(t, "0000000000000000", st[f], f)
	}
	require.Equal(t, "1", st["NoNewPrivs"])
	require.Equal(t, "2", st["Seccomp"])

	// Its root (seen from here through /proc/<pid>/root) holds only the
	// jail's tree: no /etc/shadow, no host directory, no other VM.
	root := "/proc/" + strconv.Itoa(vm.Pid()) + "/root"
	ents, err := os.ReadDir(root)
	require.NoError(t, err)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	for _, n := range names {
		require.Contains(t, []string{"usr", "etc", "dev", "proc", "vol", "kernel", "lib", "lib64", "bin", "sbin"}, n)
	}
	_, err = os.Stat(filepath.Join(root, "etc/shadow"))
	require.True(t, os.IsNotExist(err), "/etc/shadow is visible in the jail: %v", err)
	etc, _ := os.ReadDir(filepath.Join(root, "etc"))
	require.Len(t, etc, 1, "only ld.so.cache in the jail's /etc")
	_, err = os.Stat(filepath.Join(root, filepath.Dir(spec.StateDir)))
	require.True(t, os.IsNotExist(err), "the VM's state directory is visible in the jail")
	devs, _ := os.ReadDir(filepath.Join(root, "dev"))
	require.Len(t, devs, 5, "null, zero, random, urandom, fd (no /dev/kvm under TCG)")
	// Its /proc shows the processes of its own uid only (as seen by it:
	// root here sees everything), and no system files.
	mi, err := os.ReadFile("/proc/" + strconv.Itoa(vm.Pid()) + "/mountinfo")
	require.NoError(t, err)
	var procMount string
	for _, l := range strings.Split(string(mi), "\n") {
		if f := strings.Fields(l); len(f) > 4 && f[4] == "/proc" {
			procMount = l
		}
	}
	require.Contains(t, procMount, "hidepid=invisible")
	require.Contains(t, procMount, "subset=pid")
	_, err = os.Stat(filepath.Join(root, "proc/sys"))
	require.True(t, os.IsNotExist(err), "/proc/sys is visible in the jail")
	// Nothing of the jail leaks into the host's mount table.
	mounts, err := os.ReadFile("/proc/self/mountinfo")
	require.NoError(t, err)
	require.NotContains(t, string(mounts), filepath.Join(spec.StateDir, JailRoot))

	// QMP (a handed-over socket) works: the power button stops the guest.
	require.Equal(t, ReasonCompleted, vm.Stop(10*time.Second).Reason)
}

// The jail refuses uid or gid 0.
func TestJailNeedsUnprivilegedIDs(t *testing.T) {
	k := testKernel(t)
	spec := bootSpec(t, k)
	spec.Jail = &JailSpec{UID: 0, GID: 5}
	_, err := StartVM(spec)
	require.ErrorContains(t, err, "non-zero uid")
}

// A volume's host directory swapped for a symlink after the container was
// created (its path resolved and checked then) is not followed: the start
// fails naming it, and the symlink's target (a canary of this test) is
// bound nowhere.
func TestJailRefusesAVolumeSwappedForASymlink(t *testing.T) {
	testutil.NeedRoot(t, testutil.LaneUnit, "mount namespaces, uid switch")
	k := testKernel(t)
	spec := bootSpec(t, k, "tick=50")
	base := t.TempDir()
	vol, canary := filepath.Join(base, "vol"), filepath.Join(base, "canary")
	require.NoError(t, os.Mkdir(canary, 0o777))
	require.NoError(t, os.WriteFile(filepath.Join(canary, "secret"), []byte("x"), 0o600))
	require.NoError(t, os.Symlink(canary, vol)) // swapped in after the check
	spec.Machine.Shares = []Share{{Tag: "fs1", HostPath: vol}}
	const id = 1<<30 + 4243
	spec.Jail = &JailSpec{UID: id, GID: id}
	vm, err := StartVM(spec)
	if err == nil {
		vm.Kill()
		<-vm.Done()
		t.Fatal("a volume swapped for a symlink was bound")
	}
	require.ErrorContains(t, err, "no longer the directory checked")
}
