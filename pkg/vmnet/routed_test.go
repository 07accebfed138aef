package vmnet

import (
	"bufio"
	"fmt"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"

	"github.com/unilet-dev/unilet/internal/testutil"
	"github.com/unilet-dev/unilet/pkg/netns"
)

func TestParseGuestNetwork(t *testing.T) {
	g, err := ParseGuestNetwork(DefaultGuestNetwork)
	require.NoError(t, err)
	require.Equal(t, "100.127.255.254/30", g.Addr.String())
	require.Equal(t, "100.127.255.253", g.Gateway.String())
	require.NoError(t, g.Validate())
	for _, bad := range []string{"", "10.0.0.1/30", "10.0.0.0/31", "fd00::/64", "10.0.0.0/7", "x", "127.0.0.0/8", "169.254.0.0/30", "224.0.0.0/30"} {
		_, err := ParseGuestNetwork(bad)
		require.Error(t, err, bad)
	}
	g.Gateway = netip.MustParseAddr("10.0.0.1")
	require.Error(t, g.Validate(), "a gateway outside the guest network")
	g, _ = ParseGuestNetwork(DefaultGuestNetwork)
	g.MAC = "ff:ff:ff:ff:ff:ff"
	require.Error(t, g.Validate(), "a broadcast MAC")
}

// testNS makes a network namespace that is removed when the test ends.
func testNS(t *testing.T, dir, name string) string {
	t.Helper()
	p, err := netns.Create(dir, name)
	require.NoError(t, err)
	t.Cleanup(func() { _ = netns.Remove(p) })
	return p
}

// veth makes a veth pair inside namespace a (a's end named aName, with
// address aAddr) whose peer bName moves into namespace b with bAddr; a
// default route via gw (if valid) is added in b.
func veth(t *testing.T, a, aName, aAddr, b, bName, bAddr string, bGateway string) {
	t.Helper()
	bf, err := os.Open(b)
	require.NoError(t, err)
	defer bf.Close()
	require.NoError(t, netns.Do(a, func() error {
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: aName}, PeerName: bName}); err != nil {
			return err
		}
		l, err := netlink.LinkByName(aName)
		if err != nil {
			return err
		}
		if aAddr != "" {
			addr, _ := netlink.ParseAddr(aAddr)
			if err := netlink.AddrAdd(l, addr); err != nil {
				return err
			}
		}
		if err := netlink.LinkSetUp(l); err != nil {
			return err
		}
		peer, err := netlink.LinkByName(bName)
		if err != nil {
			return err
		}
		return netlink.LinkSetNsFd(peer, int(bf.Fd()))
	}))
	require.NoError(t, netns.Do(b, func() error {
		l, err := netlink.LinkByName(bName)
		if err != nil {
			return err
		}
		addr, _ := netlink.ParseAddr(bAddr)
		if err := netlink.AddrAdd(l, addr); err != nil {
			return err
		}
		if bName == "g0" { // the guest's NIC has the guest network's fixed MAC
			hw, _ := net.ParseMAC(GuestMAC)
			if err := netlink.LinkSetHardwareAddr(l, hw); err != nil {
				return err
			}
		}
		if err := netlink.LinkSetUp(l); err != nil {
			return err
		}
		if lo, err := netlink.LinkByName("lo"); err == nil {
			_ = netlink.LinkSetUp(lo)
		}
		if bGateway == "" {
			return nil
		}
		return netlink.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Gw: net.ParseIP(bGateway)})
	}))
}

// listen opens a TCP listener inside namespace ns; each connection is
// answered with the remote address the listener saw.
func listen(t *testing.T, ns, addr string) {
	t.Helper()
	serve(t, ns, addr, func(c net.Conn) string { return c.RemoteAddr().(*net.TCPAddr).IP.String() })
}

// serve opens a TCP listener inside namespace ns; each connection is
// answered with answer's line.
func serve(t *testing.T, ns, addr string, answer func(net.Conn) string) {
	t.Helper()
	var l net.Listener
	require.NoError(t, netns.Do(ns, func() (err error) {
		l, err = net.Listen("tcp4", addr)
		return err
	}))
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			fmt.Fprintf(c, "%s\n", answer(c))
			c.Close()
		}
	}()
}

// seenBy dials addr from inside namespace ns and returns the source address
// the listener saw.
func seenBy(t *testing.T, ns, addr string) string {
	t.Helper()
	var c net.Conn
	require.NoError(t, netns.Do(ns, func() (err error) {
		c, err = net.DialTimeout("tcp4", addr, 5*time.Second)
		return err
	}))
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	require.NoError(t, err)
	return line[:len(line)-1]
}

