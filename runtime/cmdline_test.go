package runtime

import (
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

var update = flag.Bool("update", false, "rewrite golden files")

func golden(t *testing.T, name, got string) {
	t.Helper()
	p := filepath.Join("testdata", name+".golden")
	if *update {
		require.NoError(t, os.MkdirAll("testdata", 0o755))
		require.NoError(t, os.WriteFile(p, []byte(got), 0o644))
	}
	want, err := os.ReadFile(p)
	require.NoError(t, err, "missing golden file; run go test ./runtime -update")
	require.Equal(t, string(want), got)
}

func TestBuildCmdlineGolden(t *testing.T) {
	cases := []struct {
		name string
		cfg  GuestConfig
	}{
		{"args-only", GuestConfig{Args: []string{"hello", "world"}}},
		{"nothing", GuestConfig{}},
		{"dashdash-arg", GuestConfig{Args: []string{"--", "x"}}},
		{"env-and-args", GuestConfig{Env: []string{"A=1", "GREETING=hello world"}, Args: []string{"-c", "x"}}},
		{"params-no-args", GuestConfig{Params: []string{"netdev.ip=198.18.0.2/24:198.18.0.1"}}},
		{"quoting", GuestConfig{Env: []string{`Q=say "hi"`, `B=back\slash`, "E="}, Args: []string{"", "it's", "a b", `"`, "--", "tab\u00e9"}}},
		{"no-libparam", GuestConfig{Features: NewFeatures([]string{"CONFIG_LIBVFSCORE=y"}), Params: []string{"netdev.ip=x"}, Env: []string{"A=1"}, Args: []string{"x"}}},
		{"no-environ", GuestConfig{Features: NewFeatures([]string{"CONFIG_LIBUKLIBPARAM=y"}), Env: []string{"A=1"}, Args: []string{"x"}}},
		{"net-fstab-env-args", GuestConfig{Params: []string{"netdev.ip=198.18.0.5/24:198.18.0.1:198.18.0.53::web-0:svc.cluster.local"},
			Fstab: []string{"initrd0:/:extract::ramfs=1:", "fs1:/data:9pfs:::mkmp", "fs2:/etc/config:9pfs:1::mkmp"},
			Env:   []string{"A=1"}, Args: []string{"/bin/httpd", "-f"}}},
		{"service-links-dropped", GuestConfig{Limits: GuestLimits{MaxEnv: 3}, Env: []string{
			"KUBERNETES_SERVICE_HOST=10.0.0.1", "KUBERNETES_SERVICE_PORT=443", "APP=1", "KUBERNETES_PORT=tcp://10.0.0.1:443",
			"KUBERNETES_PORT_443_TCP_ADDR=10.0.0.1", "MODE=fast"}}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			line, warns, err := BuildCmdline(c.cfg)
			require.NoError(t, err)
			golden(t, "cmdline-"+c.name, line+"\n"+strings.Join(warns, "\n"))
		})
	}
}

func TestBuildCmdlineLimits(t *testing.T) {
	long := strings.Repeat("x", 5000)
	_, _, err := BuildCmdline(GuestConfig{Args: []string{long}})
	require.ErrorContains(t, err, "at most 4095")
	var ce *CmdlineError
	require.ErrorAs(t, err, &ce)

	// The kernel name QEMU prepends counts too.
	_, _, err = BuildCmdline(GuestConfig{KernelName: strings.Repeat("k", 100), Args: []string{strings.Repeat("x", 4000)}})
	require.ErrorContains(t, err, "characters")

	many := make([]string, 60)
	for i := range many {
		many[i] = "a"
	}
	_, _, err = BuildCmdline(GuestConfig{Args: many})
	require.ErrorContains(t, err, "61 tokens")
	_, _, err = BuildCmdline(GuestConfig{Args: many[:59]})
	require.NoError(t, err)

	env := []string{"A=1", "B=1", "C=1", "D=1", "E=1", "F=1", "G=1", "H=1", "I=1"}
	_, _, err = BuildCmdline(GuestConfig{Env: env})
	require.ErrorContains(t, err, "9 environment variables exceed the guest limit of 8")

	_, _, err = BuildCmdline(GuestConfig{Args: []string{"a\nb"}})
	require.ErrorContains(t, err, "control character")
	_, _, err = BuildCmdline(GuestConfig{Env: []string{"=x"}})
	require.ErrorContains(t, err, "NAME=value")
}

// splitGuest is the reference splitter our test kernel (and Unikraft) implement.
func splitGuest(s string) []string {
	var out []string
	var cur strings.Builder
	in := false
	var quote rune
	rs := []rune(s)
	for i := 0; i < len(rs); i++ {
		c := rs[i]
		switch {
		case quote != 0:
			if c == quote {
				quote = 0
			} else if c == '\\' && quote == '"' && i+1 < len(rs) {
				i++
				cur.WriteRune(rs[i])
			} else {
				cur.WriteRune(c)
			}
		case c == ' ' || c == '\t':
			if in {
				out = append(out, cur.String())
				cur.Reset()
				in = false
			}
			continue
		case c == '"' || c == '\'':
			quote = c
		case c == '\\' && i+1 < len(rs):
			i++
			cur.WriteRune(rs[i])
		default:
			cur.WriteRune(c)
		}
		in = true
	}
	if in {
		out = append(out, cur.String())
	}
	return out
}

func FuzzQuoteRoundTrip(f *testing.F) {
	for _, s := range []string{"", "a b", `"`, `\`, "it's", "x=[", "]"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if checkValue("x", s) != nil {
			return
		}
		got := splitGuest("a " + QuoteToken(s) + " b")
		require.Equal(t, []string{"a", s, "b"}, got)
	})
}

func TestQuoteRoundTrip(t *testing.T) {
	for _, s := range []string{"", "plain", "a b", `say "hi"`, `back\slash`, "it's", "--", "é ü"} {
		require.Equal(t, []string{s}, splitGuest(QuoteToken(s)), "token %q", s)
	}
}
