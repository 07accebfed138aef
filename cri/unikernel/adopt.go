package unikernel

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/cri/errdefs"
	"github.com/unilet-dev/unilet/cri/store"
	"github.com/unilet-dev/unilet/pkg/metrics"
	"github.com/unilet-dev/unilet/vmm"
	"github.com/unilet-dev/unilet/vmm/manager"
)

// After a restart the daemon adopts the VMs an earlier one left: each
// container whose VM may run is reconnected to its shim in the background,
// all in parallel; the daemon serves once they answered or AdoptWait
// passed, whichever is first. A shim that does not answer (stopped,
// overloaded) is never taken for lost: its VM is left running, its
// container reports CONTAINER_UNKNOWN (reason ReasonShimNotAnswering) and it
// is adopted whenever it answers. A stop meanwhile fails (Unavailable); a
// removal is forced: the shim, proven unilet's, is killed and QEMU with it.

// AdoptWait is how long a starting daemon waits for its shims before it
// serves; the ones that have not answered by then are adopted later.
const AdoptWait = 2 * time.Second

// adoptRetry is the pause between attempts to reach a shim that did not answer.
const adoptRetry = time.Second

// ReasonShimNotAnswering is the reason of a container whose shim has not
// answered since the daemon restarted.
const ReasonShimNotAnswering = "ShimNotAnswering"

// adoption is a container waiting for its shim to answer.
type adoption struct {
	since time.Time
	done  chan struct{} // closed once settled (adopted, found ended, or removed)
}

// adoptions are the containers of this daemon still being adopted.
type adoptions struct {
	mu sync.Mutex
	m  map[string]*adoption
}

func (a *adoptions) begin(id string) *adoption {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.m == nil {
		a.m = map[string]*adoption{}
	}
	ad := &adoption{since: time.Now(), done: make(chan struct{})}
	a.m[id] = ad
	return ad
}

// get returns the adoption of id in progress, or nil.
func (a *adoptions) get(id string) *adoption {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.m[id]
}

// end settles the adoption of id; it reports whether one was in progress.
func (a *adoptions) end(id string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	ad, ok := a.m[id]
	if ok {
		delete(a.m, id)
		close(ad.done)
	}
	return ok
}

// adopt reconnects container c to its shim, retrying while the shim does
// not answer, then reconciles it (reconcileContainer) unless a removal
// settled it meanwhile.
func (s *Service) adopt(c *container) {
	log := logrus.WithFields(logrus.Fields{"sandbox": c.Meta().SandboxID, "container": c.ID()})
	warned := false
	for {
		ctx, cancel := context.WithTimeout(context.Background(), manager.ReconnectTimeout)
		vm, err := s.vms.Reconnect(ctx, c.ID())
		cancel()
		if errors.Is(err, manager.ErrShimNotAnswering) {
			if !warned {
				metrics.ShimReconnects.WithLabelValues("not_answering").Inc()
				log.WithError(err).Warn("the VM's unilet-shim does not answer since unilet restarted; the VM is left running " +
					"and adopted once its shim answers (the container reports CONTAINER_UNKNOWN until then)")
				warned = true
			}
			if s.adopting.get(c.ID()) == nil {
				return // removed meanwhile
			}
			time.Sleep(adoptRetry)
			continue
		}
		c.Lifecycle.Lock()
		if s.adopting.get(c.ID()) == nil || c.Deleted() {
			c.Lifecycle.Unlock()
			if vm != nil {
				_ = vm.Close()
			}
			return
		}
		s.reconcileContainer(c, vm, err)
		s.adopting.end(c.ID())
		if err == nil {
			metrics.ShimReconnects.WithLabelValues("adopted").Inc()
		}
		c.Lifecycle.Unlock()
		if warned {
			log.Info("the VM's unilet-shim answered again; adopted")
		}
		return
	}
}

// killUnadopted ends the VM of a container whose shim has not answered
// since the restart, for a removal: the shim serving the VM's directory is
// killed through a pidfd once proven to be a unilet-shim (QEMU dies with
// it). The caller holds c.Lifecycle.
func (s *Service) killUnadopted(c *container) error {
	if s.adopting.get(c.ID()) == nil {
		return nil
	}
	log := logrus.WithFields(logrus.Fields{"sandbox": c.Meta().SandboxID, "container": c.ID()})
	if err := s.vms.KillUnanswering(c.ID()); err != nil {
		return errorf(errdefs.ErrInternal, "remove container %s: its unilet-shim does not answer and cannot be killed: %v", c.ID(), err)
	}
	s.adopting.end(c.ID())
	log.Warn("the VM's unilet-shim had not answered since unilet restarted; killed it to remove the container")
	if !c.Status().State.Live() {
		return nil
	}
	return c.Update(func(cur containerStatus) (containerStatus, error) {
		cur.State, cur.vm = store.ContainerExited, nil
		cur.Exit = vmm.ExitStatus{Code: 137, Reason: vmm.ReasonKilled, FinishedAt: time.Now(),
			Message: "the VM's unilet-shim did not answer after unilet restarted; it was killed to remove the container"}
		return cur, nil
	})
}

// errNotAdopted fails a verb that needs the shim of a container not yet adopted.
func errNotAdopted(id string, ad *adoption) error {
	return errorf(errdefs.ErrUnavailable, "container %s: its unilet-shim has not answered since unilet restarted (%s ago); "+
		"the VM is left running and adopted once the shim answers. Retry, or remove the container (a removal kills the shim)",
		id, time.Since(ad.since).Round(time.Second))
}

// reason is the CRI state, reason and message of a container still being adopted.
func (ad *adoption) reason() (runtimeapi.ContainerState, string, string) {
	return runtimeapi.ContainerState_CONTAINER_UNKNOWN, ReasonShimNotAnswering,
		"unilet restarted and the VM's unilet-shim has not answered since " + ad.since.Format(time.RFC3339) +
			"; the VM is left running and adopted once its shim answers"
}