// The routed pod network, with a veth standing in for the VM's tap and a
// namespace of its own for the guest: a client reaches the guest at the
// pod IP and the guest sees the client's own address; the guest's
// connections leave as the pod IP; setting up again changes nothing. Only
// namespaces the test makes are touched (needs root).
func TestRoutedTranslatesBothWays(t *testing.T) {
	testutil.NeedRoot(t, testutil.LaneUnit, "network namespaces")
	dir := t.TempDir()
	pod, client, guest := testNS(t, dir, "pod"), testNS(t, dir, "client"), testNS(t, dir, "guest")
	g, err := ParseGuestNetwork(DefaultGuestNetwork)
	require.NoError(t, err)
	// client 198.18.77.1 ── eth0 198.18.77.2 (pod) ── tap0 / g0 100.127.255.254 (guest)
	veth(t, client, "c0", "198.18.77.1/24", pod, "eth0", "198.18.77.2/24", "198.18.77.1")
	veth(t, pod, "tap0", "", guest, "g0", g.Addr.String(), g.Gateway.String())

	for round := 0; round < 2; round++ {
		r, err := SetupRouted(pod, "eth0", g)
		require.NoError(t, err)
		require.Equal(t, "198.18.77.2", r.PodIP.String())
	}
	require.NoError(t, netns.Do(pod, func() error {
		l, err := netlink.LinkByName("tap0")
		require.NoError(t, err)
		require.Equal(t, GatewayMAC, l.Attrs().HardwareAddr.String(), "every clone finds its gateway at the MAC it booted with")
		return nil
	}))
	listen(t, guest, ":8080")
	listen(t, client, "198.18.77.1:9090")
	require.Equal(t, "198.18.77.1", seenBy(t, client, "198.18.77.2:8080"), "inbound keeps the client's address and reaches the guest")
	require.Equal(t, "198.18.77.2", seenBy(t, guest, "198.18.77.1:9090"), "the guest's connections leave as the pod IP")
	// From inside the pod namespace (port-forward) the guest is dialled at
	// the pod IP.
	require.Equal(t, "198.18.77.2", seenBy(t, pod, "198.18.77.2:8080"))

	// A pod IP inside the guest network is refused.
	other := testNS(t, dir, "clash")
	veth(t, client, "c1", "", other, "eth0", "100.127.255.254/24", "")
	_, err = SetupRouted(other, "eth0", g)
	require.ErrorContains(t, err, "lies in the guest network")
}

