package shim

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// Caps are the capabilities a shim keeps: to attach to its VM's tap inside
// the pod's network namespace (CAP_SYS_ADMIN for setns, CAP_NET_ADMIN), to
// start the jail helper (CAP_SYS_ADMIN for its namespaces and mounts,
// CAP_SETUID/CAP_SETGID for its uid switch, CAP_SETPCAP for emptying its
// bounding set) and to signal the jailed QEMU (CAP_KILL). Everything else —
// module loading, raw I/O, ptrace, overriding file permissions, … — is out
// of its bounding set, so neither it nor anything it executes can have it.
var Caps = []uintptr{unix.CAP_SYS_ADMIN, unix.CAP_NET_ADMIN, unix.CAP_SETUID, unix.CAP_SETGID, unix.CAP_SETPCAP, unix.CAP_KILL}

// confinedEnv marks a shim that confined itself already.
const confinedEnv = "UNILET_SHIM_CONFINED"

// Confine gives the shim only Caps, with NoNewPrivs: it empties the
// calling thread's capability bounding set but for Caps, sets NoNewPrivs
// and executes the shim again, whose every thread then starts with these
// (root's capabilities after execve are its bounding set). It returns in
// the re-executed shim, or at once where there is nothing to drop (not
// root). The caller's goroutine must be locked to its thread.
func Confine() error {
	if os.Getenv(confinedEnv) == "1" {
		return os.Unsetenv(confinedEnv)
	}
	if os.Geteuid() != 0 {
		return nil
	}
	keep := map[uintptr]bool{}
	for _, c := range Caps {
		keep[c] = true
	}
	for c := uintptr(0); c <= 63; c++ {
		if keep[c] {
			continue
		}
		if err := unix.Prctl(unix.PR_CAPBSET_DROP, c, 0, 0, 0); err != nil && !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("drop capability %d: %w", c, err)
		}
	}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("no_new_privs: %w", err)
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	return syscall.Exec(self, os.Args, append(os.Environ(), confinedEnv+"=1"))
}
