package main

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/internal/testimages"
	"github.com/unilet-dev/unilet/pkg/netns"
	"github.com/unilet-dev/unilet/vmm"
	"github.com/unilet-dev/unilet/vmm/jail"
)

var seq atomic.Int64

// vm is one unikernel pod started through CRI, with the time each phase took.
type vm struct {
	pod, ctr, log string
	phases        [4]time.Duration // RunPodSandbox, CreateContainer, StartContainer, first line in the log
}

var phaseNames = [4]string{"RunPodSandbox (netns, CNI ADD, tap)", "CreateContainer", "StartContainer (cgroup, shim, QEMU, QMP)", "first console line → CRI log"}

// startVM runs a pod and a container with args through unilet's CRI and
// returns once the first console line is in the CRI log.
func (e *env) startVM(args []string) (time.Duration, vm, error) {
	name := fmt.Sprintf("b%d", seq.Add(1))
	pc := e.podConfig(name)
	t0 := time.Now()
	pod, err := e.rt.RunPodSandbox(bg, &runtimeapi.RunPodSandboxRequest{Config: pc})
	if err != nil {
		return 0, vm{}, err
	}
	v := vm{pod: pod.GetPodSandboxId(), log: filepath.Join(pc.LogDirectory, "app", "0.log")}
	mark := t0
	phase := func(i int) { now := time.Now(); v.phases[i] = now.Sub(mark); mark = now }
	phase(0)
	ctr, err := e.rt.CreateContainer(bg, &runtimeapi.CreateContainerRequest{PodSandboxId: v.pod, SandboxConfig: pc,
		Config: &runtimeapi.ContainerConfig{Metadata: &runtimeapi.ContainerMetadata{Name: "app"}, Image: &runtimeapi.ImageSpec{Image: e.image},
			Args: args, LogPath: "app/0.log"}})
	if err != nil {
		return 0, v, err
	}
	v.ctr = ctr.GetContainerId()
	phase(1)
	if _, err := e.rt.StartContainer(bg, &runtimeapi.StartContainerRequest{ContainerId: v.ctr}); err != nil {
		return 0, v, err
	}
	phase(2)
	if err := waitLine(v.log, 60*time.Second); err != nil {
		return 0, v, fmt.Errorf("%s: %w", v.ctr, err)
	}
	phase(3)
	return time.Since(t0), v, nil
}

// waitLine returns once the file at path holds a complete line. It sleeps in
// inotify, not in a polling loop: a hundred waiters polling would take the
// CPU the VMs they wait for need.
func waitLine(path string, timeout time.Duration) error {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if _, err := unix.InotifyAddWatch(fd, path, unix.IN_MODIFY); err != nil {
			time.Sleep(time.Millisecond) // not created yet
			continue
		}
		break
	}
	buf := make([]byte, 4096)
	for time.Now().Before(deadline) {
		if b, err := os.ReadFile(path); err == nil && bytes.IndexByte(b, '\n') >= 0 {
			return nil
		}
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		if _, err := unix.Poll(pfd, int(time.Until(deadline)/time.Millisecond)+1); err != nil && err != unix.EINTR {
			return err
		}
		for {
			if _, err := unix.Read(fd, buf); err != nil {
				break // drained (EAGAIN)
			}
		}
	}
	return fmt.Errorf("no console line in %s after %s", path, timeout)
}

// settle waits until the node is quiet before a sample: the daemon's shim
// pool full again (it refills once starts pause) and the CPUs idle for
// 100 ms, so no sample pays for work an earlier one left behind (pool
// refills, QEMU and shim exits, cgroup and netns teardown). On a host that
// is never idle it gives up after 1.5 s, so a run stays within its time.
func (e *env) settle() {
	deadline := time.Now().Add(1500 * time.Millisecond)
	for time.Now().Before(deadline) {
		if st, err := e.rt.Status(bg, &runtimeapi.StatusRequest{Verbose: true}); err == nil {
			if n := st.GetInfo()["shimPoolIdle"]; n != "" && n != strconv.Itoa(shimPool) {
				time.Sleep(20 * time.Millisecond)
				continue
			}
		}
		b0 := hostBusy()
		time.Sleep(100 * time.Millisecond)
		if hostBusy()-b0 <= 0.02 { // ≤ 2 ticks of USER_HZ on all CPUs together
			return
		}
	}
}

