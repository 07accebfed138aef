package vmnet

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"

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
	if p.Overlaps(aliasNet) {
		return Guest{}, fmt.Errorf("guest network %q overlaps unilet's VM aliases %s (the pod namespace's own addresses for its VMs)", s, AliasNetwork)
	}
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

// routable: a valid guest network apart from the VM aliases (a record
// may hold one that is not: a pod keeps the rules it was made with).
func (g Guest) routable() error {
	if err := g.Validate(); err != nil {
		return err
	}
	if g.Addr.Masked().Overlaps(aliasNet) {
		return fmt.Errorf("guest network %s overlaps unilet's VM aliases %s; the pod keeps the routing it was made with", g.Addr, AliasNetwork)
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

// AliasNetwork is where the pod namespace sees its VMs: every guest has the
// same address (Guest.Addr) on its own tap, and the namespace rewrites it,
// statelessly at the tap, to the alias of that tap — VM i (tap i) is
// 100.127.254.(i+1) — so conntrack, NAT and routing tell the VMs apart.
// No guest ever sees its own alias.
const AliasNetwork = "100.127.254.0/24"

// MaxVMs is how many VMs (taps) one pod namespace can hold.
const MaxVMs = 250

var aliasNet = netip.MustParsePrefix(AliasNetwork)

// Alias is the address the pod namespace knows VM index by.
func Alias(index int) netip.Addr {
	a := aliasNet.Addr().As4()
	a[3] = byte(index + 1)
	return netip.AddrFrom4(a)
}

// TapName is the tap device of VM index in the pod namespace.
func TapName(index int) string { return "tap" + strconv.Itoa(index) }

// TapIndex is the index of a tap named by TapName.
func TapIndex(name string) (int, bool) {
	n, ok := strings.CutPrefix(name, "tap")
	if !ok || n == "" || (len(n) > 1 && n[0] == '0') {
		return 0, false
	}
	i, err := strconv.Atoi(n)
	if err != nil || i < 0 || i >= MaxVMs {
		return 0, false
	}
	return i, true
}

// A Port is a port a container declares (Kubernetes' containerPort).
type Port struct {
	Proto string // "tcp", "udp" or "sctp"
	Port  uint16
}

func (p Port) String() string { return strconv.Itoa(int(p.Port)) + "/" + p.Proto }

// protoNumber is the IP protocol number of a Port's protocol.
func protoNumber(proto string) (byte, bool) {
	switch proto {
	case "tcp":
		return unix.IPPROTO_TCP, true
	case "udp":
		return unix.IPPROTO_UDP, true
	case "sctp":
		return unix.IPPROTO_SCTP, true
	}
	return 0, false
}

// A Member is one VM of the pod: its tap's index and the ports it declares.
type Member struct {
	Index int
	Ports []Port
}

// Routes says which VM receives what arrives for the pod IP: a declared
// port goes to the VM that declares it, anything else to Default (-1:
// nowhere, the namespace answers itself).
type Routes struct {
	Default int
	Members []Member
}

// Single is the routes of a pod with one VM, on tap 0: everything to it.
var Single = Routes{Default: 0, Members: []Member{{Index: 0}}}

// Validate refuses routes the namespace cannot carry: an index out of
// range or twice, a port declared twice, a default no member has.
func (r Routes) Validate() error {
	seen := map[int]bool{}
	ports := map[Port]int{}
	for _, m := range r.Members {
		if m.Index < 0 || m.Index >= MaxVMs || seen[m.Index] {
			return fmt.Errorf("VM index %d is out of range or repeated", m.Index)
		}
		seen[m.Index] = true
		for _, p := range m.Ports {
			if _, ok := protoNumber(p.Proto); !ok || p.Port == 0 {
				return fmt.Errorf("port %s is not a TCP, UDP or SCTP port", p)
			}
			if other, dup := ports[p]; dup && other != m.Index {
				return fmt.Errorf("port %s is declared by VMs %d and %d", p, other, m.Index)
			}
			ports[p] = m.Index
		}
	}
	if r.Default >= 0 && !seen[r.Default] {
		return fmt.Errorf("the default VM %d is not a member", r.Default)
	}
	return nil
}

// Equal reports whether two routes install the same rules.
func (r Routes) Equal(o Routes) bool {
	return r.Default == o.Default && slices.EqualFunc(r.Members, o.Members, func(a, b Member) bool {
		return a.Index == b.Index && slices.Equal(a.Ports, b.Ports)
	})
}

// SetupRouted creates the persistent tap device of VM 0 in the namespace
// at path as the guest's gateway (g.Gateway) and routes the pod IPv4
// address of ifName to it (Single). Calling it again is harmless (the
// table is rebuilt).
func SetupRouted(path, ifName string, g Guest) (Routed, error) {
	var out Routed
	if err := g.routable(); err != nil {
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
		if g.Addr.Contains(out.PodIP) || aliasNet.Contains(out.PodIP) {
			return fmt.Errorf("the pod IP %s lies in the guest network %s or unilet's VM aliases %s; give unilet another --guest-network or the pods another subnet",
				out.PodIP, g.Addr.Masked(), AliasNetwork)
		}
		if err := vmGateway(0, out.MTU, g); err != nil {
			return err
		}
		if err := os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644); err != nil {
			return fmt.Errorf("enable forwarding in the pod namespace: %w", err)
		}
		return translate(ifName, out.PodIP, g.Addr.Addr(), Single, true)
	})
	return out, err
}

