package vmm

import (
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/unilet-dev/unilet/internal/testutil"
	"github.com/unilet-dev/unilet/pkg/netns"
	"github.com/unilet-dev/unilet/pkg/vmnet"
)

func TestTapBytes(t *testing.T) {
	dev := []byte(`Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:     100       1    0    0    0     0          0         0      100       1    0    0    0     0       0          0
  tap0:    1234       9    0    0    0     0          0         0     4321      10    0    0    0     0       0          0
`)
	n, err := tapBytes(dev, "tap0")
	require.NoError(t, err)
	require.Equal(t, uint64(5555), n)
	_, err = tapBytes(dev, "eth0")
	require.Error(t, err)
	_, err = tapBytes([]byte("tap0: x y"), "tap0")
	require.Error(t, err)
}

// netVM is the test kernel in echo mode with a NIC on a tap in a namespace
// of the test's own, the tap being the guest network's gateway.
func netVM(t *testing.T, idle IdleSpec) (VMSpec, string) {
	t.Helper()
	testutil.NeedRoot(t, testutil.LaneUnit, "a network namespace and a tap")
	ns, err := netns.Create(t.TempDir(), "vm")
	require.NoError(t, err)
	t.Cleanup(func() { _ = netns.Remove(ns) })
	g, err := vmnet.ParseGuestNetwork(vmnet.DefaultGuestNetwork)
	require.NoError(t, err)
	require.NoError(t, vmnet.SetupGuestTap(ns, "tap0", g))
	spec := bootSpec(t, testKernel(t), "echo")
	spec.Machine.NICs = []NIC{{Tap: "tap0", NetNS: ns, MAC: g.MAC}}
	spec.Idle = &idle
	return spec, ns
}

func waitSuspended(t *testing.T, v *VM, want bool, msg string) {
	t.Helper()
	require.Eventually(t, func() bool { s, _ := v.Suspended(); return s == want }, 10*time.Second, 5*time.Millisecond, msg)
}

// Scale-to-zero: a VM that sees no traffic for its cooldown is suspended
// and uses no CPU; console input and a packet on its tap each wake it, and
// what woke it is delivered.
func TestScaleToZeroSuspendsAndWakes(t *testing.T) {
	spec, ns := netVM(t, IdleSpec{Cooldown: 300 * time.Millisecond})
	v, err := StartVM(spec)
	require.NoError(t, err)
	defer v.Kill()
	waitLog(t, spec.LogPath, "echo: ready")
	waitSuspended(t, v, true, "an idle VM is suspended after its cooldown")
	cpu := v.cpuNanos()
	time.Sleep(time.Second)
	require.Less(t, v.cpuNanos()-cpu, uint64(20*time.Millisecond), "a suspended VM uses (next to) no CPU")

	_, err = v.writeConsole([]byte("woken-by-input\r"))
	require.NoError(t, err)
	waitLog(t, spec.LogPath, "woken-by-input", "console input wakes the VM and reaches the guest")
	require.Equal(t, 1, v.Wakes())

	waitSuspended(t, v, true, "suspended again after the cooldown")
	// A packet for the guest (from the pod's namespace) wakes it.
	require.NoError(t, netns.Do(ns, func() error {
		c, err := net.Dial("udp4", "100.127.255.254:9")
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = c.Write([]byte("wake"))
		return err
	}))
	waitSuspended(t, v, false, "a packet wakes the VM")
	require.Equal(t, 2, v.Wakes())
}

// Autostart off: the guest does not run until it is woken.
func TestAutostartOffWaitsForTheFirstWake(t *testing.T) {
	spec, _ := netVM(t, IdleSpec{Paused: true})
	v, err := StartVM(spec)
	require.NoError(t, err)
	defer v.Kill()
	s, _ := v.Suspended()
	require.True(t, s)
	time.Sleep(500 * time.Millisecond)
	b, _ := os.ReadFile(spec.LogPath)
	require.NotContains(t, string(b), "booted", "the guest ran before its first wake")
	_, err = v.writeConsole([]byte("x"))
	require.NoError(t, err)
	waitLog(t, spec.LogPath, "unilet-testkernel: booted")
	waitSuspended(t, v, false, "running once woken")
}

// FuzzTapBytes: /proc/net/dev of any shape is parsed without panicking,
// and counters are only ever read from the named interface's own line.
func FuzzTapBytes(f *testing.F) {
	f.Add([]byte("  tap0:    1234       9    0    0    0     0          0         0     4321      10    0    0    0     0       0          0\n"), "tap0")
	f.Add([]byte("tap0: 1 2 3\n"), "tap0")
	f.Add([]byte("x:y:z\n"), "x")
	f.Fuzz(func(t *testing.T, b []byte, name string) {
		if _, err := tapBytes(b, name); err != nil {
			return
		}
		for _, l := range strings.Split(string(b), "\n") {
			if iface, _, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(iface) == name {
				return
			}
		}
		t.Fatalf("counters of %q found in %q, which has no such line", name, b)
	})
}
