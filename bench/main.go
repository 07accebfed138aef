// Command bench measures unilet side by side with the physical floor — a bare
// QEMU running the same VM with the same argv — and with the alternative,
// containerd + runc, in one run with interleaved A/B runs. It writes
// bench/results.json and regenerates docs/benchmarks.md and
// docs/benchmarks-start.svg. Performance is reported, never asserted.
//
//	go run ./bench [--quick]
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"syscall"
	"time"
)

type options struct {
	quick                           bool
	only                            map[string]bool // sections to run (--only); nil = all
	startRuns, concurrency          []int
	startPairs, listCalls, floodN   int
	profileSecs                     int // daemon CPU profile window of the largest burst
	bigBursts                       int // interleaved burst pairs at the largest N
	consoleRuns, floorRuns          int
	passthroughRuns, crossPodCounts int
}

// Results is bench/results.json: the headline keys a script compares, then
// the details they come from.
type Results struct {
	Accel                    string  `json:"accel"`
	StartRatioP50            float64 `json:"start_ratio_p50"`
	StartOverheadMsP50       float64 `json:"start_overhead_ms_p50"`
	ConcurrencyRatio100      float64 `json:"concurrency_ratio_100"`
	ShimRSSMB                float64 `json:"shim_rss_mb"`
	DaemonRSSMB100           float64 `json:"daemon_rss_mb_100"`
	ListP99Ms200             float64 `json:"list_p99_ms_200"`
	PassthroughOverheadMsP50 float64 `json:"passthrough_overhead_ms_p50"`
	LogThroughputRatio       float64 `json:"log_throughput_ratio"`
	LogLostLines             int     `json:"log_lost_lines"`
	JailOverheadMsP50        float64 `json:"jail_overhead_ms_p50"`
	TemplateStartRatio       float64 `json:"template_start_ratio"`
	WakeMsP50                float64 `json:"wake_ms_p50"`
	ClonePSSRatio            float64 `json:"clone_pss_ratio"`
	IdleCPUPct100            float64 `json:"idle_cpu_pct_100"`
	// Skipped sections, each with why (the rest of the run went on).
	Skipped map[string]string `json:"skipped,omitempty"`

	Machine Machine `json:"machine"`
	Details Details `json:"details"`
}

// Machine records what the figures were measured on.
type Machine struct {
	Date, Commit, QEMU, Kernel, Mode string
	CPUs                             int
	MemGiB                           float64
}

// Details are the distributions behind the headline numbers.
type Details struct {
	StartUniletMs, StartBareMs []float64
	Start                      map[string]Summary
	StartPhases                []Phase
	Concurrency                []ConcurrencyRow
	Memory                     MemoryRow
	CRI                        []CRIRow
	Passthrough                map[string]Summary
	Console                    ConsoleRow
	Floor                      []FloorRow   `json:",omitempty"`
	Snapshot                   *SnapshotRow `json:",omitempty"`
	Kube                       *KubeRow     `json:",omitempty"`
	Jail                       *JailRow     `json:",omitempty"`
	Platform                   *PlatformRow `json:",omitempty"`
}

// Phase is one step of unilet's start path.
type Phase struct {
	Name string
	Summary
}

// Summary is a distribution's median, p95, p99 and count.
type Summary struct {
	P50, P95, P99 float64
	N             int
}

