package vmm

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"

	"github.com/unilet-dev/unilet/vmm/jail"
)

// JailSpec confines a VM's QEMU (package jail): its own unprivileged uid
// and gid, the pod's supplementary groups (so volumes shared through
// fsGroup or supplementalGroups stay readable), no capabilities,
// NoNewPrivs, a root of its own, QEMU's seccomp filter.
type JailSpec struct {
	UID    uint32
	GID    uint32
	Groups []uint32 `json:",omitempty"`
	// Pod is the pod whose VMs share UID and GID ("" = none; manager.JailIDs).
	Pod string `json:",omitempty"`
	// Helper is the binary started as the jail helper: one whose main
	// calls jail.Main when jail.IsHelper (default: this executable).
	Helper string `json:",omitempty"`
}

// HelperBinary is the small jail helper (cmd/unilet-jail) a shim uses when
// it lies beside it.
const HelperBinary = "unilet-jail"

// JailRoot is the directory of a VM's state directory the jail's root is
// mounted over (in the helper's mount namespace only).
const JailRoot = "jail"

// machine is m as QEMU sees it inside the jail: the kernel, initrd and
// volumes at the jail's paths, and QEMU's seccomp filter on.
func (j *JailSpec) machine(m MachineConfig) MachineConfig {
	m.Kernel = jail.Kernel
	if m.Initrd != "" {
		m.Initrd = jail.Initrd
	}
	shares := make([]Share, len(m.Shares))
	for i, sh := range m.Shares {
		sh.HostPath = jail.VolPath(sh.Tag)
		shares[i] = sh
	}
	m.Shares = shares
	m.Sandbox = true
	return m
}

// command is the jail helper that becomes spec's QEMU with argv.
func (j *JailSpec) command(spec VMSpec, argv []string) (*exec.Cmd, error) {
	if j.UID == 0 || j.GID == 0 {
		return nil, errors.New("a jailed VM needs a non-zero uid and gid")
	}
	root := filepath.Join(spec.StateDir, JailRoot)
	if err := os.Mkdir(root, 0o700); err != nil && !os.IsExist(err) {
		return nil, err
	}
	helper := j.Helper
	if helper == "" {
		self, err := os.Executable()
		if err != nil {
			return nil, err
		}
		// unilet-jail beside this binary starts faster than this binary
		// (a Go program with few packages to initialise); without it, this
		// binary is the helper.
		helper = self
		if small := filepath.Join(filepath.Dir(self), HelperBinary); small != self {
			if st, err := os.Stat(small); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
				helper = small
			}
		}
	}
	qemu, err := exec.LookPath(spec.QEMU) // the helper has no PATH
	if err != nil {
		return nil, err
	}
	if qemu, err = filepath.Abs(qemu); err != nil {
		return nil, err
	}
	m := spec.Machine
	c := jail.Config{Root: root, QEMU: qemu, Argv: argv, Env: []string{MarkerEnv + "=" + spec.StateDir},
		UID: j.UID, GID: j.GID, Groups: j.Groups, Kernel: m.Kernel, Initrd: m.Initrd, KVM: m.Accel == AccelKVM, Parent: os.Getpid()}
	if c.KVM {
		// /dev/kvm is usually root:kvm 0660: the jail joins its group.
		if st, err := os.Stat("/dev/kvm"); err == nil {
			c.Groups = append(c.Groups, st.Sys().(*syscall.Stat_t).Gid)
		}
	}
	for _, sh := range m.Shares {
		c.Shares = append(c.Shares, jail.Share{Tag: sh.Tag, HostPath: sh.HostPath, ReadOnly: sh.ReadOnly})
	}
	if len(m.NICs) > 0 {
		c.NetNS = m.NICs[0].NetNS
	}
	return jail.Command(helper, c)
}
