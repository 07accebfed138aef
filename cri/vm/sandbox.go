package vm

import (
	"context"
	"strings"
	"time"

	"github.com/sirupsen/logrus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// RunPodSandbox records a unikernel pod. There is no pause process.
func (s *Service) RunPodSandbox(ctx context.Context, r *runtimeapi.RunPodSandboxRequest) (*runtimeapi.RunPodSandboxResponse, error) {
	cfg := r.GetConfig()
	if cfg == nil || cfg.GetMetadata() == nil {
		return nil, errorf(codes.InvalidArgument, "sandbox config with metadata is required")
	}
	md := cfg.GetMetadata()
	if md.GetName() == "" || md.GetNamespace() == "" {
		return nil, errorf(codes.InvalidArgument, "sandbox metadata needs a name and a namespace")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, sb := range s.sandboxes {
		m := sb.config.GetMetadata()
		if m.GetName() == md.GetName() && m.GetNamespace() == md.GetNamespace() && m.GetUid() == md.GetUid() && m.GetAttempt() == md.GetAttempt() {
			return nil, errorf(codes.AlreadyExists, "pod sandbox %s/%s (uid %q, attempt %d) already exists as %s",
				md.GetNamespace(), md.GetName(), md.GetUid(), md.GetAttempt(), sb.id)
		}
	}
	sb := &sandbox{id: newID(), config: cfg, handler: r.GetRuntimeHandler(), createdAt: time.Now(),
		state: runtimeapi.PodSandboxState_SANDBOX_READY}
	s.sandboxes[sb.id] = sb
	s.saveSandbox(sb)
	logrus.WithFields(logrus.Fields{"sandbox": sb.id, "pod": md.GetNamespace() + "/" + md.GetName()}).Info("unikernel pod sandbox created")
	return &runtimeapi.RunPodSandboxResponse{PodSandboxId: sb.id}, nil
}

// StopPodSandbox stops every VM of the pod. Unknown IDs succeed (idempotent).
func (s *Service) StopPodSandbox(ctx context.Context, r *runtimeapi.StopPodSandboxRequest) (*runtimeapi.StopPodSandboxResponse, error) {
	s.mu.Lock()
	sb, err := s.sandboxLocked(r.GetPodSandboxId())
	if err != nil {
		s.mu.Unlock()
		if status.Code(err) == codes.NotFound {
			return &runtimeapi.StopPodSandboxResponse{}, nil
		}
		return nil, err
	}
	ids := s.containerIDsOf(sb.id)
	s.mu.Unlock()
	for _, id := range ids {
		if _, err := s.StopContainer(ctx, &runtimeapi.StopContainerRequest{ContainerId: id, Timeout: 0}); err != nil {
			return nil, err
		}
	}
	s.mu.Lock()
	sb.state = runtimeapi.PodSandboxState_SANDBOX_NOTREADY
	s.saveSandbox(sb)
	s.mu.Unlock()
	return &runtimeapi.StopPodSandboxResponse{}, nil
}

// RemovePodSandbox stops and removes the pod and its containers. Unknown IDs succeed.
func (s *Service) RemovePodSandbox(ctx context.Context, r *runtimeapi.RemovePodSandboxRequest) (*runtimeapi.RemovePodSandboxResponse, error) {
	if _, err := s.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: r.GetPodSandboxId()}); err != nil {
		return nil, err
	}
	s.mu.Lock()
	sb, err := s.sandboxLocked(r.GetPodSandboxId())
	if err != nil {
		s.mu.Unlock()
		return &runtimeapi.RemovePodSandboxResponse{}, nil
	}
	ids := s.containerIDsOf(sb.id)
	s.mu.Unlock()
	for _, id := range ids {
		if _, err := s.RemoveContainer(ctx, &runtimeapi.RemoveContainerRequest{ContainerId: id}); err != nil {
			return nil, err
		}
	}
	s.mu.Lock()
	delete(s.sandboxes, sb.id)
	s.forgetSandbox(sb.id)
	s.mu.Unlock()
	logrus.WithField("sandbox", sb.id).Info("unikernel pod sandbox removed")
	return &runtimeapi.RemovePodSandboxResponse{}, nil
}

func (sb *sandbox) toAPI() *runtimeapi.PodSandbox {
	return &runtimeapi.PodSandbox{
		Id: sb.id, Metadata: sb.config.GetMetadata(), State: sb.state, CreatedAt: sb.createdAt.UnixNano(),
		Labels: sb.config.GetLabels(), Annotations: sb.config.GetAnnotations(), RuntimeHandler: sb.handler,
	}
}

// PodSandboxStatus reports the pod. (Pod networking arrives with CNI support.)
func (s *Service) PodSandboxStatus(ctx context.Context, r *runtimeapi.PodSandboxStatusRequest) (*runtimeapi.PodSandboxStatusResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sb, err := s.sandboxLocked(r.GetPodSandboxId())
	if err != nil {
		return nil, err
	}
	st := &runtimeapi.PodSandboxStatus{
		Id: sb.id, Metadata: sb.config.GetMetadata(), State: sb.state, CreatedAt: sb.createdAt.UnixNano(),
		Network: &runtimeapi.PodSandboxNetworkStatus{},
		Linux:   &runtimeapi.LinuxPodSandboxStatus{Namespaces: &runtimeapi.Namespace{Options: sb.config.GetLinux().GetSecurityContext().GetNamespaceOptions()}},
		Labels:  sb.config.GetLabels(), Annotations: sb.config.GetAnnotations(), RuntimeHandler: sb.handler,
	}
	resp := &runtimeapi.PodSandboxStatusResponse{Status: st}
	if r.GetVerbose() {
		resp.Info = map[string]string{"runtime": "unilet-vm", "logDirectory": sb.config.GetLogDirectory()}
	}
	return resp, nil
}

// ListPodSandbox lists unikernel pods matching the filter.
func (s *Service) ListPodSandbox(ctx context.Context, r *runtimeapi.ListPodSandboxRequest) (*runtimeapi.ListPodSandboxResponse, error) {
	f := r.GetFilter()
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []*runtimeapi.PodSandbox
	for _, sb := range s.sandboxes {
		if f != nil {
			if f.GetId() != "" && !strings.HasPrefix(sb.id, f.GetId()) {
				continue
			}
			if f.GetState() != nil && f.GetState().GetState() != sb.state {
				continue
			}
			if !labelsMatch(sb.config.GetLabels(), f.GetLabelSelector()) {
				continue
			}
		}
		out = append(out, sb.toAPI())
	}
	return &runtimeapi.ListPodSandboxResponse{Items: out}, nil
}

func labelsMatch(labels, selector map[string]string) bool {
	for k, v := range selector {
		if labels[k] != v {
			return false
		}
	}
	return true
}
