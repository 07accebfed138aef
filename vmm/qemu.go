package vmm

import (
	"fmt"
	"net"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
)

// Accelerators.
const (
	AccelKVM = "kvm"
	AccelTCG = "tcg"
)

// Machine types.
const (
	MachinePC      = "pc"
	MachineMicroVM = "microvm"
)

// RAMBackendID names the guest RAM backend object under TCG (see BuildArgv).
const RAMBackendID = "ram0"

// DebugExitPort is where the isa-debug-exit device listens on microvm.
const DebugExitPort = "0x501"

// MachineConfig is everything QEMU needs to boot one unikernel. It is built
// from trusted inputs (daemon config + validated pod values); BuildArgv still
// escapes every value that lands inside a QEMU option string.
type MachineConfig struct {
	Name      string // informational, shows in ps
	Accel     string // kvm | tcg
	Machine   string // pc | microvm
	MemoryMiB int
	VCPUs     int
	Kernel    string
	Initrd    string
	Cmdline   string
	// Sandbox turns on QEMU's seccomp filter (-sandbox, SandboxOpts); set
	// with the jail.
	Sandbox bool `json:",omitempty"`
	// CPU overrides the CPU model (default: host under KVM, max under TCG).
	// Operator/test setting only; validated against a fixed pattern.
	CPU string
	// NICs are the guest's network cards, each backed by a tap device that
	// the VM's supervisor opens inside NetNS and passes to QEMU as an fd.
	NICs []NIC `json:",omitempty"`
	// Shares are host directories exported to the guest over virtio-9p.
	Shares []Share `json:",omitempty"`
	// RAM backs guest RAM with a file QEMU opens as /proc/self/fd/RAMFD()
	// (a memfd its supervisor passes): shared for a VM that becomes a
	// template, private copy-on-write for a clone of one (nil: QEMU's own).
	RAM *RAMBacking `json:",omitempty"`
	// Incoming starts QEMU waiting for a migration stream (-incoming
	// defer) instead of booting: a clone restored from a template.
	Incoming bool `json:",omitempty"`
	// Paused starts QEMU with its vCPUs stopped (-S): the guest runs on
	// QMP cont (autostart off).
	Paused bool `json:",omitempty"`
}

// RAMBacking is guest RAM in a file the supervisor passes to QEMU.
type RAMBacking struct {
	// Shared maps it MAP_SHARED (share=on: a template's RAM, written to the
	// file); otherwise MAP_PRIVATE (share=off: a clone's writes stay its own).
	Shared bool
}

// NIC is one virtio-net card backed by a tap device in a network namespace.
type NIC struct {
	Tap   string // tap device name inside NetNS
	NetNS string // path of the network namespace ("" = the shim's own)
	MAC   string
}

// Share is one virtio-9p export: Tag is what the guest mounts (vfs.fstab source).
//
// A read-only share is exported with security_model=passthrough and
// readonly=on: the guest sees the host's owners and modes and can change
// nothing. A writable share uses a mapped model: what the guest creates is
// a plain file or directory owned by QEMU's user (mode 0600/0700), and the
// owner, mode, device or symlink the guest asked for is kept in extended
// attributes (mapped-xattr) or, where the file system has no user xattrs, in
// .virtfs_metadata files (mapped-file) — never as a setuid file, a device
// node, a symlink or another user's file on the host.
type Share struct {
	Tag      string
	HostPath string
	ReadOnly bool
	// MappedFile selects mapped-file for a writable share (see above).
	MappedFile bool `json:",omitempty"`
}

// SandboxOpts is QEMU's seccomp filter for jailed VMs: obsolete system
// calls, privilege changes, process creation and resource control refused.
const SandboxOpts = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

// QMPFD is QEMU's file descriptor of its QMP monitor connection: after the
// taps (a socket the supervisor holds the other end of).
func (m MachineConfig) QMPFD() int { return FirstTapFD + len(m.NICs) }

// RAMFD is QEMU's file descriptor of its guest RAM file (after QMP).
func (m MachineConfig) RAMFD() int { return m.QMPFD() + 1 }

// FirstTapFD is the file descriptor of the first NIC's tap in QEMU (stdin,
// stdout and stderr come first; the taps follow in NIC order).
const FirstTapFD = 3

var (
	shareTag = regexp.MustCompile(`^[A-Za-z0-9_]{1,31}$`)
	tapName  = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,15}$`)
)

var cpuModel = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.-]*$`)

// EscapeOpt escapes a value for a QEMU "key=value,key=value" option string.
func EscapeOpt(v string) string { return strings.ReplaceAll(v, ",", ",,") }