// AddTap creates the tap device of VM index (index > 0) in the routed pod
// namespace at path, with ifName's MTU, as the guest's gateway: the same
// gateway address and MAC as every tap, so each guest — booted or cloned
// from a template — finds its network where it expects it. Nothing is
// routed to it until Route says so. Calling it again is harmless.
func AddTap(path, ifName string, index int, g Guest) error {
	if err := g.routable(); err != nil {
		return err
	}
	if index <= 0 || index >= MaxVMs {
		return fmt.Errorf("VM index %d is out of range (1..%d)", index, MaxVMs-1)
	}
	return netns.Do(path, func() error {
		eth, err := netlink.LinkByName(ifName)
		if err != nil {
			return fmt.Errorf("CNI interface %s: %w", ifName, err)
		}
		return vmGateway(index, eth.Attrs().MTU, g)
	})
}

// Route rebuilds the routing of the pod IP of ifName to the pod's VMs (the
// chains of unilet's table but the wake rules', which stay).
func Route(path, ifName string, g Guest, r Routes) error {
	if err := g.routable(); err != nil {
		return err
	}
	if err := r.Validate(); err != nil {
		return err
	}
	return netns.Do(path, func() error {
		eth, err := netlink.LinkByName(ifName)
		if err != nil {
			return fmt.Errorf("CNI interface %s: %w", ifName, err)
		}
		pod, err := podIPv4(eth)
		if err != nil {
			return err
		}
		return translate(ifName, pod, g.Addr.Addr(), r, false)
	})
}

// vmGateway makes tap index the gateway of its guest (guestGateway) and
// routes the VM's alias to it.
func vmGateway(index, mtu int, g Guest) error {
	name := TapName(index)
	if err := guestGateway(name, mtu, g); err != nil {
		return err
	}
	tap, err := netlink.LinkByName(name)
	if err != nil {
		return err
	}
	// Hairpin traffic leaves by the tap it came in by; it is no redirect.
	_ = os.WriteFile("/proc/sys/net/ipv4/conf/"+name+"/send_redirects", []byte("0"), 0o644)
	alias := Alias(index)
	if err := netlink.RouteReplace(&netlink.Route{LinkIndex: tap.Attrs().Index, Scope: netlink.SCOPE_LINK,
		Dst: &net.IPNet{IP: alias.AsSlice(), Mask: net.CIDRMask(32, 32)}}); err != nil {
		return fmt.Errorf("route VM %d's alias %s to %s: %w", index, alias, name, err)
	}
	return nil
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

// translate (re)builds unilet's chains in the current namespace, for pod
// IP POD, guest address GUEST, and VM i's alias A_i on tap i:
//
//	table ip unilet {
//	  chain raw     { type filter hook prerouting priority raw;              # before conntrack
//	                  iifname tap_i ip saddr GUEST ip saddr set A_i accept; iifname tap_i drop }
//	  chain pre     { type nat hook prerouting priority dstnat;
//	                  ip daddr POD PROTO dport PORT dnat to A_i  (a declared port of VM i)
//	                  ip daddr POD dnat to A_default }
//	  chain out     { type nat hook output priority dstnat; the same }    # port-forward, from inside
//	  chain post    { type nat hook postrouting priority srcnat; oifname IF ip saddr A_i snat to POD }
//	  chain deliver { type filter hook postrouting priority 300;          # after NAT
//	                  oifname tap_i ip daddr A_i ip daddr set GUEST }
//	}
//
// A port VM default declares needs no rule of its own. fresh drops the
// table first (a new pod); otherwise only these chains are rebuilt and the
// wake chains of running VMs stay.
func translate(ifName string, pod, guest netip.Addr, r Routes, fresh bool) error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	t := &nftables.Table{Family: nftables.TableFamilyIPv4, Name: nftTable}
	if fresh {
		if tables, err := c.ListTablesOfFamily(nftables.TableFamilyIPv4); err == nil {
			for _, old := range tables {
				if old.Name == nftTable {
					c.DelTable(old)
				}
			}
		}
	}
	c.AddTable(t)
	chain := func(name string, typ nftables.ChainType, hook *nftables.ChainHook, prio *nftables.ChainPriority) *nftables.Chain {
		ch := c.AddChain(&nftables.Chain{Name: name, Table: t, Type: typ, Hooknum: hook, Priority: prio})
		c.FlushChain(ch)
		return ch
	}
	deliverPrio := nftables.ChainPriority(300)
	raw := chain("raw", nftables.ChainTypeFilter, nftables.ChainHookPrerouting, nftables.ChainPriorityRaw)
	pre := chain("pre", nftables.ChainTypeNAT, nftables.ChainHookPrerouting, nftables.ChainPriorityNATDest)
	out := chain("out", nftables.ChainTypeNAT, nftables.ChainHookOutput, nftables.ChainPriorityNATDest)
	post := chain("post", nftables.ChainTypeNAT, nftables.ChainHookPostrouting, nftables.ChainPriorityNATSource)
	deliver := chain("deliver", nftables.ChainTypeFilter, nftables.ChainHookPostrouting, &deliverPrio)
	for _, m := range r.Members {
		tap, alias := TapName(m.Index), Alias(m.Index)
		c.AddRule(&nftables.Rule{Table: t, Chain: raw, Exprs: rewrite(expr.MetaKeyIIFNAME, tap, ipv4Saddr, guest, alias)})
		c.AddRule(&nftables.Rule{Table: t, Chain: raw, Exprs: append(ifMatch(expr.MetaKeyIIFNAME, tap), &expr.Verdict{Kind: expr.VerdictDrop})})
		c.AddRule(&nftables.Rule{Table: t, Chain: post, Exprs: natRule(expr.MetaKeyOIFNAME, ifName, ipv4Saddr, alias, pod, expr.NATTypeSourceNAT)})
		c.AddRule(&nftables.Rule{Table: t, Chain: deliver, Exprs: rewrite(expr.MetaKeyOIFNAME, tap, ipv4Daddr, alias, guest)})
		if m.Index == r.Default {
			continue
		}
		for _, p := range m.Ports {
			for _, ch := range []*nftables.Chain{pre, out} {
				c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: portDNAT(pod, p, alias)})
			}
		}
	}
	if r.Default >= 0 {
		for _, ch := range []*nftables.Chain{pre, out} {
			c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: portDNAT(pod, Port{}, Alias(r.Default))})
		}
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("install the address translation (nftables NAT; needs nf_tables and nf_nat in the kernel): %w", err)
	}
	return nil
}