func (e *env) remove(v vm) {
	_, _ = e.rt.RemovePodSandbox(bg, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: v.pod})
}

// captureArgv returns the QEMU argv unilet used for a VM (from /proc).
func (e *env) captureArgv(v vm) ([]string, error) {
	st, err := e.rt.ContainerStatus(bg, &runtimeapi.ContainerStatusRequest{ContainerId: v.ctr, Verbose: true})
	if err != nil {
		return nil, err
	}
	b, err := os.ReadFile("/proc/" + st.GetInfo()["pid"] + "/cmdline")
	if err != nil {
		return nil, err
	}
	argv := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
	return argv[1:], nil
}

// bareArgv adapts a captured argv (a jailed QEMU's): its own QMP socket
// instead of the handed-over one, the kernel at its host path, and appArg
// in place of oldArg. QEMU's seccomp filter (-sandbox) stays: it is QEMU's.
func (e *env) bareArgv(argv []string, i int, oldArg, appArg string) []string {
	out := append([]string(nil), argv...)
	for j, a := range out {
		if strings.HasPrefix(a, "socket,id=qmp0,") {
			out[j] = "socket,id=qmp0,path=" + filepath.Join(e.run, "bare", fmt.Sprintf("%d.sock", i)) + ",server=on,wait=off"
		}
		if j > 0 && out[j-1] == "-kernel" && a == jail.Kernel {
			out[j] = e.kernel
		}
		if j > 0 && out[j-1] == "-append" && oldArg != "" {
			out[j] = strings.Replace(a, oldArg, appArg, 1)
		}
	}
	return out
}

// ensureTaps creates taps tap0..tap(n-1) in the bare namespace.
func (e *env) ensureTaps(n int) error {
	return netns.Do(e.bareNS, func() error {
		for i := 0; i < n; i++ {
			name := "tap" + strconv.Itoa(i)
			if _, err := netlink.LinkByName(name); err == nil {
				continue
			}
			t := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: name}, Mode: netlink.TUNTAP_MODE_TAP,
				Flags: netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR | netlink.TUNTAP_ONE_QUEUE}
			if err := netlink.LinkAdd(t); err != nil {
				return err
			}
		}
		return nil
	})
}

// bare is a QEMU started directly, the same way unilet's shim starts it.
type bare struct {
	cmd   *exec.Cmd
	out   io.ReadCloser
	stdin *os.File
}

// spawnBare starts QEMU with argv and tap i of the bare namespace, its
// console on pipes; started is when the process was spawned.
func (e *env) spawnBare(argv []string, tap int) (b *bare, out *bufio.Reader, started time.Time, err error) {
	taps, err := vmm.OpenTaps([]vmm.NIC{{Tap: "tap" + strconv.Itoa(tap), NetNS: e.bareNS}})
	if err != nil {
		return nil, nil, started, err
	}
	defer closeAll(taps) // QEMU holds its own copies
	cmd := exec.Command("qemu-system-x86_64", argv...)
	cmd.ExtraFiles = taps
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, nil, started, err
	}
	inR, inW, err := os.Pipe()
	if err != nil {
		return nil, nil, started, err
	}
	defer inR.Close()
	cmd.Stdin = inR
	started = time.Now()
	if err := cmd.Start(); err != nil {
		inW.Close()
		return nil, nil, started, err
	}
	return &bare{cmd: cmd, out: stdout, stdin: inW}, bufio.NewReader(stdout), started, nil
}

func closeAll(fs []*os.File) {
	for _, f := range fs {
		f.Close()
	}
}

// startBare spawns QEMU with argv and tap i; it returns when the first
// console line arrived on its stdout.
func (e *env) startBare(argv []string, tap int) (time.Duration, *bare, error) {
	b, r, t0, err := e.spawnBare(argv, tap)
	if err != nil {
		return 0, nil, err
	}
	if _, err := r.ReadString('\n'); err != nil {
		b.kill()
		return 0, nil, fmt.Errorf("bare QEMU: %v", err)
	}
	d := time.Since(t0)
	go func() { _, _ = io.Copy(io.Discard, r) }()
	return d, b, nil
}

