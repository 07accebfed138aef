package vmnet

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"os"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/unilet-dev/unilet/pkg/netns"
)

// Guest is the network a routed VM NIC sees: the same fixed address,
// gateway and MAC for every VM, so a VM restored from a template or
// resumed from a snapshot keeps a network that works in any pod. The pod's
// namespace translates 1:1 between the pod IP and the guest address
// (Firecracker's "network for clones"): inbound connections keep the
// client's source address, the guest's own connections leave as the pod
// IP. The guest never sees the pod IP.
type Guest struct {
	Addr    netip.Prefix `json:"addr"`    // the guest's address and prefix length
	Gateway netip.Addr   `json:"gateway"` // the tap's address in the pod namespace
	MAC     string       `json:"mac"`
}

// DefaultGuestNetwork is the guest network of every VM unless the daemon is
// told another: four addresses at the top of the shared address space
// (RFC 6598), which only these four destinations can collide with.
const DefaultGuestNetwork = "100.127.255.252/30"

// GuestMAC is every routed guest NIC's MAC (locally administered).
const GuestMAC = "02:75:6e:69:6c:01"

// GatewayMAC is every routed tap's MAC, the guest's gateway: a guest
// restored from a template finds its gateway at the MAC it learned at boot
// (Firecracker's "network for clones" does the same), instead of sending
// to a MAC no tap has until its ARP entry goes stale.
const GatewayMAC = "02:75:6e:69:6c:00"

// ParseGuestNetwork turns an IPv4 network of at least 4 addresses (at most
// /30) into the guest network: the gateway is its first host address, the
// guest its second.
func ParseGuestNetwork(s string) (Guest, error) {
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return Guest{}, fmt.Errorf("guest network %q: %w", s, err)
	}
	if !p.Addr().Is4() || p.Bits() > 30 || p.Bits() < 8 || p.Masked() != p {
		return Guest{}, fmt.Errorf("guest network %q: want an IPv4 network address from /8 to /30 (e.g. %s)", s, DefaultGuestNetwork)
	}
	gw := p.Addr().Next()
	g := Guest{Addr: netip.PrefixFrom(gw.Next(), p.Bits()), Gateway: gw, MAC: GuestMAC}
	if err := g.Validate(); err != nil {
		return Guest{}, fmt.Errorf("guest network %q: not a unicast network (loopback, link-local and multicast are not routed)", s)
	}
	return g, nil
}

// Validate checks a guest network read from disk.
func (g Guest) Validate() error {
	if !g.Addr.IsValid() || !g.Addr.Addr().Is4() || !g.Gateway.Is4() || g.Addr.Bits() > 30 || g.Addr.Bits() < 8 ||
		!g.Addr.Contains(g.Gateway) || g.Addr.Addr() == g.Gateway || !g.Addr.Addr().IsGlobalUnicast() || !g.Gateway.IsGlobalUnicast() {
		return fmt.Errorf("guest network %s via %s is not a routed guest network", g.Addr, g.Gateway)
	}
	if hw, err := net.ParseMAC(g.MAC); err != nil || len(hw) != 6 || hw[0]&1 != 0 {
		return fmt.Errorf("guest MAC %q is not a unicast Ethernet address", g.MAC)
	}
	return nil
}

// Routed is what SetupRouted made: the pod's IPv4 address the guest is
// reached by, and the MTU of the pod's interface (the tap's too).
type Routed struct {
	PodIP netip.Addr
	MTU   int
}

// nftTable is unilet's table in each pod namespace.
const nftTable = "unilet"

// SetupRouted creates the persistent tap device tapName in the namespace at
// path as the guest's gateway (g.Gateway) and translates between the pod
// IPv4 address of ifName and g.Addr with netfilter NAT in that namespace:
// DNAT of what arrives on ifName for the pod IP, SNAT of what the guest
// sends out of ifName. Calling it again is harmless (the table is rebuilt).
func SetupRouted(path, ifName, tapName string, g Guest) (Routed, error) {
	var out Routed
	if err := g.Validate(); err != nil {
		return out, err
	}
	err := netns.Do(path, func() error {
		eth, err := netlink.LinkByName(ifName)
		if err != nil {
			return fmt.Errorf("CNI interface %s: %w", ifName, err)
		}
		out.MTU = eth.Attrs().MTU
		if out.PodIP, err = podIPv4(eth); err != nil {
			return err
		}
		if g.Addr.Contains(out.PodIP) {
			return fmt.Errorf("the pod IP %s lies in the guest network %s; give unilet another --guest-network", out.PodIP, g.Addr.Masked())
		}
		if err := guestGateway(tapName, out.MTU, g); err != nil {
			return err
		}
		if err := os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644); err != nil {
			return fmt.Errorf("enable forwarding in the pod namespace: %w", err)
		}
		return translate(ifName, out.PodIP, g.Addr.Addr())
	})
	return out, err
}

// podIPv4 is the first global unicast IPv4 address of l.
func podIPv4(l netlink.Link) (netip.Addr, error) {
	addrs, err := netlink.AddrList(l, netlink.FAMILY_V4)
	if err != nil {
		return netip.Addr{}, err
	}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP.To4()); ok && ip.IsGlobalUnicast() {
			return ip, nil
		}
	}
	return netip.Addr{}, fmt.Errorf("the pod's interface %s has no IPv4 address; a routed guest needs one", l.Attrs().Name)
}

