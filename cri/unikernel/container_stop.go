package unikernel

import (
	"context"
	"errors"
	"time"

	"github.com/sirupsen/logrus"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/cri/errdefs"
	"github.com/unilet-dev/unilet/cri/store"
	"github.com/unilet-dev/unilet/vmm"
	"github.com/unilet-dev/unilet/vmm/manager"
)

// StopContainer powers the VM down, killing it after the timeout. A start
// in flight is cancelled first. Unknown IDs succeed. A shim that does not
// answer fails the call with DeadlineExceeded and leaves the VM RUNNING.
func (s *Service) StopContainer(ctx context.Context, r *runtimeapi.StopContainerRequest) (*runtimeapi.StopContainerResponse, error) {
	c, err := s.getContainer(r.GetContainerId())
	if errors.Is(err, store.ErrNotFound) {
		return &runtimeapi.StopContainerResponse{}, nil
	}
	if err != nil {
		return nil, err
	}
	if err := s.stopContainer(ctx, c, time.Duration(r.GetTimeout())*time.Second); err != nil {
		return nil, err
	}
	return &runtimeapi.StopContainerResponse{}, nil
}

// cancelStart cancels a start in flight (it then ends as StartError).
func cancelStart(c *container) {
	if cancel := c.Status().cancelStart; cancel != nil {
		cancel()
	}
}

func (s *Service) stopContainer(ctx context.Context, c *container, timeout time.Duration) error {
	cancelStart(c)
	c.Lifecycle.Lock()
	defer c.Lifecycle.Unlock()
	if ad := s.adopting.get(c.ID()); ad != nil {
		return errNotAdopted(c.ID(), ad)
	}
	return s.stopLocked(ctx, c, timeout)
}

// stopLocked stops c; the caller holds c.Lifecycle.
func (s *Service) stopLocked(ctx context.Context, c *container, timeout time.Duration) error {
	st := c.Status()
	switch st.State {
	case store.ContainerCreated:
		err := c.Update(func(cur containerStatus) (containerStatus, error) {
			if err := cur.State.Check(store.ContainerExited); err != nil {
				return cur, err
			}
			cur.State, cur.staged = store.ContainerExited, nil
			cur.Exit = vmm.ExitStatus{Reason: "NeverStarted", FinishedAt: time.Now()}
			return cur, nil
		})
		if err == nil {
			s.emit(c, runtimeapi.ContainerEventType_CONTAINER_STOPPED_EVENT)
			st.staged.Drop()
			if err := s.vms.Cleanup(c.ID(), c.Meta().Cgroup); err != nil {
				logrus.WithError(err).WithField("container", c.ID()).Warn("clean up a container that never started; RemoveContainer retries")
			}
		}
		return err
	case store.ContainerRunning:
	default:
		return nil
	}
	vm := st.vm
	if vm == nil { // recorded running, but no VM was found for it (it could not be reconnected)
		return c.Update(func(cur containerStatus) (containerStatus, error) {
			cur.State = store.ContainerExited
			cur.Exit = vmm.ExitStatus{Code: 255, Reason: ReasonVMLost, FinishedAt: time.Now(), Message: "no VM was found for this container"}
			return cur, nil
		})
	}
	if err := c.Update(func(cur containerStatus) (containerStatus, error) {
		if err := cur.State.Check(store.ContainerStopping); err != nil {
			return cur, err
		}
		cur.State = store.ContainerStopping
		return cur, nil
	}); err != nil {
		return err
	}
	sctx, cancel := context.WithTimeout(ctx, timeout+manager.StopGrace)
	ex, err := vm.Stop(sctx, timeout)
	cancel()
	if err != nil {
		// The shim did not answer: the VM may still run, so say so.
		_ = c.Update(func(cur containerStatus) (containerStatus, error) {
			if cur.State == store.ContainerStopping {
				cur.State = store.ContainerRunning
			}
			return cur, nil
		})
		code := errdefs.ErrUnknown
		if errors.Is(err, context.DeadlineExceeded) {
			code = errdefs.ErrDeadlineExceeded
		}
		return errorf(code, "stop container %s: its unilet-shim did not answer within %s (%v); the VM is still reported running",
			c.ID(), timeout+manager.StopGrace, err)
	}
	s.finishExit(c, vm, ex)
	s.ctrLog(c).WithFields(logrus.Fields{"exitCode": ex.Code, "reason": ex.Reason}).Info("unikernel VM stopped")
	return nil
}
