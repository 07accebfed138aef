package image

import (
	"archive/tar"
	"bytes"
	"fmt"
	"os"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// PackOptions describes a unikernel image to build.
type PackOptions struct {
	Kernel        string   // path to the kernel binary (required)
	Initrd        string   // optional initrd (CPIO, maybe gzip)
	KConfig       []string // CONFIG_X=y lines recorded in os.features
	Args          []string // image Cmd
	Env           []string // image Env (K=V)
	KernelVersion string   // org.unikraft.kernel.version
	Labels        map[string]string
	Version       string // recorded as sh.kraftkit.version-compatible producer version
}

// ParseKConfig keeps the enabled options ("CONFIG_X=y") of a .config file.
func ParseKConfig(data []byte) []string {
	var out []string
	for _, l := range strings.Split(string(data), "\n") {
		l = strings.TrimSpace(l)
		if strings.HasPrefix(l, "CONFIG_") && strings.HasSuffix(l, "=y") {
			out = append(out, l)
		}
	}
	return out
}

func fileLayer(path, name, annotation string) (mutate.Addendum, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return mutate.Addendum{}, err
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o755, Size: int64(len(data)), Typeflag: tar.TypeReg,
		ModTime: time.Unix(0, 0), Format: tar.FormatPAX}); err != nil {
		return mutate.Addendum{}, err
	}
	if _, err := tw.Write(data); err != nil {
		return mutate.Addendum{}, err
	}
	if err := tw.Close(); err != nil {
		return mutate.Addendum{}, err
	}
	return mutate.Addendum{
		Layer:       static.NewLayer(buf.Bytes(), types.OCIUncompressedLayer),
		Annotations: map[string]string{annotation: name},
		MediaType:   types.OCIUncompressedLayer,
	}, nil
}

// Pack builds the kraftkit-compatible image index for opts.
func Pack(opts PackOptions) (v1.ImageIndex, error) {
	if opts.Kernel == "" {
		return nil, fmt.Errorf("a kernel is required")
	}
	for _, e := range opts.Env {
		if !strings.Contains(e, "=") {
			return nil, fmt.Errorf("env %q is not KEY=VALUE", e)
		}
	}
	adds := []mutate.Addendum{}
	kl, err := fileLayer(opts.Kernel, PathKernel, AnnotationKernel)
	if err != nil {
		return nil, fmt.Errorf("kernel: %w", err)
	}
	adds = append(adds, kl)
	if opts.Initrd != "" {
		il, err := fileLayer(opts.Initrd, PathInitrd, AnnotationInitrd)
		if err != nil {
			return nil, fmt.Errorf("initrd: %w", err)
		}
		adds = append(adds, il)
	}
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err = mutate.Append(img, adds...)
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.OS = PlatformOS
	cf.Architecture = ArchX86_64
	cf.OSFeatures = opts.KConfig
	cf.Created = v1.Time{Time: time.Unix(0, 0).UTC()}
	cf.Config.Cmd = opts.Args
	cf.Config.Env = opts.Env
	cf.Config.Labels = opts.Labels
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		return nil, err
	}
	manifestAnn := map[string]string{}
	if opts.KernelVersion != "" {
		manifestAnn[AnnotationKernelVersion] = opts.KernelVersion
	}
	if len(manifestAnn) > 0 {
		img = mutate.Annotations(img, manifestAnn).(v1.Image)
	}
	version := opts.Version
	if version == "" {
		version = "unilet"
	}
	idx := mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
	idx = mutate.AppendManifests(idx, mutate.IndexAddendum{
		Add: img,
		Descriptor: v1.Descriptor{
			MediaType:   types.OCIManifestSchema1,
			Platform:    &v1.Platform{OS: PlatformOS, Architecture: ArchX86_64, OSFeatures: opts.KConfig},
			Annotations: map[string]string{AnnotationKraftkitVersion: version},
		},
	})
	return idx, nil
}
