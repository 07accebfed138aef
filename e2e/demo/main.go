// Command demo is `make demo` for the current stage of unilet: it builds the
// repository's test unikernel, boots it under real QEMU through unilet's VM
// runtime (accelerator probe, Unikraft command line, CRI console log), and
// prints the resulting container log. Later stages run it through the CRI
// daemon and then a real cluster.
package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/unilet-dev/unilet/runtime"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func run() error {
	dir, err := os.MkdirTemp("", "unilet-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	kernel := filepath.Join(dir, "testkernel.elf")
	fmt.Println(">> building the test unikernel (e2e/guest/testkernel)")
	if out, err := exec.Command("./e2e/guest/testkernel/build.sh", kernel).CombinedOutput(); err != nil {
		return fmt.Errorf("build test kernel: %v\n%s", err, out)
	}
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return fmt.Errorf("qemu-system-x86_64 not found (run make deps): %w", err)
	}
	fmt.Println(">> probing the accelerator (--accel auto)")
	accel, err := runtime.ResolveAccel(context.Background(), "auto", qemu)
	if err != nil {
		return err
	}
	fmt.Println("   accelerator:", accel)
	env := []string{"GREETING=hello from unilet", "POD_NAME=demo"}
	args := []string{"hello", "unikernel world", "tick=100", "count=5"}
	line, warnings, err := runtime.BuildCmdline(runtime.GuestConfig{KernelName: kernel, Env: env, Args: args})
	if err != nil {
		return err
	}
	for _, w := range warnings {
		logrus.Warn(w)
	}
	fmt.Printf(">> guest command line: %s\n", line)
	spec := runtime.VMSpec{
		QEMU: qemu,
		Machine: runtime.MachineConfig{Name: "demo", Accel: accel, Machine: runtime.MachinePC, MemoryMiB: 32, VCPUs: 1,
			Kernel: kernel, Cmdline: line, QMPSocket: filepath.Join(dir, "qmp.sock")},
		StateDir: filepath.Join(dir, "vm"),
		LogPath:  filepath.Join(dir, "logs", "demo", "0.log"),
	}
	start := time.Now()
	vm, err := runtime.StartVM(spec)
	if err != nil {
		return err
	}
	select {
	case <-vm.Done():
	case <-time.After(60 * time.Second):
		vm.Stop(time.Second)
	}
	st := vm.Exit()
	fmt.Printf(">> VM exited after %s: code=%d reason=%s %s\n", time.Since(start).Round(time.Millisecond), st.Code, st.Reason, st.Message)
	b, err := os.ReadFile(spec.LogPath)
	if err != nil {
		return err
	}
	fmt.Printf(">> container log (%s, CRI format):\n%s", spec.LogPath, b)
	if st.Code != 0 {
		return fmt.Errorf("VM failed: %s", st.Reason)
	}
	return nil
}
