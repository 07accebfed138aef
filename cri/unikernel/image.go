package unikernel

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/sirupsen/logrus"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/cri/errdefs"
	"github.com/unilet-dev/unilet/image"
	"github.com/unilet-dev/unilet/pkg/metrics"
)

// Image annotations unilet adds to what it answers for a unikernel image
// (crictl inspecti shows them; docs/images.md).
const (
	AnnotationImageKernelSize = "dev.unilet.kernel-size"
	AnnotationImageInitrdSize = "dev.unilet.initrd-size"
	AnnotationImageFeatures   = "dev.unilet.os-features"
)

// toAPIImage: the same answer however the image was asked for (ID, tag,
// digest), its spec naming it by ID with unilet's annotations.
func toAPIImage(img *image.Image) *runtimeapi.Image {
	v := imageView(img)
	out := &runtimeapi.Image{Id: img.ID, RepoTags: img.RepoTags, RepoDigests: img.RepoDigests, Size: uint64(img.Size),
		Spec: &runtimeapi.ImageSpec{Image: img.ID, Annotations: map[string]string{
			AnnotationImageKernelSize: strconv.FormatInt(v.KernelSize, 10),
			AnnotationImageFeatures:   strconv.Itoa(len(img.Features)),
		}}}
	if v.UnikraftVersion != "" {
		out.Spec.Annotations[image.AnnotationKernelVersion] = v.UnikraftVersion
	}
	if img.Initrd != "" {
		out.Spec.Annotations[AnnotationImageInitrdSize] = strconv.FormatInt(v.InitrdSize, 10)
	}
	return out
}

// imageInfo is ImageStatus's verbose "info": what an operator asks of a
// unikernel image.
type imageInfo struct {
	ID              string            `json:"id"`
	RepoTags        []string          `json:"repoTags,omitempty"`
	RepoDigests     []string          `json:"repoDigests,omitempty"`
	UnikraftVersion string            `json:"unikraftVersion,omitempty"`
	KernelSize      int64             `json:"kernelSize"`
	InitrdSize      int64             `json:"initrdSize,omitempty"`
	Features        int               `json:"osFeatures"`              // entries in os.features
	Enabled         []string          `json:"enabledFeatures"`         // the =y ones, CONFIG_ dropped
	Settings        map[string]string `json:"featureValues,omitempty"` // the others (CONFIG_HZ=100)
	Cmd             []string          `json:"cmd,omitempty"`
	Env             []string          `json:"env,omitempty"`
	Labels          map[string]string `json:"labels,omitempty"`
	Annotations     map[string]string `json:"annotations,omitempty"`
}

func imageView(img *image.Image) imageInfo {
	v := imageInfo{ID: img.ID, RepoTags: img.RepoTags, RepoDigests: img.RepoDigests, UnikraftVersion: img.Annotations[image.AnnotationKernelVersion],
		Features: len(img.Features), Enabled: []string{}, Cmd: img.Cmd, Env: img.Env, Labels: img.Labels, Annotations: img.Annotations}
	if st, err := os.Stat(img.Kernel); err == nil {
		v.KernelSize = st.Size()
	}
	if img.Initrd != "" {
		if st, err := os.Stat(img.Initrd); err == nil {
			v.InitrdSize = st.Size()
		}
	}
	for _, f := range img.Features {
		k, val, _ := strings.Cut(f, "=")
		k = strings.TrimPrefix(k, "CONFIG_")
		if val == "y" {
			v.Enabled = append(v.Enabled, k)
		} else {
			if v.Settings == nil {
				v.Settings = map[string]string{}
			}
			v.Settings[k] = val
		}
	}
	return v
}

// PullImage pulls a unikernel image (auth from imagePullSecrets honoured).
func (s *Service) PullImage(ctx context.Context, r *runtimeapi.PullImageRequest) (*runtimeapi.PullImageResponse, error) {
	ref := r.GetImage().GetImage()
	if ref == "" {
		return nil, errorf(errdefs.ErrInvalidArgument, "image reference is required")
	}
	var auth *image.Auth
	if a := r.GetAuth(); a != nil {
		auth = &image.Auth{Username: a.GetUsername(), Password: a.GetPassword(), Auth: a.GetAuth(),
			IdentityToken: a.GetIdentityToken(), RegistryToken: a.GetRegistryToken()}
	}
	t0 := time.Now()
	img, err := s.images.Pull(ctx, ref, auth)
	var size int64
	if err == nil {
		size = img.Size
	}
	metrics.ObservePull(time.Since(t0), size, err)
	if errors.Is(err, image.ErrNotUnikernel) {
		return nil, errorf(pullKind(err), "pull unikernel image: %v; every container of a unikernel pod runs as a VM, so a Linux container "+
			"image cannot run in one: run it in a pod of its own (without runtimeClassName unikraft or the unikraft annotation)", err)
	}
	if err != nil {
		return nil, errorf(pullKind(err), "pull unikernel image: %v", err)
	}
	return &runtimeapi.PullImageResponse{ImageRef: img.ID}, nil
}

