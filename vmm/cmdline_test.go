package vmm

import (
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/unilet-dev/unilet/internal/ukparse"
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
		{"quoting", GuestConfig{Env: []string{`Q=say "hi"`, `B=back\slash`, "E=", " LEAD= x "}, Args: []string{"it's", " a b", `"`, "--", "tab\u00e9", `\`}}},
		{"env-ending-in-bracket", GuestConfig{Env: []string{"A=1", "LIST=[1,2]", "B=]", "C=3"}, Args: []string{"x"}}},
		{"no-libparam-dashdash", GuestConfig{Features: NewFeatures([]string{"CONFIG_LIBVFSCORE=y"}), Args: []string{"--", "x"}}},
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

func FuzzQuoteRoundTrip(f *testing.F) {
	for _, s := range []string{"a b", `"`, `\`, "it's", "x=[", "]", " lead", `\"`, "\v"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if checkValue("x", s) != nil || s == "" || strings.IndexByte(s, 0) >= 0 {
			return
		}
		got := ukparse.Split("a "+QuoteToken(s)+" b", 60)
		require.Equal(t, []string{"a", s, "b"}, got)
	})
}

func TestQuoteRoundTrip(t *testing.T) {
	for _, s := range []string{"plain", "a b", `say "hi"`, `back\slash`, "it's", "--", "é ü", " lead", `\`, `\\"`} {
		require.Equal(t, []string{s}, ukparse.Split(QuoteToken(s), 60), "token %q", s)
	}
}

// The cases the issue reported: an env value ending in "]" closed the
// env.vars list and smuggled library parameters past --allow-lib-param.
func TestCmdlineInjectionCases(t *testing.T) {
	env := []string{"LIST=[1,2]", "netdev.ip=6.6.6.6/24:6.6.6.1::::", "ukdebug.loglevel=9", "AFTER=lost", "Q=]", "S= ]"}
	line, _, err := BuildCmdline(GuestConfig{KernelName: "/k", Env: env, Args: []string{"--", "help", "x.y=[", "--"}})
	require.NoError(t, err)
	b := ukparse.Parse("/k "+line, DefaultMaxTokens)
	require.Equal(t, env, b.Env())
	require.Len(t, b.Params, len(env), "only env.vars elements: %v", b.Params)
	require.Equal(t, []string{"/k", "--", "help", "x.y=[", "--"}, b.Args)

	for _, bad := range []GuestConfig{
		{Args: []string{""}},
		{Env: []string{"[X=1]"}},
		{Params: []string{"a.b=[1"}},
		{Params: []string{"help"}},
		{Params: []string{"nodot=1"}},
		{Fstab: []string{"fs1:/x]"}},
	} {
		_, _, err := BuildCmdline(bad)
		var ce *CmdlineError
		require.ErrorAs(t, err, &ce, "%+v", bad)
	}
}

// FuzzBuildCmdline round-trips random environment variables, arguments and
// library parameters through the builder and the reference model of
// Unikraft's parser (internal/ukparse): the guest must receive exactly
// what was given — no parameter, list element or argument more or less —
// or the builder must refuse with a CmdlineError.
func FuzzBuildCmdline(f *testing.F) {
	const sep = "\x1f"
	f.Add("LIST=[1,2]\x1fnetdev.ip=6.6.6.6/24:6.6.6.1::::\x1fukdebug.loglevel=9\x1fAFTER=lost", "--\x1fapp", "")
	f.Add("A=1\x1fB=\"q\" \\", "help\x1f--\x1fa.b=[\x1f]", "uk.x=[1]\x1fa.b")
	f.Add("", "--", "")
	f.Add("[K=v\x1fK2=]", " lead\x1f\\", "x.y=[]")
	f.Fuzz(func(t *testing.T, envS, argsS, paramsS string) {
		split := func(s string) []string {
			if s == "" {
				return nil
			}
			return strings.Split(s, sep)
		}
		env, args, params := split(envS), split(argsS), split(paramsS)
		fstab := []string{"fs1:/data:9pfs:::mkmp"}
		cfg := GuestConfig{KernelName: "/k", Env: env, Args: args, Params: params, Fstab: fstab,
			Limits: GuestLimits{MaxCmdline: 1 << 20, MaxTokens: 1 << 12, MaxEnv: 1 << 12}}
		line, _, err := BuildCmdline(cfg)
		if err != nil {
			var ce *CmdlineError
			require.ErrorAs(t, err, &ce)
			return
		}
		b := ukparse.Parse("/k "+line, cfg.Limits.MaxTokens)
		require.False(t, b.Usage)
		require.Equal(t, append([]string{"/k"}, args...), b.Args, "line %q", line)
		require.Equal(t, env, b.Env(), "line %q", line)
		var want []ukparse.Param
		for _, p := range params {
			name, v, has := strings.Cut(p, "=")
			switch {
			case !has:
				want = append(want, ukparse.Param{Name: name, NoValue: true})
			case strings.HasPrefix(v, "["):
				if inner := v[1 : len(v)-1]; inner != "" {
					want = append(want, ukparse.Param{Name: name, Value: inner})
				}
			default:
				want = append(want, ukparse.Param{Name: name, Value: v})
			}
		}
		for _, e := range fstab {
			want = append(want, ukparse.Param{Name: "vfs.fstab", Value: e})
		}
		var got []ukparse.Param
		for _, p := range b.Params {
			if p.Name != "env.vars" || p.NoValue {
				got = append(got, p)
			}
		}
		require.Equal(t, want, got, "line %q", line)
	})
}