// ifMatch matches packets on interface ifName (iif or oif by key).
func ifMatch(key expr.MetaKey, ifName string) []expr.Any {
	name := make([]byte, unix.IFNAMSIZ)
	copy(name, ifName)
	return []expr.Any{
		&expr.Meta{Key: key, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: name},
	}
}

// rewrite: on interface ifName, a packet whose address at offset is match
// gets to instead, its IP and transport checksums fixed (stateless).
func rewrite(key expr.MetaKey, ifName string, offset uint32, match, to netip.Addr) []expr.Any {
	return append(ifMatch(key, ifName),
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: 4},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: match.AsSlice()},
		&expr.Immediate{Register: 1, Data: to.AsSlice()},
		&expr.Payload{OperationType: expr.PayloadWrite, SourceRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: 4,
			CsumType: expr.CsumTypeInet, CsumOffset: 10, CsumFlags: unix.NFT_PAYLOAD_L4CSUM_PSEUDOHDR},
		&expr.Verdict{Kind: expr.VerdictAccept},
	)
}

// portDNAT sends what is addressed to pod on port p (any port if p is
// zero) to to, the port unchanged.
func portDNAT(pod netip.Addr, p Port, to netip.Addr) []expr.Any {
	e := []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: ipv4Daddr, Len: 4},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: pod.AsSlice()},
	}
	if p.Port != 0 {
		proto, _ := protoNumber(p.Proto)
		e = append(e,
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binary.BigEndian.AppendUint16(nil, p.Port)})
	}
	return append(e,
		&expr.Immediate{Register: 1, Data: to.AsSlice()},
		&expr.NAT{Type: expr.NATTypeDestNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1})
}

// Offsets of the IPv4 header's addresses.
const (
	ipv4Saddr = 12
	ipv4Daddr = 16
)

// natRule matches packets on interface ifName (iif or oif by key) whose
// address at offset equals match and rewrites it to to.
func natRule(key expr.MetaKey, ifName string, offset uint32, match, to netip.Addr, typ expr.NATType) []expr.Any {
	return append(ifMatch(key, ifName),
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: 4},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: match.AsSlice()},
		&expr.Immediate{Register: 1, Data: to.AsSlice()},
		&expr.NAT{Type: typ, Family: unix.NFPROTO_IPV4, RegAddrMin: 1},
	)
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
