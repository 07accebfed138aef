package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func runCmd(t *testing.T, args ...string) (string, error) {
	t.Helper()
	c := command(args)
	var out bytes.Buffer
	c.SetOut(&out)
	err := c.Execute()
	return out.String(), err
}

// `config default` is accepted by --config as it is; `config dump` shows
// the file's values with the flags given over them; an unknown key stops
// everything but `config default`.
func TestConfigCommands(t *testing.T) {
	def, err := runCmd(t, "config", "default")
	require.NoError(t, err)
	dir := t.TempDir()
	path := filepath.Join(dir, "config.toml")
	require.NoError(t, os.WriteFile(path, []byte(def), 0o644))
	dump, err := runCmd(t, "config", "dump", "--config", path)
	require.NoError(t, err)
	require.Equal(t, def, dump)

	edited := strings.Replace(def, "template_warm = 1", "template_warm = 3", 1)
	require.NotEqual(t, def, edited)
	require.NoError(t, os.WriteFile(path, []byte(edited), 0o644))
	dump, err = runCmd(t, "--config="+path, "config", "dump", "--log-format", "json", "--insecure-registry", "r:5000")
	require.NoError(t, err)
	require.Contains(t, dump, "template_warm = 3")
	require.Contains(t, dump, "format = 'json'")
	require.Contains(t, dump, "insecure_registries = ['r:5000']")

	require.NoError(t, os.WriteFile(path, []byte("version = 1\n[vm]\nwarm = 2\n"), 0o644))
	_, err = runCmd(t, "config", "dump", "--config", path)
	require.ErrorContains(t, err, `unknown key "vm.warm" (line 3)`)
	_, err = runCmd(t, "--config", path)
	require.ErrorContains(t, err, `unknown key "vm.warm"`, "the daemon refuses to start")
	_, err = runCmd(t, "--config", path, "config", "default")
	require.NoError(t, err)

	_, err = runCmd(t, "config", "dump", "--config", filepath.Join(dir, "missing.toml"))
	require.ErrorContains(t, err, "no such file", "a named file must exist")
	_, err = runCmd(t, "config", "dump", "--config", path+"x", "--log-format", "xml")
	require.Error(t, err)
	_, err = runCmd(t, "config", "dump", "--log-format", "xml", "--config", filepath.Join(dir, "default-absent.toml"))
	require.Error(t, err)
}

func TestConfigPathFound(t *testing.T) {
	p, explicit := configPath([]string{"--listen", "unix:///x", "--config", "/a.toml", "config", "dump"})
	require.Equal(t, "/a.toml", p)
	require.True(t, explicit)
	p, explicit = configPath([]string{"--unknown=1", "-h"})
	require.Equal(t, "/etc/unilet/config.toml", p)
	require.False(t, explicit)
}
