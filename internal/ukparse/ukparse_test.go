package ukparse

import (
	"bytes"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestSplit(t *testing.T) {
	for _, c := range []struct {
		in   string
		want []string
	}{
		{"k a  b\tc\n", []string{"k", "a", "b", "c"}},
		{`k "a b" 'c d'`, []string{"k", "a b", "c d"}},
		{`k "" '' x`, []string{"k", "x"}}, // an empty argument cannot be passed
		{`k " lead" "trail "`, []string{"k", " lead", "trail "}},
		{`k a\ b \"q\" \'s\' \\`, []string{"k", "a b", `"q"`, `'s'`, `\`}},
		{`k "x\"y" "b\\s" "a\b" "it's"`, []string{"k", `x"y`, `b\s`, `a\b`, "it's"}},
		{`k 'no\escape' 'dq"' "sq'"`, []string{"k", `no\escape`, `dq"`, `sq'`}},
		{`k a"b c"d`, []string{"k", "ab cd"}},
		{`k end\`, []string{"k", `end\`}},
		{`k "unclosed x`, []string{"k", "unclosed x"}},
	} {
		require.Equal(t, c.want, Split(c.in, 60), "%q", c.in)
	}
	// At the token limit the last token runs to the end of the line, unprocessed.
	require.Equal(t, []string{"k", "a", `b "c" d`}, Split(`k a b "c" d`, 3))
}

func TestParse(t *testing.T) {
	// The reported injection: an env value ending in "]" closes the list,
	// and what follows becomes library parameters.
	b := Parse(`k env.vars=[ "LIST=[1,2]" netdev.ip=6.6.6.6/24 ukdebug.loglevel=9 "AFTER=lost" ] -- app`, 60)
	require.Equal(t, []string{"LIST=[1,2"}, b.Env())
	require.Contains(t, b.Params, Param{Name: "netdev.ip", Value: "6.6.6.6/24"})
	require.Contains(t, b.Params, Param{Name: "ukdebug.loglevel", Value: "9"})
	require.Equal(t, []string{"k", "app"}, b.Args)

	// A list element "--" is a value; the stop sequence is only seen
	// between parameters. A single-token list works too.
	b = Parse(`k a.b=[ x -- y ] c.d=[1] -- z`, 60)
	require.Equal(t, []Param{{"a.b", "x", false}, {"a.b", "--", false}, {"a.b", "y", false}, {"c.d", "1", false}}, b.Params)
	require.Equal(t, []string{"k", "z"}, b.Args)

	// "--" first: nothing is parsed, nothing dropped (ukboot needs rc > 0).
	b = Parse(`k -- -- x`, 60)
	require.Empty(t, b.Params)
	require.Equal(t, []string{"k", "--", "--", "x"}, b.Args)

	// No stop sequence: everything is an argument, even "lib.x=y".
	b = Parse(`k netdev.ip=1.2.3.4/24 x`, 60)
	require.Empty(t, b.Params)
	require.Equal(t, []string{"k", "netdev.ip=1.2.3.4/24", "x"}, b.Args)

	// An unclosed list swallows the stop sequence: no parameters at all.
	b = Parse(`k a.b=[ x -- y`, 60)
	require.Empty(t, b.Params)
	require.Len(t, b.Args, 5)

	// "help" halts the guest; bare words without a library name are skipped.
	require.True(t, Parse(`k help -- x`, 60).Usage)
	b = Parse(`k unilet flag.on -- x`, 60)
	require.Equal(t, []Param{{Name: "flag.on", NoValue: true}}, b.Params)
	require.Equal(t, []string{"k", "x"}, b.Args)
}

// buildHarness compiles the test kernel's parser (ukcmdline.c) for the host.
func buildHarness(t *testing.T) string {
	t.Helper()
	_, self, _, _ := runtime.Caller(0)
	src := filepath.Join(filepath.Dir(self), "..", "..", "e2e", "guest", "testkernel", "hostparse.c")
	cc, err := exec.LookPath("gcc")
	require.NoError(t, err, "gcc builds the test kernel and this harness (make deps installs it)")
	bin := filepath.Join(t.TempDir(), "hostparse")
	out, err := exec.Command(cc, "-O1", "-Wall", "-Wextra", "-Werror", "-o", bin, src).CombinedOutput()
	require.NoError(t, err, "%s", out)
	return bin
}

// randomCmdline draws command lines rich in what the grammar treats
// specially.
func randomCmdline(r *rand.Rand) string {
	pieces := []string{" ", "  ", "\t", "\n", `"`, `'`, `\`, `\\`, `\"`, "[", "]", "=", ".", "--", "-- ", " -- ", "help",
		"env.vars=[", "env.vars=", "a.b=", "a.b=[", "x", "yz", "K=V", "1", ",", ":", "é", "\v", "\r", "netdev.ip=", "]]"}
	var s strings.Builder
	s.WriteString("kernel ")
	n := r.Intn(24)
	for i := 0; i < n; i++ {
		s.WriteString(pieces[r.Intn(len(pieces))])
	}
	return s.String()
}

// TestMatchesTestKernel runs thousands of command lines through the test
// kernel's C parser and this model: both must print the same.
func TestMatchesTestKernel(t *testing.T) {
	bin := buildHarness(t)
	r := rand.New(rand.NewSource(1))
	lines := []string{
		`k env.vars=[ "LIST=[1,2]" netdev.ip=6.6.6.6/24 "AFTER=lost" ] -- app`,
		`k a.b=[ x -- y ] c.d=[1] -- z`, `k -- -- x`, `k help -- x`, `k a\ b "x\"y" 'q\' "\\"`, `k "" '' -- ""`,
	}
	for i := 0; i < 20000; i++ {
		lines = append(lines, randomCmdline(r))
	}
	var in bytes.Buffer
	for _, l := range lines {
		in.WriteString(l)
		in.WriteByte(0)
	}
	cmd := exec.Command(bin)
	cmd.Stdin = &in
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	require.NoError(t, err)
	reports := strings.Split(string(out), "\x00")
	require.Len(t, reports, len(lines)+1)
	for i, l := range lines {
		require.Equal(t, Parse(l, 128).Format(), reports[i], "command line %q", l)
	}
}

func FuzzSplitParse(f *testing.F) {
	f.Add(`k env.vars=[ "LIST=[1,2]" x.y=1 ] -- a`)
	f.Add(`k a\ b "x\"y" 'q\' "\\" -- --`)
	f.Fuzz(func(t *testing.T, s string) {
		toks := Split(s, 60)
		require.LessOrEqual(t, len(toks), 60)
		b := Parse(s, 60)
		if !b.Usage && len(toks) > 0 {
			require.Equal(t, toks[0], b.Args[0])
		}
	})
}
