package crilog

import (
	"bytes"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// FuzzWriter writes arbitrary console bytes in arbitrary chunks: every log
// line has the CRI form, no content exceeds the maximum line, and joining
// the lines (P parts with what follows, F ending a line) gives back the
// console stream, less the "\r" of each "\r\n".
func FuzzWriter(f *testing.F) {
	f.Add([]byte("hello\r\nworld\n\nlast"), []byte{3, 1, 7})
	f.Add([]byte(strings.Repeat("x", 40)+"\r\r\n\x00\xff"), []byte{0, 9})
	f.Fuzz(func(t *testing.T, data, chunks []byte) {
		w, p := open(t, WithMaxLine(7))
		rest := data
		for i := 0; len(rest) > 0; i++ {
			n := len(rest)
			if len(chunks) > 0 {
				n = min(n, int(chunks[i%len(chunks)])+1)
			}
			_, err := w.Write(rest[:n])
			require.NoError(t, err)
			rest = rest[n:]
			if i%5 == 4 {
				require.NoError(t, w.FlushPartial())
			}
		}
		require.NoError(t, w.Close())

		var got bytes.Buffer
		out := read(t, p)
		if out != "" {
			require.True(t, strings.HasSuffix(out, "\n"))
			for _, l := range strings.Split(strings.TrimSuffix(out, "\n"), "\n") {
				rest, ok := strings.CutPrefix(l, ts+" stdout ")
				require.True(t, ok, "line %q", l)
				tag, content, ok := strings.Cut(rest, " ")
				require.True(t, ok && (tag == TagPartial || tag == TagFull), "line %q", l)
				require.LessOrEqual(t, len(content), 7)
				got.WriteString(content)
				if tag == TagFull {
					got.WriteByte('\n')
				}
			}
		}
		var want bytes.Buffer
		segs := bytes.Split(data, []byte{'\n'})
		for _, s := range segs[:len(segs)-1] {
			want.Write(bytes.TrimSuffix(s, []byte{'\r'}))
			want.WriteByte('\n')
		}
		// An unterminated last line ends the log as F (Close) or as the P
		// parts a quiet console flushed (FlushPartial), as it was.
		last := segs[len(segs)-1]
		if tail, ok := strings.CutSuffix(got.String(), "\n"); ok && len(last) > 0 && !bytes.HasSuffix(data, []byte{'\n'}) {
			got.Reset()
			got.WriteString(tail)
			last = bytes.TrimSuffix(last, []byte{'\r'})
		}
		want.Write(last)
		require.Equal(t, want.String(), got.String())
	})
}
