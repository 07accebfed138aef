package vmnet

import (
	"encoding/binary"
	"fmt"
	"sync"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/unilet-dev/unilet/pkg/netns"
)

// A Waker tells when a packet is sent to a VM's tap while the VM is
// suspended (scale-to-zero): armed, a rule in the pod namespace
// (`oifname TAP log group G` in unilet's table, chain wake-TAP, on the
// postrouting hook; G is 30062 plus the tap's index, as NFLOG lets one
// socket bind a group per namespace; tap0's chain is named wake, as before
// pods had several VMs) hands every such packet's metadata to NFLOG, whose
// netlink socket — opened in that namespace and bound to the group — the
// Waker reads. The packet itself goes on to the tap, where it waits for
// the VM. Disarmed, the rule is gone and nothing is logged.
type Waker struct {
	nl    *netlink.Conn
	nft   *nftables.Conn
	tap   string
	group uint16
	c     chan struct{}
	once  sync.Once
}

// wakeGroup is the NFLOG group of tap0's wake rule (groups are per
// namespace); tap i's is wakeGroup+i.
const wakeGroup = 30062

// nfnetlink_log (linux/netfilter/nfnetlink_log.h).
const (
	nfnlSubsysULOG     = 4
	nfulnlMsgPacket    = 0
	nfulnlMsgConfig    = 1
	nfulaCfgCmd        = 1
	nfulaCfgMode       = 2
	nfulaCfgTimeout    = 4
	nfulaCfgQThresh    = 5
	nfulnlCfgCmdBind   = 1
	nfulnlCfgCmdPfBind = 3
	nfulnlCopyMeta     = 1
)

// NewWaker opens the NFLOG socket and an nftables connection inside the
// namespace at path, for the VM's tap named tap.
func NewWaker(path, tap string) (*Waker, error) {
	idx, _ := TapIndex(tap)
	w := &Waker{tap: tap, group: wakeGroup + uint16(idx), c: make(chan struct{}, 1)}
	err := netns.Do(path, func() (err error) {
		if w.nl, err = netlink.Dial(unix.NETLINK_NETFILTER, nil); err != nil {
			return fmt.Errorf("NFLOG socket: %w", err)
		}
		if w.nft, err = nftables.New(nftables.AsLasting()); err != nil {
			w.nl.Close()
			return fmt.Errorf("nftables: %w", err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	for _, cmd := range []struct {
		res  uint16
		attr netlink.Attribute
	}{
		{0, netlink.Attribute{Type: nfulaCfgCmd, Data: []byte{nfulnlCfgCmdPfBind}}},
		{w.group, netlink.Attribute{Type: nfulaCfgCmd, Data: []byte{nfulnlCfgCmdBind}}},
		// The packet is not copied: only that one came matters.
		{w.group, netlink.Attribute{Type: nfulaCfgMode, Data: []byte{0, 0, 0, 0, nfulnlCopyMeta, 0}}},
		// Each packet is reported at once: NFLOG batches up to 100 packets
		// or 1 s by default, which a wake would wait for.
		{w.group, netlink.Attribute{Type: nfulaCfgQThresh, Data: []byte{0, 0, 0, 1}}},
		{w.group, netlink.Attribute{Type: nfulaCfgTimeout, Data: []byte{0, 0, 0, 0}}},
	} {
		if err := w.config(cmd.res, cmd.attr); err != nil {
			w.Close()
			return nil, fmt.Errorf("bind NFLOG group %d: %w (needs nfnetlink_log)", w.group, err)
		}
	}
	go w.read()
	return w, nil
}

// config sends one nfnetlink_log configuration message.
func (w *Waker) config(resID uint16, attr netlink.Attribute) error {
	attrs, err := netlink.MarshalAttributes([]netlink.Attribute{attr})
	if err != nil {
		return err
	}
	hdr := make([]byte, 4) // nfgenmsg: family, version, res_id (big endian)
	hdr[0], hdr[1] = unix.AF_INET, 0
	binary.BigEndian.PutUint16(hdr[2:], resID)
	_, err = w.nl.Execute(netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(nfnlSubsysULOG<<8 | nfulnlMsgConfig), Flags: netlink.Request | netlink.Acknowledge},
		Data:   append(hdr, attrs...),
	})
	return err
}

func (w *Waker) read() {
	for {
		msgs, err := w.nl.Receive()
		if err != nil {
			return // closed
		}
		for _, m := range msgs {
			if m.Header.Type == netlink.HeaderType(nfnlSubsysULOG<<8|nfulnlMsgPacket) {
				select {
				case w.c <- struct{}{}:
				default:
				}
			}
		}
	}
}

// C receives when a packet was sent to the tap while armed.
func (w *Waker) C() <-chan struct{} { return w.c }

func (w *Waker) chain() (*nftables.Table, *nftables.Chain) {
	t := &nftables.Table{Family: nftables.TableFamilyIPv4, Name: nftTable}
	name := "wake"
	if w.tap != TapName(0) {
		name += "-" + w.tap
	}
	return t, &nftables.Chain{Name: name, Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityFilter}
}

// Arm installs the wake rule; a signal pending from before is dropped.
func (w *Waker) Arm() error {
	select {
	case <-w.c:
	default:
	}
	t, ch := w.chain()
	w.nft.AddTable(t)
	w.nft.AddChain(ch)
	w.nft.FlushChain(ch)
	name := make([]byte, unix.IFNAMSIZ)
	copy(name, w.tap)
	w.nft.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{
		&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: name},
		&expr.Log{Key: 1<<unix.NFTA_LOG_GROUP | 1<<unix.NFTA_LOG_QTHRESHOLD, Group: w.group, QThreshold: 1},
	}})
	if err := w.nft.Flush(); err != nil {
		return fmt.Errorf("arm the wake rule: %w", err)
	}
	return nil
}

// Disarm removes the wake rule.
func (w *Waker) Disarm() error {
	t, ch := w.chain()
	w.nft.AddTable(t)
	w.nft.AddChain(ch)
	w.nft.FlushChain(ch)
	if err := w.nft.Flush(); err != nil {
		return fmt.Errorf("disarm the wake rule: %w", err)
	}
	return nil
}

// Close disarms and closes the Waker.
func (w *Waker) Close() {
	w.once.Do(func() {
		if w.nft != nil {
			_ = w.Disarm()
			_ = w.nft.CloseLasting()
		}
		if w.nl != nil {
			w.nl.Close()
		}
	})
}