func (b *bare) kill() {
	_ = b.cmd.Process.Kill()
	_ = b.cmd.Wait()
	b.stdin.Close()
}

const tickArg = "tick=600000"

// warmUp starts and removes one unilet VM (page cache, image, CNI) and keeps
// its QEMU argv in e.argv: every bare QEMU of the run uses that argv.
func (e *env) warmUp() error {
	_, w, err := e.startVM([]string{tickArg})
	if err != nil {
		return err
	}
	argv, err := e.captureArgv(w)
	e.remove(w)
	if err != nil {
		return err
	}
	e.argv = argv
	return e.ensureTaps(1)
}

func (e *env) measureStart(o options, res *Results) error {
	argv := e.argv
	logStart := fileSize(filepath.Join(e.dir, "unilet.log"))
	var u, b []float64
	phases := make([][]float64, len(phaseNames))
	for i := 0; i < o.startPairs; i++ {
		e.settle()
		d, v, err := e.startVM([]string{tickArg})
		if err != nil {
			return err
		}
		e.remove(v)
		u = append(u, ms(d))
		for j, p := range v.phases {
			phases[j] = append(phases[j], ms(p))
		}
		e.settle()
		d, q, err := e.startBare(e.bareArgv(argv, i, "", ""), 0)
		if err != nil {
			return err
		}
		q.kill()
		b = append(b, ms(d))
	}
	res.Details.StartUniletMs, res.Details.StartBareMs = u, b
	su, sb := summarize(u), summarize(b)
	res.Details.Start["unilet"], res.Details.Start["bare"] = su, sb
	// The daemon's own steps of RunPodSandbox and StartContainer, as it logged them.
	steps := startSteps(filepath.Join(e.dir, "unilet.log"), logStart)
	sub := [][]struct{ key, name string }{
		0: {{"unikernel pod sandbox created/netnsMs", "… network namespace created (and recorded)"},
			{"unikernel pod sandbox created/cniMs", "… CNI ADD (bridge, host-local executables)"},
			{"unikernel pod sandbox created/tapMs", "… tap joined to the pod's eth0"}},
		2: {{"unikernel VM started/cgroupMs", "… cgroup created"}, {"unikernel VM started/shimMs", "… unilet-shim spawned until it answers"},
			{"unikernel VM started/bootMs", "… Start RPC: QEMU spawn to QMP ready"}},
	}
	for j, n := range phaseNames {
		res.Details.StartPhases = append(res.Details.StartPhases, Phase{Name: n, Summary: summarize(phases[j])})
		if j < len(sub) {
			for _, k := range sub[j] {
				res.Details.StartPhases = append(res.Details.StartPhases, Phase{Name: k.name, Summary: summarize(steps[k.key])})
			}
		}
	}
	res.StartRatioP50 = round(su.P50/sb.P50, 3)
	res.StartOverheadMsP50 = round(su.P50-sb.P50, 1)
	return nil
}

func roundMap(m map[string]float64) map[string]float64 {
	for k, v := range m {
		m[k] = round(v, 2)
	}
	return m
}

func round(x float64, d int) float64 {
	p := 1.0
	for i := 0; i < d; i++ {
		p *= 10
	}
	return float64(int64(x*p+0.5)) / p
}

