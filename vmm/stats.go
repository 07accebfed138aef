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
	f, err := StatFields(pid)
	if err != nil {
		return st, err
	}
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

// StatFields returns the fields of /proc/PID/stat after the command name
// (which may hold spaces and parentheses): f[0] is the state (field 3),
// f[1] the parent PID.
func StatFields(pid int) ([]string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return nil, err
	}
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return nil, fmt.Errorf("malformed /proc/%d/stat", pid)
	}
	return strings.Fields(string(b[i+1:])), nil
}
