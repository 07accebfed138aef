package vmm

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// clockTicks is USER_HZ, fixed at 100 on Linux/x86.
const clockTicks = 100

// Stats is the resource usage of a VM's QEMU process.
type Stats struct {
	Timestamp time.Time
	CPUNanos  uint64 // user+system CPU time
	RSSBytes  uint64
}

// Stats reads QEMU's CPU time and resident memory from /proc.
func (v *VM) Stats() (Stats, error) {
	select {
	case <-v.done:
		return Stats{}, ErrNotRunning
	default:
	}
	return procStats(v.Pid())
}

func procStats(pid int) (Stats, error) {
	st := Stats{Timestamp: time.Now()}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return st, err
	}
	// Fields after the command name (which may contain spaces) start at ')'.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return st, fmt.Errorf("malformed /proc/%d/stat", pid)
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return st, fmt.Errorf("malformed /proc/%d/stat", pid)
	}
	utime, _ := strconv.ParseUint(f[11], 10, 64) // field 14
	stime, _ := strconv.ParseUint(f[12], 10, 64) // field 15
	st.CPUNanos = (utime + stime) * uint64(time.Second/clockTicks)
	m, err := os.ReadFile(fmt.Sprintf("/proc/%d/statm", pid))
	if err != nil {
		return st, err
	}
	mf := strings.Fields(string(m))
	if len(mf) < 2 {
		return st, fmt.Errorf("malformed /proc/%d/statm", pid)
	}
	pages, _ := strconv.ParseUint(mf[1], 10, 64)
	st.RSSBytes = pages * uint64(os.Getpagesize())
	return st, nil
}
