package vmm

import (
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/unilet-dev/unilet/internal/testutil"
)

// A tap still held by another file (a forked process that has not exec'd
// yet) is waited for, not reported busy at once; one held for good is.
func TestOpenTapsWaitsForABusyTap(t *testing.T) {
	testutil.NeedRoot(t, testutil.LaneUnit, "a tap")
	name := fmt.Sprintf("utbusy%d", os.Getpid()%100000)
	tap := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: name}, Mode: netlink.TUNTAP_MODE_TAP,
		Flags: netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR | netlink.TUNTAP_ONE_QUEUE}
	require.NoError(t, netlink.LinkAdd(tap), "creating a tap needs root")
	defer func() { _ = netlink.LinkDel(tap) }()

	holder, err := openTaps([]NIC{{Tap: name}})
	require.NoError(t, err)
	go func() { time.Sleep(200 * time.Millisecond); closeAll(holder) }()
	t0 := time.Now()
	files, err := openTaps([]NIC{{Tap: name}})
	require.NoError(t, err)
	require.GreaterOrEqual(t, time.Since(t0), 150*time.Millisecond)
	defer closeAll(files)

	old := tapBusyWait
	tapBusyWait = 100 * time.Millisecond
	defer func() { tapBusyWait = old }()
	_, err = openTaps([]NIC{{Tap: name}})
	require.ErrorIs(t, err, unix.EBUSY)
	require.Contains(t, err.Error(), "attach to tap "+name)
}