// ensureTap creates the tap device name (multi-queue off, vnet headers on,
// as QEMU opens it) unless it exists, and brings it up with mtu.
func ensureTap(name string, mtu int) (netlink.Link, error) {
	tap, err := netlink.LinkByName(name)
	if err != nil {
		t := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: name, MTU: mtu},
			Mode: netlink.TUNTAP_MODE_TAP, Flags: netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR | netlink.TUNTAP_ONE_QUEUE}
		if err := netlink.LinkAdd(t); err != nil {
			return nil, fmt.Errorf("create %s: %w", name, err)
		}
		if tap, err = netlink.LinkByName(name); err != nil {
			return nil, err
		}
	}
	if err := netlink.LinkSetMTU(tap, mtu); err != nil {
		return nil, fmt.Errorf("set %s MTU: %w", name, err)
	}
	if err := netlink.LinkSetUp(tap); err != nil {
		return nil, fmt.Errorf("bring %s up: %w", name, err)
	}
	return tap, nil
}

// translate (re)builds unilet's nftables table in the current namespace:
//
//	table ip unilet {
//	  chain pre  { type nat hook prerouting priority dstnat; iifname IF ip daddr POD dnat to GUEST }
//	  chain post { type nat hook postrouting priority srcnat; oifname IF ip saddr GUEST snat to POD }
//	}
func translate(ifName string, pod, guest netip.Addr) error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	t := &nftables.Table{Family: nftables.TableFamilyIPv4, Name: nftTable}
	if tables, err := c.ListTablesOfFamily(nftables.TableFamilyIPv4); err == nil {
		for _, old := range tables {
			if old.Name == nftTable {
				c.DelTable(old)
			}
		}
	}
	c.AddTable(t)
	pre := c.AddChain(&nftables.Chain{Name: "pre", Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityNATDest})
	post := c.AddChain(&nftables.Chain{Name: "post", Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource})
	c.AddRule(&nftables.Rule{Table: t, Chain: pre, Exprs: natRule(expr.MetaKeyIIFNAME, ifName, ipv4Daddr, pod, guest, expr.NATTypeDestNAT)})
	c.AddRule(&nftables.Rule{Table: t, Chain: post, Exprs: natRule(expr.MetaKeyOIFNAME, ifName, ipv4Saddr, guest, pod, expr.NATTypeSourceNAT)})
	if err := c.Flush(); err != nil {
		return fmt.Errorf("install the address translation (nftables NAT; needs nf_tables and nf_nat in the kernel): %w", err)
	}
	return nil
}

// Offsets of the IPv4 header's addresses.
const (
	ipv4Saddr = 12
	ipv4Daddr = 16
)

// natRule matches packets on interface ifName (iif or oif by key) whose
// address at offset equals match and rewrites it to to.
func natRule(key expr.MetaKey, ifName string, offset uint32, match, to netip.Addr, typ expr.NATType) []expr.Any {
	name := make([]byte, unix.IFNAMSIZ)
	copy(name, ifName)
	return []expr.Any{
		&expr.Meta{Key: key, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: name},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: 4},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: match.AsSlice()},
		&expr.Immediate{Register: 1, Data: to.AsSlice()},
		&expr.NAT{Type: typ, Family: unix.NFPROTO_IPV4, RegAddrMin: 1},
	}
}

// SetupGuestTap creates the tap device tapName in the namespace at path as
// the guest's gateway only, with no translation: the network of a VM that
// is booted to become a template (its guest network must be the one its
// clones get in their pods).
func SetupGuestTap(path, tapName string, g Guest) error {
	if err := g.Validate(); err != nil {
		return err
	}
	return netns.Do(path, func() error { return guestGateway(tapName, 1500, g) })
}

// guestGateway makes the tap tapName (MTU mtu) the guest's gateway, in the
// current namespace.
func guestGateway(tapName string, mtu int, g Guest) error {
	tap, err := ensureTap(tapName, mtu)
	if err != nil {
		return err
	}
	// The guest network is IPv4: no IPv6 chatter (router and multicast
	// listener reports) may reach the tap, where it would wake a VM that
	// scale-to-zero suspended.
	_ = os.WriteFile("/proc/sys/net/ipv6/conf/"+tapName+"/disable_ipv6", []byte("1"), 0o644)
	if gwMAC, _ := net.ParseMAC(GatewayMAC); !bytes.Equal(tap.Attrs().HardwareAddr, gwMAC) {
		if err := netlink.LinkSetHardwareAddr(tap, gwMAC); err != nil {
			return fmt.Errorf("MAC of %s: %w", tapName, err)
		}
	}
	gw := &netlink.Addr{IPNet: &net.IPNet{IP: g.Gateway.AsSlice(), Mask: net.CIDRMask(g.Addr.Bits(), 32)}}
	if err := netlink.AddrReplace(tap, gw); err != nil {
		return fmt.Errorf("address %s on %s: %w", g.Gateway, tapName, err)
	}
	// The guest's MAC is fixed: no ARP is needed (nor waits) to reach it.
	hw, _ := net.ParseMAC(g.MAC)
	if err := netlink.NeighSet(&netlink.Neigh{LinkIndex: tap.Attrs().Index, Family: netlink.FAMILY_V4, State: netlink.NUD_PERMANENT,
		IP: g.Addr.Addr().AsSlice(), HardwareAddr: hw}); err != nil {
		return fmt.Errorf("neighbour entry of the guest on %s: %w", tapName, err)
	}
	return nil
}
