package image

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
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
	Version       string // sh.kraftkit.version (kraftkit requires the annotation, discards its value)
	// Ref: the reference the image is pushed as; recorded, as kraftkit
	// does, in org.opencontainers.image.ref.name, io.containerd.image.name
	// and org.unikraft.image.name. Optional.
	Ref string
	// Created: recorded as org.opencontainers.image.created (zero: not recorded).
	Created time.Time
}

// ParseKConfig returns the os.features kraftkit records for a .config: every
// CONFIG_X=VALUE line (not only =y: CONFIG_HZ=100 too) except CONFIG_UK_APP
// and CONFIG_UK_BASE, quotes stripped, sorted.
func ParseKConfig(data []byte) []string {
	var out []string
	for _, l := range strings.Split(string(data), "\n") {
		k, v, ok := strings.Cut(strings.TrimSpace(l), "=")
		if !ok || !strings.HasPrefix(k, "CONFIG_") || k == "CONFIG_UK_APP" || k == "CONFIG_UK_BASE" {
			continue
		}
		out = append(out, k+"="+strings.Trim(v, `"`))
	}
	sort.Strings(out)
	return out
}

// fileLayer is one kraftkit file layer: a USTAR archive of the one file (no
// directory entries, owner 0, mtime 0), annotated with its absolute path.
func fileLayer(path, name, annotation string, mode int64) (mutate.Addendum, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return mutate.Addendum{}, err
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	if err := tw.WriteHeader(&tar.Header{Name: name, Mode: mode, Size: int64(len(data)), Typeflag: tar.TypeReg,
		ModTime: time.Unix(0, 0), Format: tar.FormatUSTAR}); err != nil {
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
		Annotations: map[string]string{annotation: "/" + name},
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
	kl, err := fileLayer(opts.Kernel, PathKernel, AnnotationKernel, 0o755)
	if err != nil {
		return nil, fmt.Errorf("kernel: %w", err)
	}
	adds = append(adds, kl)
	if opts.Initrd != "" {
		il, err := fileLayer(opts.Initrd, PathInitrd, AnnotationInitrd, 0o644)
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
	platform := &v1.Platform{OS: PlatformOS, Architecture: ArchX86_64, OSVersion: opts.KernelVersion, OSFeatures: opts.KConfig}
	cf.OS, cf.Architecture, cf.OSVersion, cf.OSFeatures = platform.OS, platform.Architecture, platform.OSVersion, platform.OSFeatures
	cf.Created = v1.Time{}
	cf.History = nil
	cf.Config.Cmd = opts.Args
	cf.Config.Env = opts.Env
	cf.Config.Labels = opts.Labels
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		return nil, err
	}
	version := opts.Version
	if version == "" {
		version = "unilet"
	}
	// kraftkit's annotations: on the index, the manifest and its index entry.
	indexAnn := map[string]string{AnnotationKraftkitVersion: version}
	if opts.Ref != "" {
		r, err := name.ParseReference(opts.Ref, name.WeakValidation)
		if err != nil {
			return nil, fmt.Errorf("reference %q: %w", opts.Ref, err)
		}
		indexAnn[annotationRefName] = r.Context().Name()
		indexAnn[annotationContainerdName] = r.Name()
	}
	if !opts.Created.IsZero() {
		indexAnn[annotationCreated] = opts.Created.UTC().Format(time.RFC3339)
	}
	manifestAnn := maps.Clone(indexAnn)
	if opts.Ref != "" {
		manifestAnn[AnnotationImageName] = indexAnn[annotationRefName]
	}
	if opts.KernelVersion != "" {
		manifestAnn[AnnotationKernelVersion] = opts.KernelVersion
	}
	img = mutate.Annotations(img, manifestAnn).(v1.Image)
	// kraftkit reads the platform from the manifest's config descriptor (a
	// field OCI leaves undefined; OCI readers ignore it).
	m, err := img.Manifest()
	if err != nil {
		return nil, err
	}
	m = m.DeepCopy()
	m.Config.Platform = platform
	// As kraftkit: no "created" in the config (a zero time would read as year 1).
	rawCfg, err := img.RawConfigFile()
	if err != nil {
		return nil, err
	}
	var cfgMap map[string]json.RawMessage
	if err := json.Unmarshal(rawCfg, &cfgMap); err != nil {
		return nil, err
	}
	delete(cfgMap, "created")
	if rawCfg, err = json.Marshal(cfgMap); err != nil {
		return nil, err
	}
	if m.Config.Digest, m.Config.Size, err = v1.SHA256(bytes.NewReader(rawCfg)); err != nil {
		return nil, err
	}
	raw, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	idx := mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
	idx = mutate.AppendManifests(idx, mutate.IndexAddendum{
		Add: &rawManifestImage{Image: img, raw: raw, config: rawCfg},
		Descriptor: v1.Descriptor{
			MediaType:   types.OCIManifestSchema1,
			Platform:    platform,
			Annotations: manifestAnn,
		},
	})
	idx = mutate.Annotations(idx, indexAnn).(v1.ImageIndex)
	// As kraftkit: no artifactType on the entry (an image, not an artifact).
	im, err := idx.IndexManifest()
	if err != nil {
		return nil, err
	}
	im = im.DeepCopy()
	for i := range im.Manifests {
		im.Manifests[i].ArtifactType = ""
	}
	rawIdx, err := json.Marshal(im)
	if err != nil {
		return nil, err
	}
	return &rawIndex{idx: idx, raw: rawIdx}, nil
}

// rawIndex is an index whose manifest is raw (its images: the embedded
// index's).
type rawIndex struct {
	idx v1.ImageIndex
	raw []byte
}

func (r *rawIndex) MediaType() (types.MediaType, error)         { return r.idx.MediaType() }
func (r *rawIndex) Image(h v1.Hash) (v1.Image, error)           { return r.idx.Image(h) }
func (r *rawIndex) ImageIndex(h v1.Hash) (v1.ImageIndex, error) { return r.idx.ImageIndex(h) }

func (r *rawIndex) RawManifest() ([]byte, error) { return r.raw, nil }

func (r *rawIndex) IndexManifest() (*v1.IndexManifest, error) {
	return v1.ParseIndexManifest(bytes.NewReader(r.raw))
}

func (r *rawIndex) Digest() (v1.Hash, error) {
	h, _, err := v1.SHA256(bytes.NewReader(r.raw))
	return h, err
}

func (r *rawIndex) Size() (int64, error) { return int64(len(r.raw)), nil }

// Annotations kraftkit writes besides the org.unikraft ones.
const (
	annotationRefName        = "org.opencontainers.image.ref.name"
	annotationContainerdName = "io.containerd.image.name"
	annotationCreated        = "org.opencontainers.image.created"
	AnnotationImageName      = "org.unikraft.image.name"
)

// rawManifestImage is an image whose manifest and config are raw (its
// layers: the embedded image's).
type rawManifestImage struct {
	v1.Image
	raw, config []byte
}

func (r *rawManifestImage) RawConfigFile() ([]byte, error) { return r.config, nil }

func (r *rawManifestImage) ConfigFile() (*v1.ConfigFile, error) {
	return v1.ParseConfigFile(bytes.NewReader(r.config))
}

func (r *rawManifestImage) ConfigName() (v1.Hash, error) {
	h, _, err := v1.SHA256(bytes.NewReader(r.config))
	return h, err
}

func (r *rawManifestImage) RawManifest() ([]byte, error) { return r.raw, nil }

func (r *rawManifestImage) Manifest() (*v1.Manifest, error) {
	return v1.ParseManifest(bytes.NewReader(r.raw))
}

func (r *rawManifestImage) Digest() (v1.Hash, error) {
	h, _, err := v1.SHA256(bytes.NewReader(r.raw))
	return h, err
}

func (r *rawManifestImage) Size() (int64, error) { return int64(len(r.raw)), nil }