func (e *env) measureConcurrency(o options, res *Results) error {
	maxN := o.concurrency[len(o.concurrency)-1]
	if err := e.ensureTaps(maxN); err != nil {
		return err
	}
	res.Details.Memory.DaemonIdleMB = round(rssMB(e.daemon.Process.Pid), 1)
	for _, n := range o.concurrency {
		runs := 1
		if n == maxN {
			runs = o.bigBursts // one burst of 100 varies by ±15 % on this machine
		}
		var us, bs, ratios []float64
		ucpu, bcpu := map[string]float64{}, map[string]float64{}
		for r := 0; r < runs; r++ {
			ud, bd, uc, bc, err := e.burstPair(o, res, n, n == maxN && r == 0)
			if err != nil {
				return err
			}
			us, bs, ratios = append(us, ms(ud)), append(bs, ms(bd)), append(ratios, ms(bd)/ms(ud))
			for k, v := range uc {
				ucpu[k] += v / float64(runs)
			}
			for k, v := range bc {
				bcpu[k] += v / float64(runs)
			}
		}
		um, bm := round(summarize(us).P50, 1), round(summarize(bs).P50, 1)
		row := ConcurrencyRow{N: n, UniletMs: um, BareMs: bm, Ratio: round(bm/um, 3), Runs: runs,
			UniletPerVMMs: round(um/float64(n), 1), BarePer: round(bm/float64(n), 1), UniletCPU: roundMap(ucpu), BareCPU: roundMap(bcpu)}
		if runs > 1 {
			sort.Float64s(ratios)
			row.RatioMin, row.RatioMax = round(ratios[0], 3), round(ratios[len(ratios)-1], 3)
		}
		res.Details.Concurrency = append(res.Details.Concurrency, row)
		log.Printf("  N=%d (%d runs): unilet %.0f ms, bare %.0f ms; CPU s unilet %v bare %v", n, runs, row.UniletMs, row.BareMs, row.UniletCPU, row.BareCPU)
		if n == 100 {
			res.ConcurrencyRatio100 = row.Ratio
		}
	}
	return nil
}

// burstPair starts n VMs at once through unilet, then n bare QEMUs, each
// after the node settled; it returns both times and the CPU each side used
// by process class. first: profile the daemon and record memory.
func (e *env) burstPair(o options, res *Results, n int, first bool) (ud, bd time.Duration, ucpu, bcpu map[string]float64, err error) {
	// unilet: n pods started at once; time until every console printed.
	e.settle()
	shims0 := cpuMap(pidsMatching("unilet-shim", e.dir))
	dSelf0, dKids0 := procCPU(e.daemon.Process.Pid)
	host0 := hostBusy()
	me0, _ := procCPU(os.Getpid())
	var profiled chan struct{}
	if first {
		profiled = e.profileDaemon(o.profileSecs)
	}
	ud, vms, err := e.uniletBurst(n)
	if profiled != nil {
		<-profiled
	}
	if err != nil {
		return 0, 0, nil, nil, err
	}
	dSelf, dKids := procCPU(e.daemon.Process.Pid)
	shimPIDs, qemuPIDs := pidsMatching("unilet-shim", e.dir), pidsMatching("qemu-system", e.stateDir())
	ucpu = map[string]float64{"daemon": dSelf - dSelf0, "daemon's exited children (CNI plugins)": dKids - dKids0,
		"shims": cpuOf(shimPIDs, shims0), "QEMU": cpuOf(qemuPIDs, nil)}
	ucpu["host total"] = hostBusy() - host0
	me, _ := procCPU(os.Getpid())
	ucpu["bench (CRI client)"] = me - me0
	if first {
		m := &res.Details.Memory
		m.Pods = n
		m.DaemonAt100MB = round(rssMB(e.daemon.Process.Pid), 1)
		var shims, qemus []float64
		for _, p := range shimPIDs {
			shims = append(shims, rssMB(p))
		}
		for _, p := range qemuPIDs {
			qemus = append(qemus, rssMB(p))
		}
		m.ShimMB, m.QEMUMB = round(mean(shims), 1), round(mean(qemus), 1)
		res.ShimRSSMB, res.DaemonRSSMB100 = m.ShimMB, m.DaemonAt100MB
	}
	parallel(vms, 8, e.remove)

	// bare: n QEMUs at once.
	e.settle()
	host0 = hostBusy()
	me0, _ = procCPU(os.Getpid())
	bd, bares, err := e.bareBurst(e.argv, n)
	if err != nil {
		return 0, 0, nil, nil, err
	}
	me, _ = procCPU(os.Getpid())
	bcpu = map[string]float64{"host total": hostBusy() - host0, "bench (QEMU parent)": me - me0}
	var bareRSS []float64
	for _, b := range bares {
		bareRSS = append(bareRSS, rssMB(b.cmd.Process.Pid))
		c, _ := procCPU(b.cmd.Process.Pid)
		bcpu["QEMU"] += c
	}
	if first {
		res.Details.Memory.BareQEMUMB = round(mean(bareRSS), 1)
	}
	parallel(bares, 8, (*bare).kill)
	return ud, bd, ucpu, bcpu, nil
}

