package main

import (
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/unilet-dev/unilet/vmm"
	"github.com/unilet-dev/unilet/vmm/manager"
)

// JailRow is what the per-VM jail costs at start: QEMU spawned until its
// QMP monitor answers (vmm.StartVM, as the shim runs it), three ways,
// interleaved.
type JailRow struct {
	Plain   Summary // QEMU as root, as before the jail
	Sandbox Summary // plus QEMU's seccomp filter alone
	Jailed  Summary // the jail: helper, namespaces, mounts, uid switch, filter
}

// measureJail starts the test kernel o.startPairs times each way, with a
// NIC as a pod's VM has (the jail joins the pod's network namespace; a VM
// without network would get a new one, ~5 ms more here).
func (e *env) measureJail(o options, res *Results) error {
	helper := filepath.Join(e.bin, vmm.HelperBinary)
	base := filepath.Join(e.run, "jail-bench")
	defer os.RemoveAll(base)
	var plain, sandbox, jailed []float64
	for i := 0; i < o.startPairs; i++ {
		for _, way := range []string{"plain", "sandbox", "jailed"} {
			spec := vmm.VMSpec{QEMU: "qemu-system-x86_64", StateDir: filepath.Join(base, fmt.Sprintf("%s-%d", way, i)),
				Machine: vmm.MachineConfig{Name: "jail-bench", Accel: vmm.AccelTCG, Machine: vmm.MachinePC,
					MemoryMiB: 64, VCPUs: 1, Kernel: e.kernel, Cmdline: "tick=1000",
					// As a pod's VM: the tap in the pod's namespace, which the jail joins.
					NICs: []vmm.NIC{{Tap: "tap0", NetNS: e.bareNS, MAC: "0a:58:c6:12:c8:02"}}}}
			switch way {
			case "sandbox":
				spec.Machine.Sandbox = true
			case "jailed":
				id := manager.DefaultJailIDs.First + manager.DefaultJailIDs.Count - 1 - uint32(i%8)
				spec.Jail = &vmm.JailSpec{UID: id, GID: id, Helper: helper}
			}
			e.settle()
			t0 := time.Now()
			v, err := vmm.StartVM(spec)
			if err != nil {
				return fmt.Errorf("%s VM: %w", way, err)
			}
			d := ms(time.Since(t0))
			v.Kill()
			<-v.Done()
			switch way {
			case "plain":
				plain = append(plain, d)
			case "sandbox":
				sandbox = append(sandbox, d)
			default:
				jailed = append(jailed, d)
			}
		}
	}
	row := JailRow{Plain: summarize(plain), Sandbox: summarize(sandbox), Jailed: summarize(jailed)}
	res.Details.Jail = &row
	res.JailOverheadMsP50 = round(row.Jailed.P50-row.Plain.P50, 2)
	return nil
}
