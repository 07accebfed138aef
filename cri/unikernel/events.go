package unikernel

import (
	"context"
	"sync"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// eventBuffer is how many events a slow subscriber may fall behind before
// it misses some (kubelet's evented PLEG relists then).
const eventBuffer = 256

// events fans container lifecycle events out to GetContainerEvents
// subscribers (kubelet's evented PLEG).
type events struct {
	mu   sync.Mutex
	subs map[chan *runtimeapi.ContainerEventResponse]struct{}
}

// Events subscribes to the unikernel side's container events until ctx ends.
func (s *Service) Events(ctx context.Context) <-chan *runtimeapi.ContainerEventResponse {
	ch := make(chan *runtimeapi.ContainerEventResponse, eventBuffer)
	s.events.mu.Lock()
	if s.events.subs == nil {
		s.events.subs = map[chan *runtimeapi.ContainerEventResponse]struct{}{}
	}
	s.events.subs[ch] = struct{}{}
	s.events.mu.Unlock()
	go func() {
		<-ctx.Done()
		s.events.mu.Lock()
		delete(s.events.subs, ch)
		s.events.mu.Unlock()
	}()
	return ch
}

// emit publishes an event of container c (with its pod's and the pod's
// containers' statuses, as CRI asks); subscribers that lag lose it.
func (s *Service) emit(c *container, typ runtimeapi.ContainerEventType) {
	s.events.mu.Lock()
	n := len(s.events.subs)
	s.events.mu.Unlock()
	if n == 0 {
		return
	}
	ev := &runtimeapi.ContainerEventResponse{ContainerId: c.ID(), ContainerEventType: typ, CreatedAt: time.Now().UnixNano()}
	ctx := context.Background()
	if st, err := s.PodSandboxStatus(ctx, &runtimeapi.PodSandboxStatusRequest{PodSandboxId: c.Meta().SandboxID}); err == nil {
		ev.PodSandboxStatus = st.GetStatus()
	}
	for _, other := range s.containersOf(c.Meta().SandboxID) {
		if st, err := s.ContainerStatus(ctx, &runtimeapi.ContainerStatusRequest{ContainerId: other.ID()}); err == nil {
			ev.ContainersStatuses = append(ev.ContainersStatuses, st.GetStatus())
		}
	}
	s.events.mu.Lock()
	defer s.events.mu.Unlock()
	for ch := range s.events.subs {
		select {
		case ch <- ev:
		default:
		}
	}
}
