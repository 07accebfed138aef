package cri

import (
	"context"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
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
	if toVM {
		return r.vm.PullImage(ctx, req)
	}
	resp, err := r.upImage.PullImage(ctx, req)
	return resp, upstreamErr(err)
}

// ImageStatus asks the VM store alone for a unikernel pod's image (so
// kubelet's IfNotPresent never finds it "present" in containerd's store and
// skips the pull the VM needs); otherwise the VM store first.
func (r *Router) ImageStatus(ctx context.Context, req *runtimeapi.ImageStatusRequest) (*runtimeapi.ImageStatusResponse, error) {
	if r.forVMPod(req.GetImage(), nil) || r.vm.HasImage(req.GetImage().GetImage()) || r.upImage == nil {
		return r.vm.ImageStatus(ctx, req)
	}
	resp, err := r.upImage.ImageStatus(ctx, req)
	return resp, upstreamErr(err)
}

// ListImages merges both stores.
func (r *Router) ListImages(ctx context.Context, req *runtimeapi.ListImagesRequest) (*runtimeapi.ListImagesResponse, error) {
	resp, err := r.vm.ListImages(ctx, req)
	if err != nil || r.upImage == nil {
		return resp, err
	}
	up, err := r.upImage.ListImages(ctx, req)
	if err != nil {
		r.logUpstreamDown("ListImages", err)
		return resp, nil
	}
	resp.Images = append(resp.Images, up.GetImages()...)
	return resp, nil
}

// RemoveImage: a unikernel pod's image in the VM store; otherwise the VM
// store first.
func (r *Router) RemoveImage(ctx context.Context, req *runtimeapi.RemoveImageRequest) (*runtimeapi.RemoveImageResponse, error) {
	if r.forVMPod(req.GetImage(), nil) || r.vm.HasImage(req.GetImage().GetImage()) || r.upImage == nil {
		return r.vm.RemoveImage(ctx, req)
	}
	resp, err := r.upImage.RemoveImage(ctx, req)
	return resp, upstreamErr(err)
}

// ImageFsInfo merges both sides.
func (r *Router) ImageFsInfo(ctx context.Context, req *runtimeapi.ImageFsInfoRequest) (*runtimeapi.ImageFsInfoResponse, error) {
	resp, err := r.vm.ImageFsInfo(ctx, req)
	if err != nil || r.upImage == nil {
		return resp, err
	}
	up, err := r.upImage.ImageFsInfo(ctx, req)
	if err != nil {
		r.logUpstreamDown("ImageFsInfo", err)
		return resp, nil
	}
	resp.ImageFilesystems = append(resp.ImageFilesystems, up.GetImageFilesystems()...)
	resp.ContainerFilesystems = append(resp.ContainerFilesystems, up.GetContainerFilesystems()...)
	return resp, nil
}