// Validate checks the config for values QEMU would misread.
func (m MachineConfig) Validate() error {
	switch m.Accel {
	case AccelKVM, AccelTCG:
	default:
		return fmt.Errorf("unknown accelerator %q", m.Accel)
	}
	switch m.Machine {
	case MachinePC, MachineMicroVM:
	default:
		return fmt.Errorf("unknown machine type %q (want pc or microvm)", m.Machine)
	}
	if m.MemoryMiB < 1 {
		return fmt.Errorf("memory %d MiB is invalid", m.MemoryMiB)
	}
	if m.VCPUs < 1 {
		return fmt.Errorf("vCPUs %d is invalid", m.VCPUs)
	}
	if m.Kernel == "" {
		return fmt.Errorf("no kernel")
	}
	if m.CPU != "" && !cpuModel.MatchString(m.CPU) {
		return fmt.Errorf("invalid CPU model %q", m.CPU)
	}
	for i, n := range m.NICs {
		if !tapName.MatchString(n.Tap) {
			return fmt.Errorf("NIC %d: invalid tap name %q", i, n.Tap)
		}
		if _, err := net.ParseMAC(n.MAC); err != nil || len(n.MAC) != 17 {
			return fmt.Errorf("NIC %d: invalid MAC %q", i, n.MAC)
		}
	}
	tags := map[string]bool{}
	for i, sh := range m.Shares {
		if !shareTag.MatchString(sh.Tag) || tags[sh.Tag] {
			return fmt.Errorf("share %d: invalid or duplicate tag %q", i, sh.Tag)
		}
		tags[sh.Tag] = true
		if !filepath.IsAbs(sh.HostPath) || strings.ContainsAny(sh.HostPath, "\x00\n") {
			return fmt.Errorf("share %s: host path %q is not absolute", sh.Tag, sh.HostPath)
		}
	}
	return nil
}

// BuildArgv returns the QEMU arguments (without the binary) for m. The serial
// console is QEMU's stdin/stdout; QEMU's own messages go to stderr.
func BuildArgv(m MachineConfig) ([]string, error) {
	if err := m.Validate(); err != nil {
		return nil, err
	}
	cpu := "max"
	if m.Accel == AccelKVM {
		cpu = "host"
	}
	if m.CPU != "" {
		cpu = m.CPU
	}
	a := []string{}
	if m.Name != "" {
		a = append(a, "-name", "guest="+EscapeOpt(m.Name))
	}
	machine := m.Machine + ",accel=" + m.Accel
	if m.RAM != nil {
		// Guest RAM in the file the supervisor passed (see RAMBacking).
		share := "off"
		if m.RAM.Shared {
			share = "on"
		}
		a = append(a, "-object", "memory-backend-file,id="+RAMBackendID+",size="+strconv.Itoa(m.MemoryMiB)+"M,mem-path=/proc/self/fd/"+
			strconv.Itoa(m.RAMFD())+",share="+share)
		machine += ",memory-backend=" + RAMBackendID
	} else if m.Accel == AccelTCG {
		// Guest RAM from a memfd under TCG. QEMU asks for transparent huge
		// pages on anonymous guest RAM, so each 2 MiB the guest (or its
		// firmware) touches is zeroed and kept whole; shmem gets no THP by
		// default. Measured (docs/benchmarks.md): 100 VMs at once start ~25%
		// faster, each QEMU ~5 MB smaller. Under KVM huge pages back the
		// guest's EPT mappings and stay.
		a = append(a, "-object", "memory-backend-memfd,id="+RAMBackendID+",size="+strconv.Itoa(m.MemoryMiB)+"M")
		machine += ",memory-backend=" + RAMBackendID
	}
	a = append(a,
		"-machine", machine,
		"-cpu", cpu,
		"-m", strconv.Itoa(m.MemoryMiB),
		"-smp", strconv.Itoa(m.VCPUs),
		"-nographic", "-nodefaults", "-no-user-config", "-no-reboot",
		"-kernel", m.Kernel,
	)
	if m.Initrd != "" {
		a = append(a, "-initrd", m.Initrd)
	}
	if m.Cmdline != "" {
		a = append(a, "-append", m.Cmdline)
	}
	a = append(a,
		"-chardev", "stdio,id=con0,signal=off",
		"-serial", "chardev:con0",
		// The monitor is a connected socket the supervisor handed over:
		// nothing to poll for, no path to open.
		"-chardev", "socket,id=qmp0,fd="+strconv.Itoa(m.QMPFD()),
		"-mon", "chardev=qmp0,mode=control",
	)
	if m.Sandbox {
		a = append(a, "-sandbox", SandboxOpts)
	}
	if m.Incoming {
		a = append(a, "-incoming", "defer")
	}
	if m.Paused {
		a = append(a, "-S")
	}
	bus := "pci"
	if m.Machine == MachineMicroVM {
		bus = "device" // virtio-mmio
	}
	for i, n := range m.NICs {
		id := "n" + strconv.Itoa(i)
		a = append(a,
			"-netdev", "tap,id="+id+",fd="+strconv.Itoa(FirstTapFD+i),
			"-device", "virtio-net-"+bus+",netdev="+id+",mac="+n.MAC)
	}
	for _, sh := range m.Shares {
		fs := "local,id=" + sh.Tag + ",path=" + EscapeOpt(sh.HostPath)
		switch {
		case sh.ReadOnly:
			fs += ",security_model=passthrough,readonly=on"
		case sh.MappedFile:
			fs += ",security_model=mapped-file"
		default:
			fs += ",security_model=mapped-xattr"
		}
		a = append(a, "-fsdev", fs, "-device", "virtio-9p-"+bus+",fsdev="+sh.Tag+",mount_tag="+sh.Tag)
	}
	switch m.Machine {
	case MachinePC:
		// Keep SeaBIOS off the serial console so the log is the guest's own.
		// A guest panic pauses the VM (state guest-panicked) so unilet can report it.
		a = append(a, "-fw_cfg", "name=etc/sercon-port,string=0", "-device", "pvpanic", "-action", "panic=pause")
	case MachineMicroVM:
		// Unikraft's ACPI power-off does nothing on microvm: give it a port to exit through.
		a = append(a, "-device", "isa-debug-exit,iobase="+DebugExitPort+",iosize=1")
	}
	return a, nil
}
