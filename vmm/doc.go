// Package vmm (virtual machine monitor) owns the unikernel side of unilet: the
// machine spec derived from a CRI container, the pure builders of the
// Unikraft kernel command line and the QEMU argv, the accelerator probe, and
// the supervisor that runs one QEMU per container, feeds its serial console
// into the CRI log and records its exit. (It was package runtime, which
// shadowed the standard library's.)
package vmm
