package vmm

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestBuildArgvGolden(t *testing.T) {
	cases := []struct {
		name string
		m    MachineConfig
	}{
		{"pc-tcg", MachineConfig{Name: "pod_ns_ctr", Accel: AccelTCG, Machine: MachinePC, MemoryMiB: 64, VCPUs: 1,
			Kernel: "/var/lib/unilet/images/sha256/ab/kernel", Cmdline: "env.vars=[ A=1 ] -- hello"}},
		{"microvm-kvm-initrd", MachineConfig{Accel: AccelKVM, Machine: MachineMicroVM, MemoryMiB: 128, VCPUs: 2,
			Kernel: "/k", Initrd: "/i"}},
		{"hostile-values", MachineConfig{Name: "x,file=/etc/passwd", Accel: AccelTCG, Machine: MachinePC, MemoryMiB: 64, VCPUs: 1,
			Kernel: "/k", Cmdline: "-- a,b -device foo"}},
		{"pc-nic-shares", MachineConfig{Accel: AccelTCG, Machine: MachinePC, MemoryMiB: 128, VCPUs: 2, Kernel: "/k",
			NICs:   []NIC{{Tap: "tap0", NetNS: "/var/run/netns/unilet-abc", MAC: "0a:58:c6:12:00:05"}},
			Shares: []Share{{Tag: "fs1", HostPath: "/var/lib/kubelet/pods/u/volumes/x,readonly=off,path=/"}, {Tag: "fs2", HostPath: "/ro", ReadOnly: true}}}},
		{"jailed-sandbox", MachineConfig{Accel: AccelTCG, Machine: MachinePC, MemoryMiB: 64, VCPUs: 1, Kernel: "/kernel", Sandbox: true,
			NICs: []NIC{{Tap: "tap0", MAC: "0a:58:c6:12:00:05"}}, Shares: []Share{{Tag: "fs1", HostPath: "/vol/fs1", MappedFile: true}}}},
		{"microvm-nic-share", MachineConfig{Accel: AccelKVM, Machine: MachineMicroVM, MemoryMiB: 64, VCPUs: 1, Kernel: "/k",
			NICs: []NIC{{Tap: "tap0", MAC: "0a:58:c6:12:00:05"}}, Shares: []Share{{Tag: "fs1", HostPath: "/data"}}}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			argv, err := BuildArgv(c.m)
			require.NoError(t, err)
			golden(t, "argv-"+c.name, strings.Join(argv, "\n")+"\n")
		})
	}
}

func TestBuildArgvRejects(t *testing.T) {
	ok := MachineConfig{Accel: AccelTCG, Machine: MachinePC, MemoryMiB: 64, VCPUs: 1, Kernel: "/k"}
	for name, mut := range map[string]func(*MachineConfig){
		"accel":   func(m *MachineConfig) { m.Accel = "hax" },
		"machine": func(m *MachineConfig) { m.Machine = "q35,kernel-irqchip=off" },
		"memory":  func(m *MachineConfig) { m.MemoryMiB = 0 },
		"vcpus":   func(m *MachineConfig) { m.VCPUs = 0 },
		"kernel":  func(m *MachineConfig) { m.Kernel = "" },
		"mac":     func(m *MachineConfig) { m.NICs = []NIC{{Tap: "tap0", MAC: "0a:58:c6:12:00:05,id=x"}} },
		"tap":     func(m *MachineConfig) { m.NICs = []NIC{{Tap: "tap0,fd=0", MAC: "0a:58:c6:12:00:05"}} },
		"tag":     func(m *MachineConfig) { m.Shares = []Share{{Tag: "fs1,x", HostPath: "/a"}} },
		"dup-tag": func(m *MachineConfig) { m.Shares = []Share{{Tag: "fs1", HostPath: "/a"}, {Tag: "fs1", HostPath: "/b"}} },
		"relpath": func(m *MachineConfig) { m.Shares = []Share{{Tag: "fs1", HostPath: "a/b"}} },
	} {
		m := ok
		mut(&m)
		_, err := BuildArgv(m)
		require.Error(t, err, name)
	}
	_, err := BuildArgv(ok)
	require.NoError(t, err)
}
