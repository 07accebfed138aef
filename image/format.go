// Package image owns Unikraft OCI images on the unikernel side: the kraftkit-compatible
// format (index → qemu/x86_64 manifest → one-file tar layers for kernel and
// initrd), packing it (uniletctl pack), and the node-local store that pulls,
// unpacks, lists and removes images under unilet's root directory.
package image

import (
	"fmt"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// Format constants shared with kraftkit's `kraft pkg`.
const (
	AnnotationKernel          = "org.unikraft.kernel.image"
	AnnotationInitrd          = "org.unikraft.kernel.initrd"
	AnnotationKernelVersion   = "org.unikraft.kernel.version"
	AnnotationKraftkitVersion = "sh.kraftkit.version"
	AnnotationRefName         = "org.opencontainers.image.ref.name"

	PathKernel = "unikraft/bin/kernel"
	PathInitrd = "unikraft/bin/initrd"

	PlatformOS      = "qemu"
	PlatformOSAlias = "kvm"
	ArchX86_64      = "x86_64"
)

// IsVMPlatform reports whether os/arch name a platform unilet runs.
func IsVMPlatform(os, arch string) bool {
	return (os == PlatformOS || os == PlatformOSAlias) && (arch == ArchX86_64 || arch == "amd64")
}

// SelectManifest picks the qemu (or kvm) / x86_64 manifest of an index. The
// error lists what the index offers, so an operator sees why it was refused.
func SelectManifest(idx *v1.IndexManifest) (v1.Descriptor, error) {
	var offered []string
	var fallback *v1.Descriptor
	for i := range idx.Manifests {
		d := idx.Manifests[i]
		if d.Platform == nil {
			offered = append(offered, "(no platform)")
			continue
		}
		offered = append(offered, d.Platform.OS+"/"+d.Platform.Architecture)
		if !IsVMPlatform(d.Platform.OS, d.Platform.Architecture) {
			continue
		}
		// Prefer the Unikraft architecture name and the canonical OS name.
		if d.Platform.OS == PlatformOS && d.Platform.Architecture == ArchX86_64 {
			return d, nil
		}
		if fallback == nil {
			fallback = &idx.Manifests[i]
		}
	}
	if fallback != nil {
		return *fallback, nil
	}
	return v1.Descriptor{}, fmt.Errorf("no %s/%s manifest in the image index (it offers: %s); this is not a Unikraft image for QEMU on x86_64",
		PlatformOS, ArchX86_64, strings.Join(offered, ", "))
}

// entryName normalises a tar entry name ("./unikraft/bin/kernel", "/unikraft/…").
func entryName(n string) string {
	return strings.TrimPrefix(strings.TrimPrefix(n, "./"), "/")
}