// pullCode: the gRPC code of a failed pull.
func pullKind(err error) error {
	var le *image.LimitError
	var ve *image.VerifyError
	var te *transport.Error
	switch {
	case errors.As(err, &le):
		return errdefs.ErrResourceExhausted
	case errors.Is(err, image.ErrStalled), errors.Is(err, context.DeadlineExceeded):
		return errdefs.ErrDeadlineExceeded
	case errors.Is(err, context.Canceled):
		return errdefs.ErrCanceled
	case errors.As(err, &ve):
		return errdefs.ErrDataLoss
	case errors.Is(err, image.ErrNotUnikernel):
		return errdefs.ErrFailedPrecondition
	case errors.As(err, &te) && te.StatusCode == http.StatusNotFound:
		return errdefs.ErrNotFound
	case errors.As(err, &te) && (te.StatusCode == http.StatusUnauthorized || te.StatusCode == http.StatusForbidden):
		return errdefs.ErrPermissionDenied
	}
	return errdefs.ErrUnknown
}

// ImageStatus returns the image, or an empty response if it is not present (CRI semantics).
func (s *Service) ImageStatus(ctx context.Context, r *runtimeapi.ImageStatusRequest) (*runtimeapi.ImageStatusResponse, error) {
	img, err := s.images.Get(r.GetImage().GetImage())
	if errors.Is(err, image.ErrNotFound) {
		return &runtimeapi.ImageStatusResponse{}, nil
	}
	if err != nil {
		return nil, errorf(errdefs.ErrInternal, "image status: %v", err)
	}
	resp := &runtimeapi.ImageStatusResponse{Image: toAPIImage(img)}
	if r.GetVerbose() {
		b, _ := json.Marshal(imageView(img))
		resp.Info = map[string]string{"info": string(b)}
	}
	return resp, nil
}

// HasImage reports whether the VM store holds ref (for routing).
func (s *Service) HasImage(ref string) bool {
	_, err := s.images.Get(ref)
	return err == nil
}

// ListImages lists unikernel images.
func (s *Service) ListImages(ctx context.Context, r *runtimeapi.ListImagesRequest) (*runtimeapi.ListImagesResponse, error) {
	imgs, err := s.images.List()
	if err != nil {
		return nil, errorf(errdefs.ErrInternal, "list images: %v", err)
	}
	var out []*runtimeapi.Image
	want := r.GetFilter().GetImage().GetImage()
	for _, img := range imgs {
		if want != "" {
			if got, err := s.images.Get(want); err != nil || got.ID != img.ID {
				continue
			}
		}
		out = append(out, toAPIImage(img))
	}
	return &runtimeapi.ListImagesResponse{Images: out}, nil
}

// RemoveImage removes a unikernel image; a missing image is not an error.
func (s *Service) RemoveImage(ctx context.Context, r *runtimeapi.RemoveImageRequest) (*runtimeapi.RemoveImageResponse, error) {
	ref := r.GetImage().GetImage()
	if img, err := s.images.Get(ref); err == nil {
		for _, c := range s.containers.List() {
			if c.Meta().Image.ID == img.ID {
				return nil, errorf(errdefs.ErrFailedPrecondition, "image %s is used by container %s; remove the container first", ref, c.ID())
			}
		}
	}
	img, _ := s.images.Get(ref)
	gone, err := s.images.Remove(ref)
	if err != nil {
		return nil, errorf(errdefs.ErrInternal, "remove image: %v", err)
	}
	if gone && img != nil && s.cfg.Templates != nil {
		if names := s.cfg.Templates.RemoveForImage(img.ID); len(names) > 0 {
			logrus.WithFields(logrus.Fields{"image": img.ID, "templates": names}).Info("removed the templates of a removed image")
			s.warm.poke()
		}
	}
	return &runtimeapi.RemoveImageResponse{}, nil
}

// ImageFsInfo reports the space used by unikernel images.
func (s *Service) ImageFsInfo(ctx context.Context, r *runtimeapi.ImageFsInfoRequest) (*runtimeapi.ImageFsInfoResponse, error) {
	used, inodes, mp := s.images.Usage()
	fs := &runtimeapi.FilesystemUsage{Timestamp: nowNano(), FsId: &runtimeapi.FilesystemIdentifier{Mountpoint: mp},
		UsedBytes: &runtimeapi.UInt64Value{Value: uint64(used)}, InodesUsed: &runtimeapi.UInt64Value{Value: uint64(inodes)}}
	return &runtimeapi.ImageFsInfoResponse{ImageFilesystems: []*runtimeapi.FilesystemUsage{fs}}, nil
}
