package unikernel

import (
	"context"
	"errors"
	"github.com/sirupsen/logrus"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/cri/errdefs"
	"github.com/unilet-dev/unilet/cri/store"
)

// StopPodSandbox stops every VM of the pod and tears its network down.
// Unknown IDs succeed (idempotent).
func (s *Service) StopPodSandbox(ctx context.Context, r *runtimeapi.StopPodSandboxRequest) (*runtimeapi.StopPodSandboxResponse, error) {
	sb, err := s.getSandbox(r.GetPodSandboxId())
	if errors.Is(err, store.ErrNotFound) {
		return &runtimeapi.StopPodSandboxResponse{}, nil
	}
	if err != nil {
		return nil, err
	}
	wasReady := sb.Status().State == store.SandboxReady
	if err := s.stopSandbox(ctx, sb, false); err != nil {
		return nil, err
	}
	if wasReady { // kubelet repeats the call for pods long stopped
		logrus.WithFields(podFields(sb.ID(), sb.Meta().Config)).Info("unikernel pod sandbox stopped")
	}
	return &runtimeapi.StopPodSandboxResponse{}, nil
}

// stopSandbox: no new containers (NotReady), every VM stopped, the network
// torn down (for a pod being removed, even if CNI DEL fails: see
// teardownNetwork). The sandbox lock is never held while a container's is
// taken.
func (s *Service) stopSandbox(ctx context.Context, sb *sandbox, removing bool) error {
	sb.Lifecycle.Lock()
	err := sb.Update(func(cur sandboxStatus) (sandboxStatus, error) {
		if cur.State == store.SandboxReady || cur.State == store.SandboxCreating {
			cur.State = store.SandboxNotReady
		}
		return cur, nil
	})
	staged := sb.Meta().rt.takeStaged()
	sb.Lifecycle.Unlock()
	staged.Drop()
	if err != nil {
		return err
	}
	// A pod being removed has its containers removed here, before its
	// network goes: a removal is forced (CRI), so a VM whose shim does not
	// answer is killed rather than failing the call (removeContainer).
	for _, c := range s.containersOf(sb.ID()) {
		stop := func() error { return s.stopContainer(ctx, c, 0) }
		if removing {
			stop = func() error { return s.removeContainer(ctx, c) }
		}
		if err := stop(); err != nil {
			return err
		}
	}
	sb.Lifecycle.Lock()
	defer sb.Lifecycle.Unlock()
	if err := s.teardownNetwork(ctx, sb, removing); err != nil {
		return errorf(errdefs.ErrUnknown, "tear down the network of pod %s: %v (kubelet retries)", sb.ID(), err)
	}
	return nil
}
