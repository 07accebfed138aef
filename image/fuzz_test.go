package image

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"errors"
	"io"
	"os"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/sirupsen/logrus"
	"github.com/stretchr/testify/require"
)

func mustHash(s string) v1.Hash {
	h, err := v1.NewHash(s)
	if err != nil {
		panic(err)
	}
	return h
}

func reg(name string, size int) *tar.Header {
	return &tar.Header{Name: name, Mode: 0o644, Size: int64(size), Typeflag: tar.TypeReg}
}

// FuzzUnpackLayer feeds arbitrary layer bytes (tar, gzip or garbage) to the
// unpacker under small limits: it never panics, stages at most a kernel and
// an initrd within their limits, and a failure is an error, never a partial
// image.
func FuzzUnpackLayer(f *testing.F) {
	f.Add(tarOf(f, reg("unikraft/bin/kernel", 6)), false)
	f.Add(tarOf(f, reg("/unikraft/bin/initrd", 3000)), false)
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	_, _ = zw.Write(tarOf(f, reg("unikraft/bin/kernel", 1<<14)))
	_ = zw.Close()
	f.Add(gz.Bytes(), true)
	f.Add([]byte("not a tar"), false)
	lim := Limits{Kernel: 4096, Initrd: 2048, Unpacked: 1 << 16}
	f.Fuzz(func(t *testing.T, layer []byte, gzipped bool) {
		staging := t.TempDir()
		p := &puller{s: &Store{limits: lim}, ref: "fuzz", staging: staging, log: logrus.NewEntry(logrus.StandardLogger())}
		d := v1.Descriptor{MediaType: types.OCIUncompressedLayer, Size: int64(len(layer)),
			Digest: mustHash(sha(layer))}
		if gzipped {
			d.MediaType = types.OCILayer
		}
		var out Image
		err := p.unpack(0, d, bytes.NewReader(layer), &out)
		ents, rerr := os.ReadDir(staging)
		require.NoError(t, rerr)
		require.LessOrEqual(t, len(ents), 2*len(layer)/512+1) // at most one staged file per tar entry
		if err != nil {
			var le *LimitError
			var ve *VerifyError
			if errors.As(err, &le) || errors.As(err, &ve) {
				return
			}
			require.NotEmpty(t, err.Error())
			return
		}
		for _, f := range []struct {
			path  string
			limit int64
		}{{out.Kernel, lim.Kernel}, {out.Initrd, lim.Initrd}} {
			if f.path == "" {
				continue
			}
			st, err := os.Stat(f.path)
			require.NoError(t, err)
			require.LessOrEqual(t, st.Size(), f.limit)
		}
		require.LessOrEqual(t, p.unpacked, lim.Unpacked)
	})
}

// A wrong digest is caught however the layer is read.
func TestUnpackLayerVerifies(t *testing.T) {
	layer := tarOf(t, reg("unikraft/bin/kernel", 6))
	p := &puller{s: &Store{limits: DefaultLimits}, ref: "x", staging: t.TempDir(), log: logrus.NewEntry(logrus.StandardLogger())}
	d := v1.Descriptor{MediaType: types.OCIUncompressedLayer, Size: int64(len(layer)), Digest: mustHash(sha([]byte("other")))}
	var ve *VerifyError
	require.ErrorAs(t, p.unpack(0, d, bytes.NewReader(layer), &Image{}), &ve)
}

// FuzzManifestConfig parses arbitrary index, manifest and config bytes the
// way a pull does: no panic; a selected manifest is always a unikernel
// platform's; an accepted config is a unikernel's.
func FuzzManifestConfig(f *testing.F) {
	for _, kind := range []string{"kconfig", "kernel-initrd", "kernel-only"} {
		read := func(n string) []byte {
			b, err := os.ReadFile("testdata/kraftkit-0.9.2/" + kind + "." + n + ".json")
			require.NoError(f, err)
			return b
		}
		f.Add(read("index"), read("manifest"), read("config"))
	}
	f.Add([]byte(`{"manifests":[{"platform":{"os":"qemu","architecture":"x86_64"}}]}`), []byte(`{"config":{}}`), []byte(`{"os":"linux"}`))
	f.Fuzz(func(t *testing.T, idx, man, cfg []byte) {
		if im, err := v1.ParseIndexManifest(bytes.NewReader(idx)); err == nil {
			if d, err := SelectManifest(im); err == nil && d.Platform != nil {
				require.True(t, IsVMPlatform(d.Platform.OS, d.Platform.Architecture), "%+v", d.Platform)
			}
		}
		m, err := v1.ParseManifest(bytes.NewReader(man))
		if err != nil {
			return
		}
		cf, err := v1.ParseConfigFile(io.NopCloser(bytes.NewReader(cfg)))
		if err != nil {
			return
		}
		img, err := imageFromConfig(m, cf)
		if err != nil {
			require.ErrorIs(t, err, ErrNotUnikernel)
			return
		}
		require.True(t, cf.OS == "" || IsVMPlatform(cf.OS, cf.Architecture))
		_, err = json.Marshal(img)
		require.NoError(t, err)
	})
}
