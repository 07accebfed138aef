package crilog

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

var fixed = time.Date(2026, 11, 23, 10, 0, 0, 123456789, time.UTC)

func open(t *testing.T, opts ...Option) (*Writer, string) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "sub", "0.log")
	w, err := Open(p, append([]Option{WithClock(func() time.Time { return fixed })}, opts...)...)
	require.NoError(t, err)
	return w, p
}

func read(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	require.NoError(t, err)
	return string(b)
}

const ts = "2026-11-23T10:00:00.123456789Z"

func TestWriterLines(t *testing.T) {
	w, p := open(t)
	_, err := w.Write([]byte("hello\r\nwor"))
	require.NoError(t, err)
	require.Equal(t, ts+" stdout F hello\n", read(t, p), "partial line must wait for its newline")
	_, err = w.Write([]byte("ld\n\nlast"))
	require.NoError(t, err)
	require.NoError(t, w.Close())
	require.Equal(t, ts+" stdout F hello\n"+ts+" stdout F world\n"+ts+" stdout F \n"+ts+" stdout F last\n", read(t, p))
}

func TestWriterSplitsLongLines(t *testing.T) {
	w, p := open(t, WithMaxLine(4))
	_, err := w.Write([]byte("abcdefghij\nxy"))
	require.NoError(t, err)
	_, err = w.Write([]byte("zw12"))
	require.NoError(t, err)
	require.NoError(t, w.Flush())
	require.Equal(t, ts+" stdout P abcd\n"+ts+" stdout P efgh\n"+ts+" stdout F ij\n"+ts+" stdout P xyzw\n", read(t, p))
	require.NoError(t, w.FlushPartial())
	require.NoError(t, w.Close())
	require.Equal(t, ts+" stdout P abcd\n"+ts+" stdout P efgh\n"+ts+" stdout F ij\n"+ts+" stdout P xyzw\n"+ts+" stdout P 12\n", read(t, p))
}

func TestWriterReopen(t *testing.T) {
	w, p := open(t)
	_, err := w.Write([]byte("one\n"))
	require.NoError(t, err)
	require.NoError(t, os.Rename(p, p+".1"))
	require.NoError(t, w.Reopen())
	_, err = w.Write([]byte("two\n"))
	require.NoError(t, err)
	require.NoError(t, w.Close())
	require.Equal(t, ts+" stdout F one\n", read(t, p+".1"))
	require.Equal(t, ts+" stdout F two\n", read(t, p))
	_, err = w.Write([]byte("three\n"))
	require.Error(t, err, "writing after Close must fail, not vanish")
}

// Output after a quiet moment reaches the file at once; a flood is batched
// and still reaches it within the flush delay, in order.
func TestWriterBatchesFloods(t *testing.T) {
	// A delay long enough that the flood below surely falls within it, also
	// under the race detector (the default, 5 ms, is what production uses).
	const delay = 300 * time.Millisecond
	w, p := open(t, withFlushDelay(delay))
	time.Sleep(2 * delay)
	_, err := w.Write([]byte("first\n"))
	require.NoError(t, err)
	require.Equal(t, ts+" stdout F first\n", read(t, p), "write-through when idle")
	want := ts + " stdout F first\n"
	for i := 0; i < 1000; i++ {
		line := fmt.Sprintf("line %d", i)
		_, err := w.Write([]byte(line + "\n"))
		require.NoError(t, err)
		want += ts + " stdout F " + line + "\n"
	}
	require.Less(t, len(read(t, p)), len(want), "a flood is batched")
	require.Eventually(t, func() bool { return read(t, p) == want }, time.Second, time.Millisecond, "batched lines arrive within the flush delay")
	_, err = w.Write([]byte("last\n"))
	require.NoError(t, err)
	require.NoError(t, w.Close())
	require.Equal(t, want+ts+" stdout F last\n", read(t, p), "Close flushes")
}

// A full disk (/dev/full) drops lines but never leaves a truncated CRI
// line, and once writing works again the log says how many were lost.
func TestFullDiskDropsWholeLinesAndSaysSo(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "0.log")
	require.NoError(t, os.Symlink("/dev/full", path))
	w, err := Open(path, WithClock(func() time.Time { return time.Unix(0, 0) }))
	require.NoError(t, err)
	_, err = w.Write([]byte("lost one\nlost two\n"))
	require.ErrorContains(t, err, "2 console line(s) dropped")
	_, _ = w.Write([]byte("lost three\n")) // batched: its error comes with the flush
	require.ErrorContains(t, w.Flush(), "3 console line(s) dropped")
	// Space is back (here: the path is a file again; Reopen as kubelet's rotation does).
	require.NoError(t, os.Remove(path))
	require.NoError(t, w.Reopen())
	_, err = w.Write([]byte("kept\n"))
	require.NoError(t, err)
	require.NoError(t, w.Close())
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	lines := strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
	require.Len(t, lines, 2, string(b))
	require.Contains(t, lines[0], " stderr F [unilet: 3 console line(s) were not written to this log:")
	require.Contains(t, lines[0], "no space left on device")
	require.Equal(t, "1970-01-01T00:00:00Z stdout F kept", lines[1])
}