// parallel runs f over items with w workers.
func parallel[T any](items []T, w int, f func(T)) {
	ch := make(chan T)
	var wg sync.WaitGroup
	for i := 0; i < w; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for it := range ch {
				f(it)
			}
		}()
	}
	for _, it := range items {
		ch <- it
	}
	close(ch)
	wg.Wait()
}

func timeCalls(n int, f func() error) ([]float64, error) {
	var out []float64
	for i := 0; i < n; i++ {
		t := time.Now()
		if err := f(); err != nil {
			return nil, err
		}
		out = append(out, ms(time.Since(t)))
	}
	return out, nil
}

func (e *env) measureCRI(o options, res *Results) error {
	var pods []string
	var firstCtr string
	for _, target := range []int{0, 100, 200} {
		for len(pods) < target {
			name := fmt.Sprintf("l%d", seq.Add(1))
			pc := e.podConfig(name)
			p, err := e.rt.RunPodSandbox(bg, &runtimeapi.RunPodSandboxRequest{Config: pc})
			if err != nil {
				return err
			}
			c, err := e.rt.CreateContainer(bg, &runtimeapi.CreateContainerRequest{PodSandboxId: p.GetPodSandboxId(), SandboxConfig: pc,
				Config: &runtimeapi.ContainerConfig{Metadata: &runtimeapi.ContainerMetadata{Name: "app"}, Image: &runtimeapi.ImageSpec{Image: e.image}, LogPath: "app/0.log"}})
			if err != nil {
				return err
			}
			if firstCtr == "" {
				firstCtr = c.GetContainerId()
			}
			pods = append(pods, p.GetPodSandboxId())
		}
		type call struct {
			name     string
			upstream bool // straight to containerd, which holds no pods here: the round trip every merged list includes
			f        func() error
		}
		calls := []call{
			{"ListPodSandbox", false, func() error { _, err := e.rt.ListPodSandbox(bg, &runtimeapi.ListPodSandboxRequest{}); return err }},
			{"ListContainers", false, func() error { _, err := e.rt.ListContainers(bg, &runtimeapi.ListContainersRequest{}); return err }},
		}
		if firstCtr != "" {
			calls = append(calls, call{"ContainerStatus", false, func() error {
				_, err := e.rt.ContainerStatus(bg, &runtimeapi.ContainerStatusRequest{ContainerId: firstCtr})
				return err
			}})
		}
		calls = append(calls,
			call{"ListPodSandbox, containerd directly", true, func() error {
				_, err := e.ctrdRT.ListPodSandbox(bg, &runtimeapi.ListPodSandboxRequest{})
				return err
			}},
			call{"ListContainers, containerd directly", true, func() error {
				_, err := e.ctrdRT.ListContainers(bg, &runtimeapi.ListContainersRequest{})
				return err
			}})
		for _, c := range calls {
			name := c.name
			xs, err := timeCalls(o.listCalls, c.f)
			if err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
			s := summarize(xs)
			res.Details.CRI = append(res.Details.CRI, CRIRow{Call: name, Pods: target, Summary: s})
			if target == 200 && s.P99 > res.ListP99Ms200 && strings.HasPrefix(name, "List") && !c.upstream {
				res.ListP99Ms200 = round(s.P99, 3)
			}
		}
	}
	parallel(pods, 8, func(id string) {
		_, _ = e.rt.RemovePodSandbox(bg, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: id})
	})
	return nil
}

