package unikernel

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/sirupsen/logrus"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/cri/errdefs"
	"github.com/unilet-dev/unilet/cri/store"
	"github.com/unilet-dev/unilet/vmm"
	"github.com/unilet-dev/unilet/vmm/manager"
)

// RemoveContainer removes the container, killing its VM first (a start in
// flight is cancelled and waited for). It never answers OK while the VM
// runs: a shim that does not answer is killed, and QEMU with it. Removing
// is recorded before anything is torn down, so a removed container never
// comes back after a restart. Unknown IDs succeed.
func (s *Service) RemoveContainer(ctx context.Context, r *runtimeapi.RemoveContainerRequest) (*runtimeapi.RemoveContainerResponse, error) {
	c, err := s.getContainer(r.GetContainerId())
	if errors.Is(err, store.ErrNotFound) {
		return &runtimeapi.RemoveContainerResponse{}, nil
	}
	if err != nil {
		return nil, err
	}
	if err := s.removeContainer(ctx, c); err != nil {
		return nil, err
	}
	return &runtimeapi.RemoveContainerResponse{}, nil
}

func (s *Service) removeContainer(ctx context.Context, c *container) error {
	cancelStart(c)
	c.Lifecycle.Lock()
	defer c.Lifecycle.Unlock()
	if c.Deleted() {
		return nil
	}
	// A removal is forced, also for a VM whose shim has not answered since
	// the restart (adopt.go).
	if err := s.killUnadopted(c); err != nil {
		return err
	}
	// Stops a running VM, or ends a created container's staged shim; a shim
	// that does not answer is killed.
	if err := s.stopLocked(ctx, c, 0); err != nil {
		if !c.Status().State.Live() {
			return err
		}
		if err := s.killStuck(c); err != nil {
			return err
		}
	}
	st := c.Status()
	if st.State != store.ContainerRemoving {
		if err := c.Update(func(cur containerStatus) (containerStatus, error) {
			if err := cur.State.Check(store.ContainerRemoving); err != nil {
				return cur, err
			}
			cur.State = store.ContainerRemoving
			return cur, nil
		}); err != nil {
			return err
		}
	}
	// Everything of the VM goes before the record: the removal is retried
	// (by kubelet, or the next daemon) until nothing is left.
	if err := s.vms.Cleanup(c.ID(), c.Meta().Cgroup); err != nil {
		return fmt.Errorf("remove container %s: %w", c.ID(), err)
	}
	if err := s.containers.Delete(c); err != nil {
		return err
	}
	s.reroute(c.Meta().SandboxID) // its ports are no longer routed
	s.emit(c, runtimeapi.ContainerEventType_CONTAINER_DELETED_EVENT)
	s.ctrLog(c).Info("unikernel container removed")
	return nil
}

// killStuck ends the VM of a container whose shim does not answer: the
// shim process (pinned when it was connected) is killed and QEMU dies with
// it. The caller holds c.Lifecycle.
func (s *Service) killStuck(c *container) error {
	vm := c.Status().vm
	if vm == nil {
		return nil
	}
	log := logrus.WithFields(logrus.Fields{"sandbox": c.Meta().SandboxID, "container": c.ID()})
	if err := vm.KillShim(); err != nil {
		return errorf(errdefs.ErrInternal, "remove container %s: its unilet-shim does not answer and cannot be killed: %v", c.ID(), err)
	}
	select {
	case <-vm.Done():
	case <-time.After(manager.CallTimeout):
		return errorf(errdefs.ErrDeadlineExceeded, "remove container %s: its killed unilet-shim was not seen to end within %s", c.ID(), manager.CallTimeout)
	}
	log.Warn("the VM's unilet-shim did not answer; killed it to remove the container")
	ex := vm.Exit()
	if ex.Reason == "" {
		ex = vmm.ExitStatus{Code: 137, Reason: vmm.ReasonKilled, FinishedAt: time.Now()}
	}
	s.finishExit(c, vm, ex)
	return nil
}
