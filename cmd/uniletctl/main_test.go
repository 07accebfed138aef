package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/unilet-dev/unilet/api/admin"
)

func TestCRILogPrinter(t *testing.T) {
	var out bytes.Buffer
	p := criLogPrinter{w: &out}
	require.NoError(t, p.write([]byte("2026-12-06T20:00:00Z stdout F hello\n2026-12-06T20:00:01Z stdout P par")))
	require.NoError(t, p.write([]byte("t\n2026-12-06T20:00:02Z stdout F ial\nnot a cri line\n2026-12-06T20:00:03Z stdout F last")))
	require.NoError(t, p.flush())
	require.Equal(t, "hello\npartial\nnot a cri line\nlast\n", out.String())

	out.Reset()
	p = criLogPrinter{w: &out, timestamps: true}
	require.NoError(t, p.write([]byte("2026-12-06T20:00:00Z stdout F hello\n")))
	require.Equal(t, "2026-12-06T20:00:00Z hello\n", out.String())
}

func TestPsTable(t *testing.T) {
	now := time.Unix(1000, 0)
	pods := []*admin.Pod{
		{Id: strings.Repeat("a", 64), Namespace: "default", Name: "web", State: "ready", Ip: "10.0.0.2", Vms: []*admin.VM{
			{ContainerId: strings.Repeat("b", 64), Name: "app", State: "running", Image: "r/web:1", StartedUnixNano: now.Add(-90 * time.Second).UnixNano(),
				MemoryMib: 128, Vcpus: 2, Accel: "kvm", Template: "warm", JailUid: 1 << 30},
			{ContainerId: strings.Repeat("c", 64), Name: "init", State: "exited", Reason: "Completed", Image: "r/init:1", JailUid: -1, MemoryMib: 64, Vcpus: 1},
		}},
		{Id: strings.Repeat("d", 64), Namespace: "ns", Name: "empty", State: "notready", CreatedUnixNano: now.Add(-3 * time.Hour).UnixNano()},
	}
	var out bytes.Buffer
	require.NoError(t, psTable(&out, pods, now))
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	require.Len(t, lines, 4)
	require.Regexp(t, `^default/web\s+app\s+running\s+10\.0\.0\.2\s+r/web:1\s+1m\s+128Mi\s+2\s+kvm\s+warm\s+1073741824\s+bbbbbbbbbbbbb$`, lines[1])
	require.Regexp(t, `^default/web\s+init\s+exited \(Completed, 0\)\s+10\.0\.0\.2\s+r/init:1\s+-\s+64Mi\s+1\s+-\s+-\s+-\s+ccccccccccccc$`, lines[2])
	require.Regexp(t, `^ns/empty\s+-\s+pod notready\s+-\s+-\s+3h\s+`, lines[3])
}

func TestRenderKeepsNumbersAndNames(t *testing.T) {
	var out bytes.Buffer
	require.NoError(t, render(&out, "yaml", json.RawMessage(`{"pid": 1796589910992091000, "ratio": 0.5, "name": "x<y"}`)))
	require.Equal(t, "name: x<y\npid: 1796589910992091000\nratio: 0.5\n", out.String())
	out.Reset()
	require.NoError(t, render(&out, "json", &admin.VM{ContainerId: "abc", JailUid: -1}))
	require.Contains(t, out.String(), `"containerId": "abc"`)
	require.Contains(t, out.String(), `"jailUid": "-1"`, "protojson: int64 as a string")
	require.Error(t, render(&out, "xml", &admin.VM{}))
}

// FuzzCRILogPrinter: any stream prints without panicking, and a well-formed
// full line prints exactly its text.
func FuzzCRILogPrinter(f *testing.F) {
	f.Add([]byte("2026-12-06T20:00:00Z stdout F hello\n"), "text")
	f.Add([]byte("2026-12-06T20:00:00Z stderr P a\n2026-12-06T20:00:00Z stderr F b"), "x y z")
	f.Add([]byte("garbage  \n\n"), "")
	f.Fuzz(func(t *testing.T, stream []byte, text string) {
		var out bytes.Buffer
		p := criLogPrinter{w: &out}
		_ = p.write(stream)
		_ = p.flush()
		if strings.ContainsRune(text, '\n') {
			return
		}
		out.Reset()
		p = criLogPrinter{w: &out}
		require.NoError(t, p.write([]byte("2026-12-06T20:00:00.123456789Z stdout F "+text+"\n")))
		require.Equal(t, text+"\n", out.String())
	})
}
