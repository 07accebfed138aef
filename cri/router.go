// Package cri is unilet's CRI surface: a router that sends unikernel pods to
// the VM service (package cri/unikernel) and passes every other pod, unchanged and
// with its IDs, to the upstream runtime (containerd). Routing rules:
// docs/architecture.md, "Routing".
package cri

import (
	"fmt"
	"strings"

	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/cri/errdefs"
	"github.com/unilet-dev/unilet/cri/unikernel"
	"github.com/unilet-dev/unilet/image"
)

// Defaults for routing.
const (
	DefaultAnnotation      = "kubernetes.io/target-runtime"
	DefaultAnnotationValue = "unikraft"
	DefaultHandler         = "unikraft"
)

// Config configures routing.
type Config struct {
	Annotation      string   // pod annotation that selects the VM runtime
	AnnotationValue string   // its value
	Handler         string   // RuntimeClass handler that selects the VM runtime
	Registries      []string // image refs under these hosts go to the VM store
	Upstream        string   // upstream CRI endpoint ("" = none)
}

// Router serves the CRI RuntimeService and ImageService: the methods it
// declares route between the unikernel side and the upstream (or merge both);
// every other method is forwarded upstream unchanged (forward.go).
type Router struct {
	cfg     Config
	vm      *unikernel.Service
	conn    *grpc.ClientConn
	upRT    runtimeapi.RuntimeServiceClient
	upImage runtimeapi.ImageServiceClient
}

// NewRouter builds a router. The upstream connection is lazy: a dead upstream
// only fails the calls that need it.
func NewRouter(cfg Config, v *unikernel.Service) (*Router, error) {
	if cfg.Annotation == "" {
		cfg.Annotation = DefaultAnnotation
	}
	if cfg.AnnotationValue == "" {
		cfg.AnnotationValue = DefaultAnnotationValue
	}
	if cfg.Handler == "" {
		cfg.Handler = DefaultHandler
	}
	r := &Router{cfg: cfg, vm: v}
	if cfg.Upstream != "" {
		target := cfg.Upstream
		if strings.HasPrefix(target, "/") {
			target = "unix://" + target
		}
		conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(16<<20)))
		if err != nil {
			return nil, fmt.Errorf("upstream endpoint %q: %w", cfg.Upstream, err)
		}
		r.conn = conn
		r.upRT = runtimeapi.NewRuntimeServiceClient(conn)
		r.upImage = runtimeapi.NewImageServiceClient(conn)
	}
	return r, nil
}

// Close closes the upstream connection.
func (r *Router) Close() error {
	if r.conn != nil {
		return r.conn.Close()
	}
	return nil
}

// IsUnikernelPod applies the routing rule to a sandbox config and handler.
func (r *Router) IsUnikernelPod(cfg *runtimeapi.PodSandboxConfig, handler string) bool {
	if handler != "" && handler == r.cfg.Handler {
		return true
	}
	return cfg.GetAnnotations()[r.cfg.Annotation] == r.cfg.AnnotationValue
}

// isVMImageRef: refs under the configured unikernel registries.
func (r *Router) isVMImageRef(ref string) bool {
	_, canonical, err := image.NormalizeRef(ref)
	if err != nil {
		return false
	}
	for _, reg := range r.cfg.Registries {
		if strings.HasPrefix(canonical, strings.TrimSuffix(reg, "/")+"/") {
			return true
		}
	}
	return false
}

func (r *Router) noUpstream(what string) error {
	return errdefs.Errorf(errdefs.ErrFailedPrecondition,
		"%s is not a unikernel pod (no %s=%s annotation, no %q runtime handler) and unilet has no upstream runtime configured (--upstream-endpoint is empty)",
		what, r.cfg.Annotation, r.cfg.AnnotationValue, r.cfg.Handler)
}

func upstreamErr(err error) error {
	if st, ok := status.FromError(err); ok && st.Code() == codes.Unavailable {
		return errdefs.Errorf(errdefs.ErrUnavailable, "upstream runtime unreachable: %s", st.Message())
	}
	return err
}

func (r *Router) logUpstreamDown(op string, err error) {
	logrus.WithError(err).WithField("op", op).Warn("the upstream runtime failed this call; answering from the unikernel side only")
}
