package shim

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/unilet-dev/unilet/pkg/proc"
	"github.com/unilet-dev/unilet/vmm"
)

// IsQEMUOf reports whether pid is a QEMU that serves the VM directory dir:
// its executable is a qemu-system binary and its environment names dir
// (vmm.MarkerEnv; QEMUs of earlier versions: one of its arguments names
// a file inside dir). A PID read from disk is signalled only after this
// proof; dir must be an absolute, clean path other than "/".
func IsQEMUOf(pid int, dir string) bool {
	if pid <= 1 || !filepath.IsAbs(dir) || filepath.Clean(dir) != dir || dir == "/" {
		return false
	}
	exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
	if err != nil {
		return false
	}
	// An upgraded QEMU package leaves running VMs on a "(deleted)" binary.
	exe = strings.TrimSuffix(exe, " (deleted)")
	if !strings.HasPrefix(filepath.Base(exe), "qemu-system-") {
		return false
	}
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid)); err == nil {
		for _, kv := range strings.Split(string(b), "\x00") {
			if kv == vmm.MarkerEnv+"="+dir {
				return true
			}
		}
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	for _, arg := range strings.Split(string(b), "\x00") {
		if strings.Contains(arg, dir+"/") {
			return true
		}
	}
	return false
}

// KillQEMU sends SIGKILL to pid only if it is proven to be the QEMU of dir
// (IsQEMUOf). The process is pinned with a pidfd before the proof, so a PID
// recycled in between is never hit. It reports whether it signalled.
func KillQEMU(pid int, dir string) bool {
	return proc.KillIfProven(pid, func(pid int) bool { return IsQEMUOf(pid, dir) })
}

// MarkerEnvPrefix starts the environment entry that names a QEMU's VM
// directory (vmm.MarkerEnv).
const MarkerEnvPrefix = vmm.MarkerEnv + "="

// KillShimsOf kills every unilet-shim of the executable binary whose --dir
// is exactly dir (found in /proc, each pinned by a pidfd before the proof
// and the signal): a shim whose launching daemon died before it served
// (the next daemon found no socket and gave the start up). It returns how
// many it signalled.
func KillShimsOf(binary, dir string) int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return 0
	}
	n := 0
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if proc.KillIfProven(pid, func(pid int) bool { return isShimOf(pid, binary, dir, true) }) {
			n++
		}
	}
	return n
}

// IsShimUnder reports whether pid is a unilet-shim of the executable binary
// (or one of the same name) serving a directory inside root (its --dir or --pool-dir argument): the
// proof a process must pass before unilet signals it as one of its shims.
func IsShimUnder(pid int, binary, root string) bool {
	return isShimOf(pid, binary, root, false)
}

// isShimOf: pid is a unilet-shim of binary (or one of its name) whose --dir
// or --pool-dir is dir itself (exact) or inside it.
func isShimOf(pid int, binary, dir string, exact bool) bool {
	if pid <= 1 || binary == "" || !filepath.IsAbs(dir) || filepath.Clean(dir) != dir || dir == "/" {
		return false
	}
	want, err := filepath.EvalSymlinks(binary)
	if err != nil {
		want = binary
	}
	// The configured binary, or one of its name (a shim of the version
	// before an upgrade that installed the binaries elsewhere).
	exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
	exe = strings.TrimSuffix(exe, " (deleted)")
	if err != nil || (exe != want && filepath.Base(exe) != filepath.Base(want)) {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	args := strings.Split(string(b), "\x00")
	for i := 1; i+1 < len(args); i++ {
		a, p := args[i], args[i+1]
		if a != "--dir" && a != "--pool-dir" && a != "-dir" && a != "-pool-dir" || filepath.Clean(p) != p {
			continue
		}
		if (exact && p == dir) || (!exact && strings.HasPrefix(p, dir+"/")) {
			return true
		}
	}
	return false
}

// Parent returns the parent PID of pid (0 when /proc does not say).
func Parent(pid int) int {
	f, err := vmm.StatFields(pid)
	if err != nil || len(f) < 2 {
		return 0
	}
	ppid, _ := strconv.Atoi(f[1])
	return ppid
}
