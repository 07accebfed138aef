package cri

import (
	"context"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/cri/unikernel"
)

// forVMPod reports whether an image request is made for a unikernel pod:
// ImageSpec.runtime_handler, or the pod annotations kubelet copies into
// ImageSpec.annotations (for ImageStatus and PullImage alike), or, for a
// pull, the pod's sandbox config.
func (r *Router) forVMPod(spec *runtimeapi.ImageSpec, sandbox *runtimeapi.PodSandboxConfig) bool {
	if h := spec.GetRuntimeHandler(); h != "" && h == r.cfg.Handler {
		return true
	}
	if spec.GetAnnotations()[r.cfg.Annotation] == r.cfg.AnnotationValue {
		return true
	}
	// kubelet's PullImage carries the pod's sandbox config but not its
	// RuntimeClass handler: a pod unilet already runs as a VM sandbox
	// (kubelet runs the sandbox before pulling) is recognised by its metadata.
	return sandbox != nil && (r.IsUnikernelPod(sandbox, "") || r.vm.OwnsPod(sandbox.GetMetadata()))
}

// PullImage routes by the pod (forVMPod), then the configured unikernel
// registries; the rest goes upstream.
func (r *Router) PullImage(ctx context.Context, req *runtimeapi.PullImageRequest) (*runtimeapi.PullImageResponse, error) {
	toVM := r.forVMPod(req.GetImage(), req.GetSandboxConfig()) || r.isVMImageRef(req.GetImage().GetImage()) || r.upImage == nil
	return either(ctx, r, toVM, req, (*unikernel.Service).PullImage, r.upImage, runtimeapi.ImageServiceClient.PullImage)
}

// ImageStatus asks the VM store alone for a unikernel pod's image (so
// kubelet's IfNotPresent never finds it "present" in containerd's store and
// skips the pull the VM needs); otherwise the VM store first.
func (r *Router) ImageStatus(ctx context.Context, req *runtimeapi.ImageStatusRequest) (*runtimeapi.ImageStatusResponse, error) {
	toVM := r.forVMPod(req.GetImage(), nil) || r.vm.HasImage(req.GetImage().GetImage()) || r.upImage == nil
	return either(ctx, r, toVM, req, (*unikernel.Service).ImageStatus, r.upImage, runtimeapi.ImageServiceClient.ImageStatus)
}

// ListImages merges both stores.
func (r *Router) ListImages(ctx context.Context, req *runtimeapi.ListImagesRequest) (*runtimeapi.ListImagesResponse, error) {
	return merged(ctx, r, "ListImages", req, (*unikernel.Service).ListImages, r.upImage, r.upImage != nil, runtimeapi.ImageServiceClient.ListImages, false,
		func(into, from *runtimeapi.ListImagesResponse) *runtimeapi.ListImagesResponse {
			into.Images = append(into.Images, from.GetImages()...)
			return into
		})
}

// RemoveImage: a unikernel pod's image in the VM store; otherwise the VM
// store first.
func (r *Router) RemoveImage(ctx context.Context, req *runtimeapi.RemoveImageRequest) (*runtimeapi.RemoveImageResponse, error) {
	toVM := r.forVMPod(req.GetImage(), nil) || r.vm.HasImage(req.GetImage().GetImage()) || r.upImage == nil
	return either(ctx, r, toVM, req, (*unikernel.Service).RemoveImage, r.upImage, runtimeapi.ImageServiceClient.RemoveImage)
}

// ImageFsInfo merges both sides.
func (r *Router) ImageFsInfo(ctx context.Context, req *runtimeapi.ImageFsInfoRequest) (*runtimeapi.ImageFsInfoResponse, error) {
	return merged(ctx, r, "ImageFsInfo", req, (*unikernel.Service).ImageFsInfo, r.upImage, r.upImage != nil, runtimeapi.ImageServiceClient.ImageFsInfo, false,
		func(into, from *runtimeapi.ImageFsInfoResponse) *runtimeapi.ImageFsInfoResponse {
			into.ImageFilesystems = append(into.ImageFilesystems, from.GetImageFilesystems()...)
			into.ContainerFilesystems = append(into.ContainerFilesystems, from.GetContainerFilesystems()...)
			return into
		})
}