// Several VMs in one pod, each a namespace of its own behind a veth
// standing in for its tap, all with the same guest address: each declared
// port reaches its VM, other ports the default one; the VMs reach each
// other at the pod IP (hairpin), each its own port too; both leave as the
// pod IP; the pod namespace reaches each by port; moving the default moves
// undeclared ports; a guest cannot send as another address.
func TestRoutedSeveralVMs(t *testing.T) {
	testutil.NeedRoot(t, testutil.LaneUnit, "network namespaces")
	dir := t.TempDir()
	pod, client := testNS(t, dir, "pod"), testNS(t, dir, "client")
	guests := []string{testNS(t, dir, "guest0"), testNS(t, dir, "guest1")}
	g, err := ParseGuestNetwork(DefaultGuestNetwork)
	require.NoError(t, err)
	veth(t, client, "c0", "198.18.78.1/24", pod, "eth0", "198.18.78.2/24", "198.18.78.1")
	for i, ns := range guests {
		veth(t, pod, TapName(i), "", ns, "g0", g.Addr.String(), g.Gateway.String())
	}
	_, err = SetupRouted(pod, "eth0", g)
	require.NoError(t, err)
	require.NoError(t, AddTap(pod, "eth0", 1, g))
	r := Routes{Default: 0, Members: []Member{{Index: 0, Ports: []Port{{"tcp", 8080}}}, {Index: 1, Ports: []Port{{"tcp", 9000}}}}}
	require.NoError(t, Route(pod, "eth0", g, r))
	require.NoError(t, Route(pod, "eth0", g, r), "routing again changes nothing")

	// Each listener answers with the source it saw; guest i listens on its
	// declared port, both on 7000 (undeclared).
	listen(t, guests[0], ":8080")
	listen(t, guests[1], ":9000")
	for i, ns := range guests {
		name := fmt.Sprint("guest", i)
		serve(t, ns, ":7000", func(net.Conn) string { return name })
	}
	listen(t, client, "198.18.78.1:9090")

	require.Equal(t, "198.18.78.1", seenBy(t, client, "198.18.78.2:8080"), "port 8080 reaches VM 0 with the client's address")
	require.Equal(t, "198.18.78.1", seenBy(t, client, "198.18.78.2:9000"), "port 9000 reaches VM 1")
	require.Equal(t, "guest0", seenBy(t, client, "198.18.78.2:7000"), "an undeclared port reaches the default VM")
	require.Equal(t, Alias(1).String(), seenBy(t, guests[1], "198.18.78.2:8080"), "VM 1 reaches VM 0 at the pod IP")
	require.Equal(t, Alias(0).String(), seenBy(t, guests[0], "198.18.78.2:9000"), "VM 0 reaches VM 1 at the pod IP")
	require.Equal(t, Alias(1).String(), seenBy(t, guests[1], "198.18.78.2:9000"), "VM 1 reaches its own port at the pod IP")
	for _, ns := range guests {
		require.Equal(t, "198.18.78.2", seenBy(t, ns, "198.18.78.1:9090"), "each VM leaves as the pod IP")
	}
	require.Equal(t, "198.18.78.2", seenBy(t, pod, "198.18.78.2:9000"), "the pod namespace (port-forward) reaches VM 1 by port")
	require.Equal(t, "guest0", seenBy(t, pod, "198.18.78.2:7000"))

	r.Default = 1
	require.NoError(t, Route(pod, "eth0", g, r))
	require.Equal(t, "guest1", seenBy(t, client, "198.18.78.2:7000"), "the default moved")
	require.Equal(t, "198.18.78.1", seenBy(t, client, "198.18.78.2:8080"), "a declared port stays with its VM")

	// A guest sending from another address is dropped at its tap.
	require.NoError(t, netns.Do(guests[1], func() error {
		l, err := netlink.LinkByName("g0")
		if err != nil {
			return err
		}
		a, _ := netlink.ParseAddr(Alias(0).String() + "/32")
		return netlink.AddrAdd(l, a)
	}))
	require.NoError(t, netns.Do(guests[1], func() error {
		d := net.Dialer{Timeout: time.Second, LocalAddr: &net.TCPAddr{IP: Alias(0).AsSlice()}}
		c, err := d.Dial("tcp4", "198.18.78.1:9090")
		if err == nil {
			c.Close()
			return fmt.Errorf("a spoofed source got through")
		}
		return nil
	}))

	require.Error(t, Route(pod, "eth0", g, Routes{Default: 0, Members: []Member{{Index: 0, Ports: []Port{{"tcp", 80}}}, {Index: 1, Ports: []Port{{"tcp", 80}}}}}))
	require.Error(t, Route(pod, "eth0", g, Routes{Default: 2, Members: []Member{{Index: 0}}}))
	require.Error(t, AddTap(pod, "eth0", MaxVMs, g))
}

func TestTapIndex(t *testing.T) {
	for _, i := range []int{0, 1, 9, 10, MaxVMs - 1} {
		n, ok := TapIndex(TapName(i))
		require.True(t, ok)
		require.Equal(t, i, n)
	}
	for _, bad := range []string{"", "tap", "tap01", "tap-1", "eth0", "tap250", "tap1x"} {
		_, ok := TapIndex(bad)
		require.False(t, ok, bad)
	}
	require.Equal(t, "100.127.254.1", Alias(0).String())
	_, err := ParseGuestNetwork("100.127.254.0/30")
	require.ErrorContains(t, err, "aliases")
}

// FuzzParseGuestNetwork: whatever is given, a guest network that parses is
// one a pod can use: valid, the gateway the first address, the guest the
// second.
func FuzzParseGuestNetwork(f *testing.F) {
	for _, s := range []string{DefaultGuestNetwork, "10.0.0.0/8", "192.168.1.0/29", "127.0.0.0/30", "::/0", "1.2.3.4/30"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		g, err := ParseGuestNetwork(s)
		if err != nil {
			return
		}
		if err := g.Validate(); err != nil {
			t.Fatalf("%q parsed to an invalid network: %v", s, err)
		}
		if g.Gateway.Next() != g.Addr.Addr() || g.Addr.Masked().Addr().Next() != g.Gateway {
			t.Fatalf("%q: gateway %s, guest %s", s, g.Gateway, g.Addr)
		}
	})
}
