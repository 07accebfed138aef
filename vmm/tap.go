package vmm

import (
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/unilet-dev/unilet/pkg/netns"
)

// tapBusyWait bounds how long openTaps waits for a tap another file still
// holds. The daemon creates each tap with a file it closes at once, but a
// process forked meanwhile (a CNI plugin, a shim) holds a copy of that file
// until it execs — on a loaded node that can be milliseconds, and a VM
// started right then would find its tap busy (EBUSY).
var tapBusyWait = 3 * time.Second

// openTaps attaches to the persistent tap device of each NIC inside its
// network namespace; the files are handed to QEMU (fd FirstTapFD+i).
func openTaps(nics []NIC) ([]*os.File, error) {
	var files []*os.File
	for _, n := range nics {
		var f *os.File
		open := func() error {
			fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
			if err != nil {
				return fmt.Errorf("open /dev/net/tun: %w", err)
			}
			ifr, err := unix.NewIfreq(n.Tap)
			if err != nil {
				unix.Close(fd)
				return err
			}
			ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
			if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
				unix.Close(fd)
				return fmt.Errorf("attach to tap %s: %w", n.Tap, err)
			}
			f = os.NewFile(uintptr(fd), "tap:"+n.Tap)
			return nil
		}
		var err error
		for deadline := time.Now().Add(tapBusyWait); ; time.Sleep(5 * time.Millisecond) {
			if n.NetNS != "" {
				err = netns.Do(n.NetNS, open)
			} else {
				err = open()
			}
			if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
				break
			}
		}
		if err != nil {
			closeAll(files)
			return nil, err
		}
		files = append(files, f)
	}
	return files, nil
}

func closeAll(files []*os.File) {
	for _, f := range files {
		f.Close()
	}
}

// OpenTaps attaches to the tap devices of nics the way a VM's supervisor
// does (for benchmarks that run QEMU directly with the same NIC).
func OpenTaps(nics []NIC) ([]*os.File, error) { return openTaps(nics) }
