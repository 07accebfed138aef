package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestSummarize(t *testing.T) {
	var xs []float64
	for i := 100; i >= 1; i-- {
		xs = append(xs, float64(i))
	}
	s := summarize(xs)
	require.Equal(t, Summary{P50: 51, P95: 96, P99: 100, N: 100}, s)
	require.Equal(t, Summary{}, summarize(nil))
}

func TestCountLines(t *testing.T) {
	seen, lost, reordered := countLines("boot\nline 1\nline 2\nline 4\nline 3\nline 5\n", 6)
	require.Equal(t, 5, seen)
	require.Equal(t, 1, lost)
	require.Equal(t, 1, reordered, "3 arrived after 4")
	seen, lost, reordered = countLines("line 1\nline 2\nline 3\n", 3)
	require.Equal(t, [3]int{3, 0, 0}, [3]int{seen, lost, reordered})
}

func TestReportAndTargets(t *testing.T) {
	r := &Results{Accel: "tcg", StartRatioP50: 1.05, StartOverheadMsP50: 20, ConcurrencyRatio100: 0.9, ShimRSSMB: 7,
		DaemonRSSMB100: 40, ListP99Ms200: 2, PassthroughOverheadMsP50: 0.2, LogThroughputRatio: 0.99,
		TemplateStartRatio: 0.2, WakeMsP50: 3, ClonePSSRatio: 0.25, IdleCPUPct100: 1,
		Skipped: map[string]string{"kube": "Kubernetes binaries not built"}}
	r.Details.Start = map[string]Summary{"unilet": {P50: 80, N: 3}, "bare": {P50: 60, N: 3}}
	r.Details.StartUniletMs, r.Details.StartBareMs = []float64{70, 80, 90}, []float64{50, 60, 70}
	missed := 0
	for _, tg := range targets(r) {
		if !tg.met {
			missed++
			require.Equal(t, "start_overhead_ms_p50", tg.key)
		}
	}
	require.Equal(t, 1, missed)
	doc := filepath.Join(t.TempDir(), "benchmarks.md")
	require.NoError(t, writeReport(r, doc))
	b, err := os.ReadFile(doc)
	require.NoError(t, err)
	require.Contains(t, string(b), "| `start_overhead_ms_p50` | 20 | ≤ +15 ms | **missed** |")
	require.Contains(t, string(b), "| kube | Kubernetes binaries not built |", "a skipped section is reported with why")
	svg, err := os.ReadFile(filepath.Join(filepath.Dir(doc), "benchmarks-start.svg"))
	require.NoError(t, err)
	require.True(t, strings.HasPrefix(string(svg), "<svg"))
	require.Equal(t, 2, strings.Count(string(svg), "<polyline"))
}

func TestAnonRAM(t *testing.T) {
	in := []string{"-name", "guest=x", "-object", "memory-backend-memfd,id=ram0,size=64M", "-machine", "pc,accel=tcg,memory-backend=ram0", "-m", "64"}
	got := anonRAM(in)
	want := []string{"-name", "guest=x", "-machine", "pc,accel=tcg", "-m", "64"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("anonRAM = %q, want %q", got, want)
	}
	if strings.Join(anonRAM(want), " ") != strings.Join(want, " ") {
		t.Fatal("anonRAM changed an argv without a memfd backend")
	}
}
