package testutil

import (
	"fmt"
	"os"
	"os/exec"
	"testing"
)

// Test lanes. Plain `go test ./...` (no root, maybe no QEMU) runs the pure
// tests and skips the rest, naming the lane that runs them; the make
// targets set StrictEnv, under which a missing prerequisite fails the test
// instead: CI never skips silently.
const (
	LaneUnit    = "`sudo make test-unit`"
	LaneE2E     = "`sudo make test-e2e`"
	LaneKube    = "`sudo make test-kube`"
	LaneCritest = "`sudo make test-critest`"
)

// StrictEnv, set (by the Makefile), turns the skips below into failures.
const StrictEnv = "UNILET_TEST_STRICT"

func strict() bool { return os.Getenv(StrictEnv) != "" }

// NeedRoot skips t unless it runs as root; why says what needs it.
func NeedRoot(t testing.TB, lane, why string) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if strict() {
		t.Fatalf("needs root (%s); run the tests as root", why)
	}
	t.Skipf("needs root (%s): runs in %s", why, lane)
}

// NeedQEMU skips t unless qemu-system-x86_64 is on PATH; it returns its path.
func NeedQEMU(t testing.TB, lane string) string {
	t.Helper()
	p, err := exec.LookPath("qemu-system-x86_64")
	if err == nil {
		return p
	}
	if strict() {
		t.Fatalf("qemu-system-x86_64 is required (make deps installs it): %v", err)
	}
	t.Skipf("needs qemu-system-x86_64: runs in %s (make deps installs it)", lane)
	return ""
}

// MainNeedsRoot is for a TestMain whose whole package needs root and QEMU:
// without them (and not strict) it says which lane runs the package and
// ends the run as passed.
func MainNeedsRoot(pkg, lane string) {
	_, qerr := exec.LookPath("qemu-system-x86_64")
	if (os.Geteuid() == 0 && qerr == nil) || strict() {
		return
	}
	fmt.Printf("SKIP %s: needs root, QEMU and network namespaces: runs in %s\n", pkg, lane)
	os.Exit(0)
}
