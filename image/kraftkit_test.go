package image

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/stretchr/testify/require"

	"github.com/unilet-dev/unilet/vmm"
)

// fixture reads testdata/kraftkit-0.9.2/<name>.<part>.json.
func fixture(t *testing.T, name, part string) []byte {
	b, err := os.ReadFile(filepath.Join("testdata", "kraftkit-0.9.2", name+"."+part+".json"))
	require.NoError(t, err)
	return b
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

// unilet reads what real kraftkit 0.9.2 writes: the index entry it selects
// is the fixture manifest (by digest), the config is the one the manifest
// names, and the image's Cmd, Env, os.features (non-=y entries included),
// version and kernel/initrd layers come out as kraft packed them.
func TestReadsKraftkitImages(t *testing.T) {
	for _, c := range []struct {
		name      string
		cmd, env  []string
		features  int
		version   string
		hasInitrd bool
	}{
		{name: "kernel-only", cmd: []string{"console=ttyS0"}, env: []string{"FOO=bar"}, features: 3},
		{name: "kernel-initrd", cmd: []string{"/init", "hello world"}, env: []string{"FOO=bar", "A=1"}, features: 3, hasInitrd: true},
		{name: "kconfig", cmd: []string{"a"}, env: []string{"FOO=bar"}, features: -1, version: "0.17.0~eaf6fda1", hasInitrd: true},
	} {
		t.Run(c.name, func(t *testing.T) {
			rawIndex, rawManifest, rawConfig := fixture(t, c.name, "index"), fixture(t, c.name, "manifest"), fixture(t, c.name, "config")
			idx, err := v1.ParseIndexManifest(bytes.NewReader(rawIndex))
			require.NoError(t, err)
			d, err := SelectManifest(idx)
			require.NoError(t, err)
			require.NoError(t, verifyBytes("manifest", d.Digest.String(), d.Size, rawManifest), "the fixture manifest is the one the index names")
			m, err := v1.ParseManifest(bytes.NewReader(rawManifest))
			require.NoError(t, err)
			require.NoError(t, verifyBytes("config", m.Config.Digest.String(), m.Config.Size, rawConfig))
			cf, err := v1.ParseConfigFile(bytes.NewReader(rawConfig))
			require.NoError(t, err)
			img, err := imageFromConfig(m, cf)
			require.NoError(t, err)
			require.Equal(t, m.Config.Digest.String(), img.ID)
			require.Equal(t, c.cmd, img.Cmd)
			require.Equal(t, c.env, img.Env)
			if c.features >= 0 {
				require.Len(t, img.Features, c.features)
			}
			require.Equal(t, c.version, img.Annotations[AnnotationKernelVersion])
			kernel, _ := layerRole("unikraft/bin/kernel", m.Layers[0].Annotations)
			require.True(t, kernel, "layer 0 holds the kernel")
			if c.hasInitrd {
				_, initrd := layerRole("unikraft/bin/initrd", m.Layers[1].Annotations)
				require.True(t, initrd, "layer 1 holds the initrd")
			}
			f := vmm.NewFeatures(img.Features)
			if c.name == "kconfig" {
				require.Contains(t, img.Features, "CONFIG_HZ=100")
				require.Contains(t, img.Features, "CONFIG_CROSS_COMPILE=")
				require.True(t, f.Has("CONFIG_LIBUKBOOT"))
				require.False(t, f.Has("CONFIG_HZ"), "a non-=y entry is a value, not an enabled option")
			}
		})
	}
}

var (
	digestRE = regexp.MustCompile(`sha256:[0-9a-f]{64}`)
	sizeRE   = regexp.MustCompile(`"size":\d+`)
)

// shape blanks what differs between two packings of different files:
// digests and sizes.
func shape(t *testing.T, b []byte) any {
	b = digestRE.ReplaceAll(b, []byte("sha256:D"))
	b = sizeRE.ReplaceAll(b, []byte(`"size":0`))
	var v any
	require.NoError(t, json.Unmarshal(b, &v))
	return v
}

// uniletctl pack writes what kraft pkg writes: with the same inputs, its
// index, manifest and config equal kraft's but for digests and sizes (the
// files differ) — config descriptor platform, sh.kraftkit.version on index,
// entry and manifest, layer annotations with kraft's values, name
// annotations, os.version and non-=y os.features.
func TestPackWritesWhatKraftkitWrites(t *testing.T) {
	created, err := time.Parse(time.RFC3339, "2026-11-30T23:22:51Z")
	require.NoError(t, err)
	kraftFeatures := []string{"CONFIG_ARCH_X86_64=y", "CONFIG_KVM_VMM_QEMU=y", "CONFIG_PLAT_KVM=y"}
	var kc v1.ConfigFile
	require.NoError(t, json.Unmarshal(fixture(t, "kconfig", "config"), &kc))
	for _, c := range []struct {
		name string
		opts PackOptions
	}{
		{"kernel-only", PackOptions{KConfig: kraftFeatures, Args: []string{"console=ttyS0"}, Env: []string{"FOO=bar"}}},
		{"kernel-initrd", PackOptions{Initrd: writeFile(t, "070701cpio"), Args: []string{"/init", "hello world"}, Env: []string{"FOO=bar", "A=1"}, KConfig: kraftFeatures}},
		{"kconfig", PackOptions{Initrd: writeFile(t, "070701cpio"), KConfig: kc.OSFeatures, KernelVersion: "0.17.0~eaf6fda1", Created: created.Add(time.Second),
			Args: []string{"a"}, Env: []string{"FOO=bar"}, Labels: map[string]string{"org.example.k": "v"}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			o := c.opts
			o.Kernel, o.Version, o.Ref = writeFile(t, "\x7fELFkernel"), "0.9.2", "127.0.0.1:40171/sample/"+c.name+":1"
			if o.Created.IsZero() {
				o.Created = created
			}
			idx, err := Pack(o)
			require.NoError(t, err)
			rawIndex, err := idx.RawManifest()
			require.NoError(t, err)
			im, err := idx.IndexManifest()
			require.NoError(t, err)
			img, err := idx.Image(im.Manifests[0].Digest)
			require.NoError(t, err)
			rawManifest, err := img.RawManifest()
			require.NoError(t, err)
			require.Equal(t, im.Manifests[0].Digest.String(), sha(rawManifest))
			rawConfig, err := img.RawConfigFile()
			require.NoError(t, err)
			require.Equal(t, shape(t, fixture(t, c.name, "index")), shape(t, rawIndex), "index:\n%s", rawIndex)
			require.Equal(t, shape(t, fixture(t, c.name, "manifest")), shape(t, rawManifest), "manifest:\n%s", rawManifest)
			require.Equal(t, shape(t, fixture(t, c.name, "config")), shape(t, rawConfig), "config:\n%s", rawConfig)
		})
	}
}

// ParseKConfig records a .config as kraftkit does.
func TestParseKConfigAsKraftkit(t *testing.T) {
	got := ParseKConfig([]byte("# comment\nCONFIG_UK_NAME=\"helloworld\"\nCONFIG_HZ=100\n# CONFIG_X is not set\n" +
		"CONFIG_UK_APP=\"/app\"\nCONFIG_UK_BASE=/uk\nCONFIG_LIBUKBOOT=y\nCONFIG_CROSS_COMPILE=\"\"\n"))
	require.Equal(t, []string{"CONFIG_CROSS_COMPILE=", "CONFIG_HZ=100", "CONFIG_LIBUKBOOT=y", "CONFIG_UK_NAME=helloworld"}, got)
}
