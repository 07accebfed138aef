// Command unilet-shim supervises one VM for the unilet daemon (see package
// vmm/shim). The daemon starts it; operators do not.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"syscall"

	"github.com/unilet-dev/unilet/pkg/version"
	"github.com/unilet-dev/unilet/vmm/jail"
	"github.com/unilet-dev/unilet/vmm/shim"
)

// Settings that belong to a thread (NoNewPrivs, the parent-death signal,
// the capability bounding set) must be made on the thread that executes
// the next program (the jail helper's QEMU, the shim confining itself):
// the main goroutine stays on the main thread.
func init() { runtime.LockOSThread() }

func main() {
	if jail.IsHelper() {
		jail.Main() // becomes the VM's QEMU, confined
	}
	dir := flag.String("dir", "", "VM directory holding spec.json")
	poolDir := flag.String("pool-dir", "", "run as an idle pre-forked shim serving here until adopted")
	showVersion := flag.Bool("version", false, "print the version")
	tmplRAM := flag.String("template-ram", "", "hold this template RAM file in a sealed memfd and hand it to clones' shims on --listen")
	tmplSize := flag.Int64("size", 0, "size of --template-ram in bytes")
	tmplDigest := flag.String("digest", "", "SHA-256 of --template-ram (sha256:HEX)")
	listen := flag.String("listen", "", "socket a template RAM holder serves on")
	flag.Parse()
	if *showVersion {
		fmt.Println("unilet-shim", version.Version)
		return
	}
	var serve func(context.Context) error
	switch {
	case *tmplRAM != "":
		serve = func(ctx context.Context) error {
			return shim.ServeTemplateRAM(ctx, *tmplRAM, *tmplSize, *tmplDigest, *listen)
		}
	case (*dir == "") == (*poolDir == ""):
		fmt.Fprintln(os.Stderr, "unilet-shim: exactly one of --dir, --pool-dir or --template-ram is required")
		os.Exit(2)
	case *poolDir != "":
		serve = func(ctx context.Context) error { return shim.ServePool(ctx, *poolDir) }
	default:
		serve = func(ctx context.Context) error { return shim.Serve(ctx, *dir) }
	}
	// Only the capabilities a shim needs, NoNewPrivs (re-executes once).
	if err := shim.Confine(); err != nil {
		fmt.Fprintln(os.Stderr, "unilet-shim:", err)
		os.Exit(1)
	}
	// The daemon may die or restart: only SIGTERM/SIGINT end the VM.
	signal.Ignore(syscall.SIGHUP, syscall.SIGPIPE)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := serve(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "unilet-shim:", err)
		os.Exit(1)
	}
}
