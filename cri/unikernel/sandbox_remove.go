package unikernel

import (
	"context"
	"errors"

	"github.com/sirupsen/logrus"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/cri/store"
)

// RemovePodSandbox stops and removes the pod and its containers. Unknown
// IDs succeed. Removing is recorded first, so a removal the daemon did not
// finish is finished by the next one, never undone.
func (s *Service) RemovePodSandbox(ctx context.Context, r *runtimeapi.RemovePodSandboxRequest) (*runtimeapi.RemovePodSandboxResponse, error) {
	sb, err := s.getSandbox(r.GetPodSandboxId())
	if errors.Is(err, store.ErrNotFound) {
		return &runtimeapi.RemovePodSandboxResponse{}, nil
	}
	if err != nil {
		return nil, err
	}
	if err := s.stopSandbox(ctx, sb, true); err != nil {
		return nil, err
	}
	if err := s.removeSandbox(ctx, sb); err != nil {
		return nil, err
	}
	logrus.WithFields(podFields(sb.ID(), sb.Meta().Config)).Info("unikernel pod sandbox removed")
	return &runtimeapi.RemovePodSandboxResponse{}, nil
}

// removeSandbox removes a stopped sandbox, its containers and its record.
func (s *Service) removeSandbox(ctx context.Context, sb *sandbox) error {
	sb.Lifecycle.Lock()
	err := sb.Update(func(cur sandboxStatus) (sandboxStatus, error) {
		if cur.State == store.SandboxRemoving {
			return cur, nil
		}
		if err := cur.State.Check(store.SandboxRemoving); err != nil {
			return cur, err
		}
		cur.State = store.SandboxRemoving
		return cur, nil
	})
	sb.Lifecycle.Unlock()
	if err != nil && !errors.Is(err, store.ErrDeleted) {
		return err
	}
	for _, c := range s.containersOf(sb.ID()) {
		if err := s.removeContainer(ctx, c); err != nil {
			return err
		}
	}
	sb.Lifecycle.Lock()
	defer sb.Lifecycle.Unlock()
	if err := s.teardownNetwork(ctx, sb, true); err != nil {
		return err
	}
	s.vms.DropStaging(sb.ID(), sb.Meta().Config.GetLinux().GetCgroupParent())
	return s.sandboxes.Delete(sb)
}