func summarize(xs []float64) Summary {
	if len(xs) == 0 {
		return Summary{}
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	q := func(p float64) float64 { return s[min(len(s)-1, int(p*float64(len(s))))] }
	return Summary{P50: q(0.5), P95: q(0.95), P99: q(0.99), N: len(s)}
}

// ConcurrencyRow is N VMs started at once.
type ConcurrencyRow struct {
	N                      int
	UniletMs, BareMs       float64
	Ratio                  float64 // bare / unilet (1 = as fast as bare QEMU), of the medians
	Runs                   int     // interleaved burst pairs (medians above)
	RatioMin, RatioMax     float64 `json:",omitempty"` // over the pairs, when Runs > 1
	UniletPerVMMs, BarePer float64
	// CPU seconds spent while the N VMs started, by process class (a
	// profile of where the time goes; the host total includes kernel threads).
	UniletCPU, BareCPU map[string]float64 `json:",omitempty"`
}

// MemoryRow is resident memory.
type MemoryRow struct {
	DaemonIdleMB, DaemonAt100MB, ShimMB, QEMUMB, BareQEMUMB float64
	Pods                                                    int
}

// CRIRow is one CRI call's latency at a number of pods.
type CRIRow struct {
	Call string
	Pods int
	Summary
}

// ConsoleRow is console throughput.
type ConsoleRow struct {
	Lines, Runs             int
	UniletBps, BareBps      float64
	Ratio                   float64
	Lost, Reordered, Bytes  int
	UniletSeconds, BareSecs float64
	// BarePipe*: bare QEMU's stdout through a pipe a plain Go reader drains.
	BarePipeBps, BarePipeSecs float64
}

func main() {
	log.SetFlags(0)
	log.SetPrefix(">> ")
	var o options
	flag.BoolVar(&o.quick, "quick", false, "the ≤ 3 minute run (fewer repetitions)")
	out := flag.String("out", "bench/results.json", "results file")
	doc := flag.String("doc", "docs/benchmarks.md", "report to regenerate")
	only := flag.String("only", "", "comma-separated sections to run ("+strings.Join(sections, ",")+
		"); prints the results instead of writing the report (for iterating on one figure)")
	pairs := flag.Int("pairs", 0, "start pairs to run (0: the mode's default)")
	reportOnly := flag.Bool("report", false, "only regenerate the report from the results file (after editing bench/analysis.md)")
	flag.Parse()
	if *reportOnly {
		var res Results
		b, err := os.ReadFile(*out)
		if err == nil {
			err = json.Unmarshal(b, &res)
		}
		if err == nil {
			err = writeReport(&res, *doc)
		}
		if err != nil {
			log.Fatal(err)
		}
		return
	}
	if *only != "" {
		o.only = map[string]bool{}
		for _, s := range strings.Split(*only, ",") {
			if !contains(sections, s) {
				log.Fatalf("--only: unknown section %q (want some of %s)", s, strings.Join(sections, ","))
			}
			o.only[s] = true
		}
	}
	o.startPairs, o.listCalls, o.floodN, o.passthroughRuns, o.consoleRuns = 40, 300, 100000, 8, 3
	o.concurrency = []int{1, 10, 50, 100}
	o.floorRuns, o.profileSecs, o.bigBursts = 15, 8, 3
	if o.quick {
		o.bigBursts = 1
		o.floorRuns = 6
		o.startPairs, o.listCalls, o.floodN, o.passthroughRuns, o.consoleRuns = 15, 200, 20000, 3, 2
		o.concurrency = []int{1, 10, 100}
	}
	if *pairs > 0 {
		o.startPairs = *pairs
	}
	if err := run(o, *out, *doc); err != nil {
		log.Fatal(err)
	}
}

func run(o options, out, doc string) error {
	t0 := time.Now()
	env, err := setup()
	if env != nil {
		defer env.teardown() // also after a failed set-up: mounts, processes
	}
	if err != nil {
		return err
	}
	res := &Results{Accel: env.accel, Machine: machine(o)}
	res.Details.Start = map[string]Summary{}
	res.Details.Passthrough = map[string]Summary{}

	steps := []struct {
		name, what string
		f          func(options, *Results) error
	}{
		{"start", fmt.Sprintf("start latency: %d interleaved pairs (unilet CRI run→create→start→first console line vs bare QEMU spawn→first line)", o.startPairs), env.measureStart},
		{"concurrency", fmt.Sprintf("concurrency: %v VMs at once", o.concurrency), env.measureConcurrency},
		{"floor", fmt.Sprintf("the floor: machine types and guest RAM, bare and through unilet (%d interleaved runs, then %d at once)", o.floorRuns, o.concurrency[len(o.concurrency)-1]), env.measureFloor},
		{"snapshot", fmt.Sprintf("snapshot template: restore vs boot (%d runs)", o.floorRuns), env.measureSnapshot},
		{"jail", fmt.Sprintf("the jail's cost: %d interleaved starts each, QEMU spawn → QMP ready (plain, -sandbox only, jailed)", o.startPairs), env.measureJail},
		{"cri", "CRI call latency at 0/100/200 pods", env.measureCRI},
		{"passthrough", "passthrough to containerd", env.measurePassthrough},
		{"console", fmt.Sprintf("console throughput: %d lines", o.floodN), env.measureConsole},
		{"platform", "Kraftlet's platform: template starts, scale-to-zero wakes, clone memory, 100 idle pods", env.measurePlatform},
	}
	if o.runs("start") || o.runs("concurrency") || o.runs("floor") || o.runs("snapshot") || o.runs("console") || o.runs("platform") {
		log.Print("warm-up: one unilet VM; its QEMU argv is every bare QEMU's")
		if err := env.warmUp(); err != nil {
			return fmt.Errorf("warm-up: %w", err)
		}
	}
	// A section that fails is reported as skipped, with why; the rest runs.
	skip := func(name string, err error) {
		if res.Skipped == nil {
			res.Skipped = map[string]string{}
		}
		res.Skipped[name] = err.Error()
		log.Printf("  %s FAILED, skipped: %v", name, err)
	}
	for _, st := range steps {
		if o.runs(st.name) {
			log.Print(st.what)
			if err := st.f(o, res); err != nil {
				skip(st.name, err)
				env.clearPods()
			}
		}
	}
	env.teardown() // the cluster below runs its own unilet and containerd
	if o.runs("kube") {
		log.Printf("through kubelet: pod create → Running (e2e cluster), unikernel vs plain pod")
		if err := measureKube(o, res); err != nil {
			skip("kube", err)
		}
	}
	if o.only != nil {
		b, _ := json.MarshalIndent(res, "", "  ")
		fmt.Println(string(b))
		log.Printf("done in %s (--only: %s and %s left as they were)", time.Since(t0).Round(time.Second), out, doc)
		return nil
	}
	b, _ := json.MarshalIndent(res, "", "  ")
	if err := os.WriteFile(out, append(b, '\n'), 0o644); err != nil {
		return err
	}
	if err := writeReport(res, doc); err != nil {
		return err
	}
	log.Printf("done in %s: %s, %s", time.Since(t0).Round(time.Second), out, doc)
	return nil
}

// sections are the parts of a run, in order (names for --only).
var sections = []string{"start", "concurrency", "floor", "snapshot", "jail", "cri", "passthrough", "console", "platform", "kube"}

func (o options) runs(section string) bool { return o.only == nil || o.only[section] }

func contains(xs []string, x string) bool {
	for _, y := range xs {
		if y == x {
			return true
		}
	}
	return false
}

func machine(o options) Machine {
	m := Machine{Date: time.Now().UTC().Format(time.RFC3339), CPUs: runtime.NumCPU(), Mode: "full"}
	if o.quick {
		m.Mode = "quick"
	}
	if b, err := exec.Command("git", "rev-parse", "--short", "HEAD").Output(); err == nil {
		m.Commit = strings.TrimSpace(string(b))
		if d, _ := exec.Command("git", "status", "--porcelain", "--untracked-files=no").Output(); len(d) > 0 {
			m.Commit += "-dirty"
		}
	}
	if b, err := exec.Command("qemu-system-x86_64", "--version").Output(); err == nil {
		m.QEMU = strings.TrimSpace(strings.SplitN(string(b), "\n", 2)[0])
	}
	var u syscall.Utsname
	if syscall.Uname(&u) == nil {
		m.Kernel = charsToString(u.Release[:])
	}
	var si syscall.Sysinfo_t
	if syscall.Sysinfo(&si) == nil {
		m.MemGiB = float64(si.Totalram) * float64(si.Unit) / (1 << 30)
	}
	return m
}

func charsToString(ca []int8) string {
	var b strings.Builder
	for _, c := range ca {
		if c == 0 {
			break
		}
		b.WriteByte(byte(c))
	}
	return b.String()
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// rssMB reads a process's resident set in MB.
func rssMB(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmRSS:") {
			var kb float64
			fmt.Sscanf(strings.TrimSpace(strings.TrimPrefix(l, "VmRSS:")), "%f", &kb)
			return kb / 1024
		}
	}
	return 0
}

