package config

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spf13/pflag"
	"github.com/stretchr/testify/require"
)

// The commented default decodes to the defaults and validates.
func TestDefaultRoundTrips(t *testing.T) {
	def := Default()
	require.NoError(t, def.Validate())
	b, err := def.Encode()
	require.NoError(t, err)
	require.Contains(t, string(b), "# Log format: text or json (--log-format).")
	require.Contains(t, string(b), "[metrics]")
	var c Config
	require.NoError(t, c.Decode(b))
	require.Equal(t, def, c)
}

func TestUnknownKeyNamesIt(t *testing.T) {
	c := Default()
	err := c.Decode([]byte("version = 1\n[vm]\nqemu = 'q'\nshim_poool = 3\n"))
	require.ErrorContains(t, err, `"vm.shim_poool" (line 4)`)
	require.Equal(t, Default(), c, "a refused file changes nothing")
	err = c.Decode([]byte("[vm]\nshim_pool = 'two'\n"))
	require.ErrorContains(t, err, "line 2")
	require.Equal(t, Default(), c)
}

func TestFileThenFlags(t *testing.T) {
	path := filepath.Join(t.TempDir(), "config.toml")
	require.NoError(t, os.WriteFile(path, []byte(`
version = 1
root = "/srv/unilet"
[images]
insecure_registries = ["a:5000", "b:5000"]
pull_stall_timeout = "2m"
[images.mirrors]
"docker.io" = "mirror:5000"
[network]
cni_bin_dirs = ["/usr/lib/cni"]
[vm]
shim_pool = 5
template_warm = 0
[debug]
format = "json"
`), 0o644))
	c := Default()
	require.NoError(t, c.Load(path, true))
	fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
	Bind(fs, &c)
	require.NoError(t, fs.Parse([]string{"--shim-pool", "1", "--insecure-registry", "c:5000", "--registry-mirror=ghcr.io=m2"}))
	require.NoError(t, c.Validate())
	require.Equal(t, "/srv/unilet", c.Root, "file over default")
	require.Equal(t, 1, c.VM.ShimPool, "flag over file")
	require.Equal(t, 0, c.VM.TemplateWarm)
	require.Equal(t, []string{"c:5000"}, c.Images.InsecureRegistries, "a list flag replaces the file's list")
	require.Equal(t, map[string]string{"ghcr.io": "m2"}, c.Images.Mirrors)
	require.Equal(t, Duration(2*time.Minute), c.Images.PullStallTimeout)
	require.Equal(t, "json", c.Debug.Format)
	require.Equal(t, []string{"/usr/lib/cni"}, c.Network.CNIBinDirs, "a file's list replaces the default")
	require.Equal(t, "/srv/unilet/cni", c.CNICacheDir())
	require.Equal(t, Default().VM.QEMU, c.VM.QEMU, "unnamed keys keep their defaults")

	missing := filepath.Join(t.TempDir(), "none.toml")
	require.NoError(t, c.Load(missing, false), "the default path may be absent")
	require.ErrorContains(t, c.Load(missing, true), "no such file")
}

func TestValidateNamesFlagAndKey(t *testing.T) {
	for _, tc := range []struct {
		mut  func(*Config)
		want string
	}{
		{func(c *Config) { c.Version = 2 }, "version 2"},
		{func(c *Config) { c.GRPC.Address = "/run/x.sock" }, "--listen (grpc.address)"},
		{func(c *Config) { c.VM.Accel = "hvf" }, "--accel (vm.accel)"},
		{func(c *Config) { c.Jail.IDs = "0:10" }, "--jail-ids (jail.ids)"},
		{func(c *Config) { c.Jail.IDs = "x" }, "want FIRST:COUNT"},
		{func(c *Config) { c.Pods.LogRoots = []string{"relative"} }, "--pod-log-root"},
		{func(c *Config) { c.Network.GuestNetwork = "10.0.0.0/31" }, "--guest-network"},
		{func(c *Config) { c.Debug.Format = "xml" }, "--log-format (debug.format)"},
		{func(c *Config) { c.Debug.Level = "loud" }, "--log-level"},
		{func(c *Config) { c.Debug.PprofAddress = "0.0.0.0:6060" }, "loopback"},
		{func(c *Config) { c.Metrics.Address = "9460" }, "--metrics-address"},
		{func(c *Config) { c.Images.MaxKernelMiB = 0 }, "must be positive"},
		{func(c *Config) { c.VM.TemplateWarm = -1 }, "0 or more"},
		{func(c *Config) { c.Stream.Address = "0.0.0.0:10010" }, "--stream-tls-cert"},
		{func(c *Config) { c.Stream.TLSCert = "c.pem" }, "go together"},
	} {
		c := Default()
		tc.mut(&c)
		require.ErrorContains(t, c.Validate(), tc.want)
	}
	c := Default()
	c.Jail.Enabled, c.Jail.IDs = false, "x"
	require.NoError(t, c.Validate(), "ids are not read with the jail off")
	c.Metrics.Address = "0.0.0.0:9460"
	require.NoError(t, c.Validate(), "a non-loopback metrics address is the operator's choice")
}

func TestStreamAddressNeedsTLSOffLoopback(t *testing.T) {
	for _, ok := range []string{"127.0.0.1:0", "127.0.0.5:1234", "[::1]:0", "localhost:0"} {
		require.NoError(t, checkStreamAddress(Stream{Address: ok}), ok)
	}
	for _, bad := range []string{":0", "0.0.0.0:10010", "198.18.0.1:0", "[::]:0", "node.example:0"} {
		require.ErrorContains(t, checkStreamAddress(Stream{Address: bad}), "--stream-tls-cert", bad)
		require.NoError(t, checkStreamAddress(Stream{Address: bad, TLSCert: "c.pem", TLSKey: "k.pem"}), bad)
	}
	require.Error(t, checkStreamAddress(Stream{Address: "nonsense"}))
}

// FuzzDecode: any document either decodes and re-encodes to itself, or is
// refused leaving the configuration as it was.
func FuzzDecode(f *testing.F) {
	b, _ := Default().Encode()
	f.Add(b)
	f.Add([]byte("version = 1\n[vm]\nshim_pool = 3\n"))
	f.Add([]byte("[images.mirrors]\n'a' = 'b'\n"))
	f.Add([]byte("[[vm]]\n"))
	f.Fuzz(func(t *testing.T, doc []byte) {
		c := Default()
		if err := c.Decode(doc); err != nil {
			require.Equal(t, Default(), c)
			return
		}
		out, err := c.Encode()
		require.NoError(t, err)
		var again Config
		require.NoError(t, again.Decode(out), "%s", out)
		require.Equal(t, c, again)
	})
}