// busybox starts a host-network busybox pod on rt (unilet or containerd directly)
// and returns the time until its container runs.
func busybox(rt runtimeapi.RuntimeServiceClient, name string) (time.Duration, string, error) {
	pc := &runtimeapi.PodSandboxConfig{Metadata: &runtimeapi.PodSandboxMetadata{Name: name, Namespace: "bench", Uid: name},
		Linux: &runtimeapi.LinuxPodSandboxConfig{SecurityContext: &runtimeapi.LinuxSandboxSecurityContext{
			NamespaceOptions: &runtimeapi.NamespaceOption{Network: runtimeapi.NamespaceMode_NODE}}}}
	t0 := time.Now()
	p, err := rt.RunPodSandbox(bg, &runtimeapi.RunPodSandboxRequest{Config: pc})
	if err != nil {
		return 0, "", err
	}
	c, err := rt.CreateContainer(bg, &runtimeapi.CreateContainerRequest{PodSandboxId: p.GetPodSandboxId(), SandboxConfig: pc,
		Config: &runtimeapi.ContainerConfig{Metadata: &runtimeapi.ContainerMetadata{Name: "sh"}, Image: &runtimeapi.ImageSpec{Image: testimages.Busybox},
			Command: []string{"/bin/sleep", "3600"}}})
	if err != nil {
		return 0, p.GetPodSandboxId(), err
	}
	if _, err := rt.StartContainer(bg, &runtimeapi.StartContainerRequest{ContainerId: c.GetContainerId()}); err != nil {
		return 0, p.GetPodSandboxId(), err
	}
	return time.Since(t0), p.GetPodSandboxId(), nil
}

func removePod(rt runtimeapi.RuntimeServiceClient, id string) {
	_, _ = rt.StopPodSandbox(bg, &runtimeapi.StopPodSandboxRequest{PodSandboxId: id})
	_, _ = rt.RemovePodSandbox(bg, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: id})
}

func (e *env) measurePassthrough(o options, res *Results) error {
	var via, direct []float64
	for i := 0; i < o.passthroughRuns; i++ {
		d, id, err := busybox(e.rt, fmt.Sprintf("pt-u%d", i))
		if err != nil {
			return err
		}
		removePod(e.rt, id)
		via = append(via, ms(d))
		d, id, err = busybox(e.ctrdRT, fmt.Sprintf("pt-d%d", i))
		if err != nil {
			return err
		}
		removePod(e.ctrdRT, id)
		direct = append(direct, ms(d))
	}
	res.Details.Passthrough["podStartViaUnilet"], res.Details.Passthrough["podStartDirect"] = summarize(via), summarize(direct)
	// One call: PodSandboxStatus of a containerd pod, through unilet vs straight.
	_, id, err := busybox(e.rt, "pt-call")
	if err != nil {
		return err
	}
	defer removePod(e.rt, id)
	var cu, cd []float64
	for i := 0; i < o.listCalls; i++ {
		t := time.Now()
		if _, err := e.rt.PodSandboxStatus(bg, &runtimeapi.PodSandboxStatusRequest{PodSandboxId: id}); err != nil {
			return err
		}
		cu = append(cu, ms(time.Since(t)))
		t = time.Now()
		if _, err := e.ctrdRT.PodSandboxStatus(bg, &runtimeapi.PodSandboxStatusRequest{PodSandboxId: id}); err != nil {
			return err
		}
		cd = append(cd, ms(time.Since(t)))
	}
	su, sd := summarize(cu), summarize(cd)
	res.Details.Passthrough["statusViaUnilet"], res.Details.Passthrough["statusDirect"] = su, sd
	res.PassthroughOverheadMsP50 = round(su.P50-sd.P50, 3)
	return nil
}

// countLines checks "line <i>" numbering: lines seen, lost (never seen) and
// reordered (arrived after a higher number).
func countLines(text string, n int) (seen, lost, reordered int) {
	highest := 0
	for _, l := range strings.Split(text, "\n") {
		i := strings.Index(l, "line ")
		if i < 0 {
			continue
		}
		v, err := strconv.Atoi(strings.TrimSpace(l[i+5:]))
		if err != nil {
			continue
		}
		seen++
		if v < highest {
			reordered++
		}
		highest = max(highest, v)
	}
	return seen, n - seen, reordered
}