// pidsMatching returns processes whose command line contains all of parts.
func pidsMatching(parts ...string) []int {
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		var pid int
		if _, err := fmt.Sscan(e.Name(), &pid); err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		cmd := string(b)
		ok := true
		for _, p := range parts {
			ok = ok && strings.Contains(cmd, p)
		}
		if ok {
			out = append(out, pid)
		}
	}
	return out
}

// procCPU returns a process's own CPU seconds and those of its reaped children.
func procCPU(pid int) (self, children float64) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:]) // fields from 3 (state) on
	if len(f) < 15 {
		return 0, 0
	}
	var t [4]float64
	for i := range t {
		fmt.Sscan(f[11+i], &t[i]) // utime, stime, cutime, cstime
	}
	return (t[0] + t[1]) / clockTicks, (t[2] + t[3]) / clockTicks
}

// clockTicks is USER_HZ, 100 on every Linux x86 build.
const clockTicks = 100

// hostBusy returns the host's busy CPU seconds (all CPUs, all but idle and iowait).
func hostBusy() float64 {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	f := strings.Fields(strings.SplitN(string(b), "\n", 2)[0])
	var busy float64
	for i, v := range f[1:] {
		var x float64
		fmt.Sscan(v, &x)
		if i != 3 && i != 4 && i < 8 { // idle, iowait; guest times are inside user
			busy += x
		}
	}
	return busy / clockTicks
}

// cpuOf sums the own CPU seconds of pids, less what before recorded for them.
func cpuOf(pids []int, before map[int]float64) float64 {
	var sum float64
	for _, p := range pids {
		c, _ := procCPU(p)
		sum += c - before[p]
	}
	return sum
}

func cpuMap(pids []int) map[int]float64 {
	m := map[int]float64{}
	for _, p := range pids {
		m[p], _ = procCPU(p)
	}
	return m
}

func mean(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := 0.0
	for _, x := range xs {
		s += x
	}
	return s / float64(len(xs))
}

var bg = context.Background()
