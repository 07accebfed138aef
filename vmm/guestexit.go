package vmm

import (
	"bytes"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"unicode"

	"github.com/unilet-dev/unilet/pkg/cgroups"
)

// Exit reasons a guest's own end or the host's OOM killer give.
const (
	// ReasonOOMKilled: the kernel's OOM killer ended QEMU because the
	// container's memory cgroup reached its limit (Kubernetes' own word).
	ReasonOOMKilled = "OOMKilled"
)

// consoleTailBytes is how much of a VM's last console output is kept for
// its exit message.
const consoleTailBytes = 4096

// consoleTail keeps the last consoleTailBytes of a VM's console: a guest
// that crashes says why there, and the exit message repeats it.
type consoleTail struct {
	mu sync.Mutex
	b  []byte
}

func (t *consoleTail) Write(p []byte) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(p) >= consoleTailBytes {
		t.b = append(t.b[:0], p[len(p)-consoleTailBytes:]...)
		return
	}
	if over := len(t.b) + len(p) - consoleTailBytes; over > 0 {
		t.b = append(t.b[:0], t.b[over:]...)
	}
	t.b = append(t.b, p...)
}

func (t *consoleTail) Bytes() []byte {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]byte(nil), t.b...)
}

// mainReturned is Unikraft's ukboot line (printed at info level) when the
// application's main returns; a non-zero value makes Unikraft halt with its
// crash status (isa-debug-exit and pvpanic), so only the console tells an
// application's exit status from a kernel crash.
var mainReturned = regexp.MustCompile(`main returned (-?[0-9]{1,10}), halting system`)

// GuestCrashStatus refines the exit of a guest that ended through Unikraft's
// crash path (pvpanic or isa-debug-exit's crash code) from the last console
// output: an application whose main returned N ≠ 0 exited with status N
// (reason Error, code N as a process's low 8 bits, 1 when those are 0); any
// other crash keeps its reason and code, its message gaining the console's
// last lines. st is what the VM's end alone said.
func GuestCrashStatus(st ExitStatus, tail []byte) ExitStatus {
	if m := mainReturned.FindAllSubmatch(tail, -1); len(m) > 0 {
		if n, err := strconv.ParseInt(string(m[len(m)-1][1]), 10, 64); err == nil && n != 0 {
			code := int32(n & 0xff)
			if code == 0 {
				code = 1
			}
			st.Code, st.Reason = code, ReasonError
			st.Message = fmt.Sprintf("the application exited with status %d (its console: \"main returned %d, halting system\"; Unikraft then halts as crashed)", n, n)
			return st
		}
	}
	if last := lastLines(tail, 2, 240); last != "" {
		st.Message += "; its console last said: " + last
	}
	return st
}

// lastLines is the last n non-blank lines of console output, printable
// characters only, joined with " | " and cut to at most max bytes.
func lastLines(b []byte, n, max int) string {
	var out []string
	for _, l := range bytes.Split(b, []byte("\n")) {
		s := strings.TrimSpace(strings.Map(func(r rune) rune {
			if r == unicode.ReplacementChar || !unicode.IsPrint(r) {
				return -1
			}
			return r
		}, string(l)))
		if s != "" {
			out = append(out, s)
		}
	}
	if len(out) > n {
		out = out[len(out)-n:]
	}
	s := strings.Join(out, " | ")
	if len(s) > max {
		s = strings.ToValidUTF8(s[len(s)-max:], "")
	}
	return s
}

// oomCount is the OOM-kill count of this process's (the shim's) memory
// cgroup, which QEMU shares: read when QEMU starts and when it ends, a kill
// in between that is not unilet's own was the kernel's OOM killer.
type oomCount struct {
	cgroup string
	kills  uint64
	ok     bool
}

func readOOMCount() oomCount {
	p, n, err := cgroups.OOMKills(os.Getpid())
	return oomCount{cgroup: p, kills: n, ok: err == nil}
}

// killedSince reports whether the OOM killer ended a process in the shim's
// memory cgroup since base was read. A shim moved to another cgroup since
// (a warm clone claimed by a pod) compares with zero: unilet makes every VM
// cgroup afresh.
func (base oomCount) killedSince() bool {
	now := readOOMCount()
	if !now.ok {
		return false
	}
	if base.ok && base.cgroup == now.cgroup {
		return now.kills > base.kills
	}
	return now.kills > 0
}