func (e *env) measureConsole(o options, res *Results) error {
	flood := "flood=" + strconv.Itoa(o.floodN)
	c := ConsoleRow{Lines: o.floodN, Runs: o.consoleRuns}
	var ub, bb, pb, us, bs, ps []float64
	for i := 0; i < o.consoleRuns; i++ { // interleaved A/B; medians
		r, err := e.uniletFlood(flood, o.floodN)
		if err != nil {
			return err
		}
		c.Lost += r.Lost
		c.Reordered += r.Reordered
		c.Bytes = r.Bytes
		ub, us = append(ub, r.UniletBps), append(us, r.UniletSeconds)
		secs, bps, err := e.bareFlood(flood, o.floodN, false)
		if err != nil {
			return err
		}
		bb, bs = append(bb, bps), append(bs, secs)
		if secs, bps, err = e.bareFlood(flood, o.floodN, true); err != nil {
			return err
		}
		pb, ps = append(pb, bps), append(ps, secs)
	}
	c.UniletBps, c.BareBps, c.BarePipeBps = summarize(ub).P50, summarize(bb).P50, summarize(pb).P50
	c.UniletSeconds, c.BareSecs, c.BarePipeSecs = summarize(us).P50, summarize(bs).P50, summarize(ps).P50
	if c.BareBps > 0 {
		c.Ratio = round(c.UniletBps/c.BareBps, 3)
	}
	res.Details.Console = c
	res.LogThroughputRatio, res.LogLostLines = c.Ratio, c.Lost+c.Reordered
	return nil
}

// uniletFlood runs one flood through unilet: bytes/s from the CRI log's own timestamps.
func (e *env) uniletFlood(flood string, n int) (ConsoleRow, error) {
	var c ConsoleRow
	_, v, err := e.startVM([]string{flood})
	if err != nil {
		return c, err
	}
	defer e.remove(v)
	for deadline := time.Now().Add(10 * time.Minute); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		st, err := e.rt.ContainerStatus(bg, &runtimeapi.ContainerStatusRequest{ContainerId: v.ctr})
		if err == nil && st.GetStatus().GetState() == runtimeapi.ContainerState_CONTAINER_EXITED {
			break
		}
	}
	b, err := os.ReadFile(v.log)
	if err != nil {
		return c, err
	}
	var first, last time.Time
	var text strings.Builder
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.SplitN(l, " ", 4)
		if len(f) < 4 || !strings.HasPrefix(f[3], "line ") {
			continue
		}
		ts, err := time.Parse(time.RFC3339Nano, f[0])
		if err != nil {
			continue
		}
		if first.IsZero() {
			first = ts
		}
		last = ts
		c.Bytes += len(f[3]) + 1
		text.WriteString(f[3] + "\n")
	}
	_, c.Lost, c.Reordered = countLines(text.String(), n)
	c.UniletSeconds = last.Sub(first).Seconds()
	if c.UniletSeconds > 0 {
		c.UniletBps = round(float64(c.Bytes)/c.UniletSeconds, 0)
	}
	return c, nil
}

