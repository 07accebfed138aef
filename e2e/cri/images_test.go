package cri_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/stretchr/testify/require"

	imagestore "github.com/unilet-dev/unilet/image"
	"github.com/unilet-dev/unilet/internal/testutil"
)

// pushTestImage packs the test kernel (and initrd) to reg under repo:1 and
// returns the ref and the kernel layer's descriptor and the index digest.
func pushTestImage(t *testing.T, reg *testutil.HostileRegistry, repo, initrd string, args ...string) (ref string, kernelLayer v1.Descriptor, index v1.Hash) {
	t.Helper()
	idx, err := imagestore.Pack(imagestore.PackOptions{Kernel: kernel, Initrd: initrd, Args: args})
	require.NoError(t, err)
	ref = reg.Host + "/" + repo + ":1"
	r, err := name.NewTag(ref, name.Insecure)
	require.NoError(t, err)
	require.NoError(t, remote.WriteIndex(r, idx))
	im, err := idx.IndexManifest()
	require.NoError(t, err)
	img, err := idx.Image(im.Manifests[0].Digest)
	require.NoError(t, err)
	m, err := img.Manifest()
	require.NoError(t, err)
	index, err = idx.Digest()
	require.NoError(t, err)
	return ref, m.Layers[0], index
}

// The image supply chain through the daemon and crictl: a tampered kernel
// (same length) fails a pull by the genuine digest with DataLoss and leaves
// nothing; an initrd over --image-max-initrd-mib fails with
// ResourceExhausted; a trickling registry fails its own pull with
// DeadlineExceeded after the stall timeout, while a pull from a normal
// registry, `crictl images` and `crictl inspecti` answer before it ends.
func TestImageSupplyChain(t *testing.T) {
	reg := testutil.NewHostileRegistry(t)
	slowReg := testutil.NewHostileRegistry(t)
	d := startDaemon(t, "--insecure-registry", reg.Host, "--insecure-registry", slowReg.Host,
		"--image-max-initrd-mib", "1", "--image-pull-stall-timeout", "3s")
	vmCfg, _ := podConfig(t, "supply", true)

	good, kernelLayer, index := pushTestImage(t, reg, "unikraft/good", "", "good")
	reg.Rewrite(kernelLayer.Digest.String(), testutil.Flip(int(kernelLayer.Size)/2))
	byDigest := strings.TrimSuffix(good, ":1") + "@" + index.String()
	for _, ref := range []string{good, byDigest} {
		_, err := d.crictl("pull", "--pod-config", vmCfg, ref)
		require.ErrorContains(t, err, "code = DataLoss")
		require.ErrorContains(t, err, kernelLayer.Digest.String())
	}
	require.Empty(t, d.must("images", "-q"), "a tampered pull left an image")
	blobs, _ := os.ReadDir(filepath.Join(d.dir, "root", "images", "blobs", "sha256"))
	require.Empty(t, blobs, "a tampered pull left blobs")
	reg.Rewrite(kernelLayer.Digest.String(), nil)
	d.must("pull", "--pod-config", vmCfg, byDigest)

	// A Linux container image in a unikernel pod (a pod mixing both):
	// refused, saying why and what to do.
	linuxImg, err := random.Image(512, 1)
	require.NoError(t, err)
	linuxImg, err = mutate.ConfigFile(linuxImg, &v1.ConfigFile{OS: "linux", Architecture: "amd64"})
	require.NoError(t, err)
	linuxRef, err := name.NewTag(reg.Host+"/library/busybox:1", name.Insecure)
	require.NoError(t, err)
	require.NoError(t, remote.Write(linuxRef, linuxImg))
	_, err = d.crictl("pull", "--pod-config", vmCfg, linuxRef.String())
	require.ErrorContains(t, err, "code = FailedPrecondition")
	require.ErrorContains(t, err, "a Linux container image cannot run in one")

	initrd := filepath.Join(t.TempDir(), "initrd")
	require.NoError(t, os.WriteFile(initrd, make([]byte, 2<<20), 0o644))
	big, _, _ := pushTestImage(t, reg, "unikraft/big-initrd", initrd)
	_, err = d.crictl("pull", "--pod-config", vmCfg, big)
	require.ErrorContains(t, err, "code = ResourceExhausted")
	require.ErrorContains(t, err, "initrd exceeds the limit of 1 MiB")

	slow, _, _ := pushTestImage(t, slowReg, "unikraft/slow", "", "slow")
	slowReg.Trickle("unikraft/slow", 50*time.Millisecond) // 20 bytes/s: stalled
	fast, _, _ := pushTestImage(t, reg, "unikraft/fast", "", "fast")
	slowDone := make(chan error, 1)
	start := time.Now()
	go func() { _, err := d.crictl("pull", "--pod-config", vmCfg, slow); slowDone <- err }()
	require.Eventually(t, func() bool { return slowReg.Gets("1") > 0 }, 10*time.Second, 10*time.Millisecond, // GET /v2/unikraft/slow/manifests/1
		"the slow pull never asked for its manifest")
	d.must("pull", "--pod-config", vmCfg, fast)
	require.Contains(t, d.must("images"), "unikraft/fast")
	info := d.must("inspecti", fast)
	require.Contains(t, info, "unikraft/fast")
	require.Contains(t, info, `"kernelSize"`, "the operator view: sizes, version, os.features")
	require.Contains(t, info, "dev.unilet.kernel-size")
	select {
	case err := <-slowDone:
		t.Fatalf("the stalled pull ended (%v) before the other calls answered: they waited for it", err)
	default:
	}
	err = <-slowDone
	require.ErrorContains(t, err, "code = DeadlineExceeded")
	require.ErrorContains(t, err, "stalled")
	t.Logf("the stalled pull failed after %s", time.Since(start).Round(100*time.Millisecond))
	require.NotContains(t, d.must("images"), "unikraft/slow")
}
