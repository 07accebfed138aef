package runtime

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
			Kernel: "/var/lib/unilet/images/sha256/ab/kernel", Cmdline: "env.vars=[ A=1 ] -- hello", QMPSocket: "/run/unilet/vm/abc/qmp.sock"}},
		{"microvm-kvm-initrd", MachineConfig{Accel: AccelKVM, Machine: MachineMicroVM, MemoryMiB: 128, VCPUs: 2,
			Kernel: "/k", Initrd: "/i", QMPSocket: "/run/q.sock"}},
		{"hostile-values", MachineConfig{Name: "x,file=/etc/passwd", Accel: AccelTCG, Machine: MachinePC, MemoryMiB: 64, VCPUs: 1,
			Kernel: "/k", Cmdline: "-- a,b -device foo", QMPSocket: "/run/a,server=off/q.sock"}},
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
	ok := MachineConfig{Accel: AccelTCG, Machine: MachinePC, MemoryMiB: 64, VCPUs: 1, Kernel: "/k", QMPSocket: "/q"}
	for name, mut := range map[string]func(*MachineConfig){
		"accel":   func(m *MachineConfig) { m.Accel = "hax" },
		"machine": func(m *MachineConfig) { m.Machine = "q35,kernel-irqchip=off" },
		"memory":  func(m *MachineConfig) { m.MemoryMiB = 0 },
		"vcpus":   func(m *MachineConfig) { m.VCPUs = 0 },
		"kernel":  func(m *MachineConfig) { m.Kernel = "" },
	} {
		m := ok
		mut(&m)
		_, err := BuildArgv(m)
		require.Error(t, err, name)
	}
	_, err := BuildArgv(ok)
	require.NoError(t, err)
}