// bareFlood runs the flood in a bare QEMU whose serial (stdout) goes to a
// file: written by QEMU itself (viaPipe false: the floor), or through
// a pipe that a plain Go reader (os/exec StdoutPipe, io.Copy) drains into the
// file — what a naive shim would do. The file's size is sampled every
// millisecond; afterwards the samples place the first and the last flood line
// in time (the same span unilet's log timestamps measure). It returns seconds
// and bytes/s.
func (e *env) bareFlood(flood string, n int, viaPipe bool) (secs, bps float64, err error) {
	argv := e.bareArgv(e.argv, 9999, tickArg, flood)
	taps, err := vmm.OpenTaps([]vmm.NIC{{Tap: "tap0", NetNS: e.bareNS}})
	if err != nil {
		return 0, 0, err
	}
	path := filepath.Join(e.dir, "bare-serial.txt")
	f, err := os.Create(path)
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	cmd := exec.Command("qemu-system-x86_64", argv...)
	cmd.ExtraFiles = taps
	var copied chan struct{}
	if viaPipe {
		out, err := cmd.StdoutPipe()
		if err != nil {
			return 0, 0, err
		}
		copied = make(chan struct{})
		go func() { _, _ = io.Copy(f, out); close(copied) }()
	} else {
		cmd.Stdout = f
	}
	err = cmd.Start()
	closeAll(taps)
	if err != nil {
		return 0, 0, err
	}
	done := make(chan struct{})
	go func() {
		if copied != nil {
			<-copied // Wait closes the pipe: drain it first
		}
		_ = cmd.Wait()
		close(done)
	}()
	type sample struct {
		t    time.Time
		size int64
	}
	var samples []sample
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for exited := false; !exited; {
		select {
		case <-done:
			exited = true
		case <-tick.C:
		}
		samples = append(samples, sample{time.Now(), fileSize(path)})
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, 0, err
	}
	last := fmt.Sprintf("line %d\n", n)
	from, to := bytes.Index(b, []byte("line 1\n")), bytes.Index(b, []byte(last))
	if from < 0 || to < 0 {
		return 0, 0, fmt.Errorf("bare flood: lines 1 and %d not both in %s", n, path)
	}
	to += len(last)
	var t0, t1 time.Time
	for _, x := range samples {
		if t0.IsZero() && x.size > int64(from) {
			t0 = x.t
		}
		if t1.IsZero() && x.size >= int64(to) {
			t1 = x.t
		}
	}
	if secs = t1.Sub(t0).Seconds(); secs > 0 {
		bps = round(float64(to-from)/secs, 0)
	}
	return secs, bps, nil
}

func fileSize(p string) int64 {
	fi, err := os.Stat(p)
	if err != nil {
		return 0
	}
	return fi.Size()
}

// startSteps collects the daemon's logged step times of the starts after
// offset in its log, keyed "<message>/<field>".
func startSteps(path string, offset int64) map[string][]float64 {
	out := map[string][]float64{}
	b, err := os.ReadFile(path)
	if err != nil || int64(len(b)) < offset {
		return out
	}
	for _, l := range strings.Split(string(b[offset:]), "\n") {
		var msg string
		for _, m := range []string{"unikernel VM started", "unikernel pod sandbox created"} {
			if strings.Contains(l, `msg="`+m+`"`) {
				msg = m
			}
		}
		if msg == "" {
			continue
		}
		for _, f := range strings.Fields(l) {
			k, v, ok := strings.Cut(f, "=")
			if !ok || !strings.HasSuffix(k, "Ms") {
				continue
			}
			if x, err := strconv.ParseFloat(v, 64); err == nil {
				out[msg+"/"+k] = append(out[msg+"/"+k], x)
			}
		}
	}
	return out
}

// profileDaemon records the daemon's CPU profile for secs seconds into
// $UNILET_BENCH_PROFILE, when that and UNILET_BENCH_PPROF are set (for the
// 100-pod burst: go tool pprof -top bin/unilet FILE), and a host-wide perf
// profile into $UNILET_BENCH_PERF. The channel closes when the Go profile is done.
func (e *env) profileDaemon(secs int) chan struct{} {
	if out := os.Getenv("UNILET_BENCH_PERF"); out != "" { // the whole host: perf report -i FILE --sort comm
		perf := exec.Command("perf", "record", "-a", "-g", "-o", out, "--", "sleep", strconv.Itoa(secs))
		if err := perf.Start(); err == nil {
			go func() { _ = perf.Wait(); log.Printf("host perf profile of the burst: %s", out) }()
			time.Sleep(200 * time.Millisecond) // perf is recording before the burst
		}
	}
	done := make(chan struct{})
	addr, out := os.Getenv("UNILET_BENCH_PPROF"), os.Getenv("UNILET_BENCH_PROFILE")
	if addr == "" || out == "" {
		close(done)
		return done
	}
	go func() {
		defer close(done)
		resp, err := http.Get(fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", addr, secs))
		if err != nil {
			log.Printf("daemon profile: %v", err)
			return
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if err := os.WriteFile(out, b, 0o644); err == nil {
			log.Printf("daemon CPU profile of the %ds burst window: %s", secs, out)
		}
	}()
	time.Sleep(50 * time.Millisecond) // the request reaches the daemon before the burst
	return done
}
