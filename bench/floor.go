package main

import (
	"fmt"
	"log"
	"strings"
	"sync"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/vmm"
)

// FloorRow is one way of running the same guest: a bare QEMU variant, or
// unilet's full CRI path with a machine type.
type FloorRow struct {
	Variant string
	Start   Summary // ms, spawn (or RunPodSandbox) → first console line
	QEMUMB  float64 // RSS of the QEMU after its first line (mean)
	// BurstN VMs started at once: ms until every one printed (0: not run).
	BurstN  int
	BurstMs float64
}

// burst calls start(0) … start(n-1) at once and returns when all have
// returned; if any failed, it ends the started ones with stop.
func burst[T any](n int, start func(i int) (T, error), stop func(T)) (time.Duration, []T, error) {
	var wg sync.WaitGroup
	items := make([]T, n)
	errs := make([]error, n)
	t0 := time.Now()
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			items[i], errs[i] = start(i)
		}(i)
	}
	wg.Wait()
	d := time.Since(t0)
	for i, err := range errs {
		if err != nil {
			var started []T
			for j := range items {
				if errs[j] == nil {
					started = append(started, items[j])
				}
			}
			parallel(started, 8, stop)
			return 0, nil, fmt.Errorf("%d of %d: %w", i, n, err)
		}
	}
	return d, items, nil
}

// uniletBurst starts n unilet VMs at once and returns when all have printed.
func (e *env) uniletBurst(n int) (time.Duration, []vm, error) {
	return burst(n, func(int) (vm, error) {
		_, v, err := e.startVM([]string{tickArg})
		return v, err
	}, e.remove)
}

// bareBurst starts n bare QEMUs with argv at once (taps tap0..) and returns
// when all have printed.
func (e *env) bareBurst(argv []string, n int) (time.Duration, []*bare, error) {
	return burst(n, func(i int) (*bare, error) {
		_, b, err := e.startBare(e.bareArgv(argv, 1000+i, "", ""), i)
		return b, err
	}, (*bare).kill)
}

// anonRAM turns unilet's TCG argv (guest RAM from a memfd) into QEMU's
// default: anonymous guest RAM, which QEMU asks to back with huge pages.
func anonRAM(argv []string) []string {
	var out []string
	for i := 0; i < len(argv); i++ {
		if argv[i] == "-object" && i+1 < len(argv) && strings.HasPrefix(argv[i+1], "memory-backend-memfd,") {
			i++
			continue
		}
		out = append(out, strings.Replace(argv[i], ",memory-backend="+vmm.RAMBackendID, "", 1))
	}
	return out
}

// qemuPID returns the pid of a unilet VM's QEMU.
func (e *env) qemuPID(v vm) int {
	st, err := e.rt.ContainerStatus(bg, &runtimeapi.ContainerStatusRequest{ContainerId: v.ctr, Verbose: true})
	if err != nil {
		return 0
	}
	var pid int
	fmt.Sscan(st.GetInfo()["pid"], &pid)
	return pid
}

// measureFloor runs the same guest several ways, interleaved: what the
// machine type and the guest-RAM backing cost, bare and through unilet.
func (e *env) measureFloor(o options, res *Results) error {
	defer func() { e.machine = "" }() // unilet rows set the machine of their pods
	e.machine = vmm.MachineMicroVM
	_, w, err := e.startVM([]string{tickArg})
	if err != nil {
		return fmt.Errorf("a microunikernel pod: %w", err)
	}
	micro, err := e.captureArgv(w)
	e.remove(w)
	if err != nil {
		return err
	}
	type variant struct {
		name    string
		argv    []string // bare QEMU; nil: unilet
		machine string
	}
	vs := []variant{
		{name: "bare QEMU, pc, anonymous RAM (QEMU's default)", argv: anonRAM(e.argv)},
		{name: "bare QEMU, pc, memfd RAM (unilet's argv)", argv: e.argv},
		{name: "bare QEMU, microvm, anonymous RAM", argv: anonRAM(micro)},
		{name: "bare QEMU, microvm, memfd RAM (unilet's argv)", argv: micro},
		{name: "unilet, pc (CRI run → create → start → log line)", machine: vmm.MachinePC},
		{name: "unilet, microvm (unilet.dev/machine: microvm)", machine: vmm.MachineMicroVM},
	}
	starts := make([][]float64, len(vs))
	rss := make([][]float64, len(vs))
	for i := 0; i < o.floorRuns; i++ {
		for j, v := range vs {
			e.settle()
			if v.argv != nil {
				d, b, err := e.startBare(e.bareArgv(v.argv, i, "", ""), 0)
				if err != nil {
					return fmt.Errorf("%s: %w", v.name, err)
				}
				time.Sleep(20 * time.Millisecond) // let the first line's work settle before reading RSS
				rss[j] = append(rss[j], rssMB(b.cmd.Process.Pid))
				b.kill()
				starts[j] = append(starts[j], ms(d))
				continue
			}
			e.machine = v.machine
			d, u, err := e.startVM([]string{tickArg})
			if err != nil {
				return fmt.Errorf("%s: %w", v.name, err)
			}
			time.Sleep(20 * time.Millisecond)
			rss[j] = append(rss[j], rssMB(e.qemuPID(u)))
			e.remove(u)
			starts[j] = append(starts[j], ms(d))
		}
	}
	n := o.concurrency[len(o.concurrency)-1]
	if err := e.ensureTaps(n); err != nil {
		return err
	}
	for j, v := range vs {
		row := FloorRow{Variant: v.name, Start: summarize(starts[j]), QEMUMB: round(mean(rss[j]), 1)}
		if v.machine != vmm.MachinePC { // unilet on pc: the concurrency section
			row.BurstN = n
			e.settle()
			if v.argv != nil {
				d, bares, err := e.bareBurst(v.argv, n)
				if err != nil {
					return fmt.Errorf("%s: %w", v.name, err)
				}
				parallel(bares, 8, (*bare).kill)
				row.BurstMs = ms(d)
			} else {
				e.machine = v.machine
				d, vms, err := e.uniletBurst(n)
				if err != nil {
					return fmt.Errorf("%s: %w", v.name, err)
				}
				parallel(vms, 8, e.remove)
				row.BurstMs = ms(d)
			}
		}
		log.Printf("  %s: start p50 %.1f ms, QEMU %.1f MB, %d at once %.0f ms", v.name, row.Start.P50, row.QEMUMB, n, row.BurstMs)
		res.Details.Floor = append(res.Details.Floor, row)
	}
	return nil
}
