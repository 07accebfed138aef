// Package vmnet connects the VMs' tap devices to the pod's CNI interface
// inside the pod network namespace. Routed (SetupRouted, every new pod):
// every guest keeps one fixed address on a tap of its own (AddTap), and the
// namespace routes the pod IP to them with netfilter — by declared port, the
// rest to a default VM (Route) — so clones and resumed VMs keep a working
// network and several VMs share one pod IP.
// Bridged (SetupTap, pods made before routed networking): tc ingress
// qdiscs with mirred redirects both ways, so the guest NIC (carrying the CNI
// interface's MAC) owns the pod IP itself.
package vmnet

import (
	"fmt"
	"net"

	"github.com/vishvananda/netlink"

	"github.com/unilet-dev/unilet/pkg/netns"
	"golang.org/x/sys/unix"
)

// Link describes the CNI interface a VM NIC takes over.
type Link struct {
	MAC string
	MTU int
}

// SetupTap creates the persistent tap device tapName in the namespace at
// path and joins it to the CNI interface ifName with tc ingress + mirred
// redirects both ways, so the VM's NIC (given ifName's MAC) owns the pod's
// address. It returns ifName's MAC and MTU. Calling it again is harmless.
func SetupTap(path, ifName, tapName string) (Link, error) {
	var out Link
	err := netns.Do(path, func() error {
		eth, err := netlink.LinkByName(ifName)
		if err != nil {
			return fmt.Errorf("CNI interface %s: %w", ifName, err)
		}
		out.MAC, out.MTU = eth.Attrs().HardwareAddr.String(), eth.Attrs().MTU
		tap, err := ensureTap(tapName, out.MTU)
		if err != nil {
			return err
		}
		if err := redirect(eth, tap); err != nil {
			return err
		}
		return redirect(tap, eth)
	})
	return out, err
}

// redirect sends every frame arriving on from out of to (tc ingress qdisc,
// u32 match-all filter, mirred egress redirect).
func redirect(from, to netlink.Link) error {
	q := &netlink.Ingress{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: from.Attrs().Index, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_INGRESS}}
	if err := netlink.QdiscReplace(q); err != nil {
		return fmt.Errorf("ingress qdisc on %s: %w", from.Attrs().Name, err)
	}
	filters, err := netlink.FilterList(from, netlink.MakeHandle(0xffff, 0))
	if err == nil && len(filters) > 0 {
		return nil // already redirected
	}
	f := &netlink.U32{
		FilterAttrs: netlink.FilterAttrs{LinkIndex: from.Attrs().Index, Parent: netlink.MakeHandle(0xffff, 0), Protocol: unix.ETH_P_ALL},
		Actions: []netlink.Action{&netlink.MirredAction{ActionAttrs: netlink.ActionAttrs{Action: netlink.TC_ACT_STOLEN},
			MirredAction: netlink.TCA_EGRESS_REDIR, Ifindex: to.Attrs().Index}},
	}
	if err := netlink.FilterAdd(f); err != nil {
		return fmt.Errorf("redirect %s → %s: %w", from.Attrs().Name, to.Attrs().Name, err)
	}
	return nil
}

// InterfaceStats returns rx/tx byte and error counters of ifName inside the namespace.
func InterfaceStats(path, ifName string) (*netlink.LinkStatistics, error) {
	var st *netlink.LinkStatistics
	err := netns.Do(path, func() error {
		l, err := netlink.LinkByName(ifName)
		if err != nil {
			return err
		}
		st = l.Attrs().Statistics
		return nil
	})
	return st, err
}

// Addresses returns the global unicast addresses of ifName inside the
// namespace at path: what CNI gave the pod, read from the pod's own
// namespace rather than from any record.
func Addresses(path, ifName string) ([]net.IP, error) {
	var out []net.IP
	err := netns.Do(path, func() error {
		l, err := netlink.LinkByName(ifName)
		if err != nil {
			return fmt.Errorf("CNI interface %s: %w", ifName, err)
		}
		addrs, err := netlink.AddrList(l, netlink.FAMILY_ALL)
		if err != nil {
			return err
		}
		for _, a := range addrs {
			if a.IP.IsGlobalUnicast() {
				out = append(out, a.IP)
			}
		}
		return nil
	})
	return out, err
}
