// Package proc signals processes only once they are proven to be what the
// caller says they are: each is pinned by a pidfd before the proof, so a
// PID that ended and was reused in between is never hit.
package proc

import "golang.org/x/sys/unix"

// KillIfProven sends SIGKILL to pid only if proof(pid) holds while the
// process is pinned by a pidfd. It reports whether it signalled.
func KillIfProven(pid int, proof func(pid int) bool) bool {
	if pid <= 1 || proof == nil {
		return false
	}
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return false
	}
	defer unix.Close(fd)
	if !proof(pid) {
		return false
	}
	return unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0) == nil
}
