// Command unilet-jail is the jail helper (package vmm/jail) a
// unilet-shim starts to become its VM's QEMU, confined: a program with as
// little to initialise as possible, since it sits on every VM's start path.
// unilet-shim serves as the helper itself when this binary is missing.
// Operators do not run it.
package main

import (
	"fmt"
	"os"
	"runtime"

	"github.com/unilet-dev/unilet/vmm/jail"
)

// The helper's thread-scoped settings (NoNewPrivs, the parent-death signal,
// the capability bounding set, its credentials) are made on the thread that
// executes QEMU: the main goroutine stays on the main thread.
func init() { runtime.LockOSThread() }

func main() {
	if !jail.IsHelper() {
		fmt.Fprintln(os.Stderr, "unilet-jail: started by unilet-shim only")
		os.Exit(2)
	}
	jail.Main()
}
