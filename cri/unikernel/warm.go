package unikernel

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/unilet-dev/unilet/pkg/netns"
	"github.com/unilet-dev/unilet/pkg/vmnet"
	"github.com/unilet-dev/unilet/vmm"
	"github.com/unilet-dev/unilet/vmm/manager"
	"github.com/unilet-dev/unilet/vmm/templates"
)

// warmPool keeps Config.TemplateWarm warm clones of every template ready
// (Kata's VM cache, per template): each a QEMU that started with -incoming,
// loaded its template's device state and waits paused, its tap in a
// network namespace of its own. A templated pod's RunPodSandbox takes one:
// its namespace becomes the pod's and its processes move into the pod's
// staging cgroup while CNI runs, and StartContainer only runs it. The pool
// refills once starts have been quiet for warmQuiet, off the path of the
// VM just started, and drops clones whose template changed or went.
type warmPool struct {
	s        *Service
	want     int
	mu       sync.Mutex
	ready    map[string][]*warmClone // by template name
	failed   map[string]warmFailure  // by template name: the last clone that could not be made
	lastTake time.Time
	closed   bool
	started  bool // the filler runs (Load started it)
	kick     chan struct{}
	done     chan struct{}
}

// warmClone is one ready clone.
type warmClone struct {
	*manager.Warm
	template, digest string // the template (state digest) it was made from
	netns            string // its own namespace, holding its tap, until a pod takes it
	// state is the template's state file as it was verified for the clone:
	// one changed since is not trusted, and its clones are not used.
	state os.FileInfo
}

// warmFailure is a template whose clone could not be made, and when.
type warmFailure struct {
	digest string
	at     time.Time
}

// warmQuiet: the pool refills once no warm clone was taken for this long.
const warmQuiet = 300 * time.Millisecond

// warmRetry is how long the pool waits before it tries again to make a
// clone of a template whose last one could not be made.
const warmRetry = time.Minute

// warmCheck is how often the pool looks for clones that died.
const warmCheck = 5 * time.Second

func newWarmPool(s *Service, want int) *warmPool {
	return &warmPool{s: s, want: want, ready: map[string][]*warmClone{}, failed: map[string]warmFailure{},
		kick: make(chan struct{}, 1), done: make(chan struct{})}
}

// start runs the filler (after Load: an earlier daemon's clones were swept).
func (p *warmPool) start() {
	p.mu.Lock()
	p.started = true
	p.mu.Unlock()
	go p.fill()
	p.poke()
}

func (p *warmPool) poke() {
	if p == nil {
		return
	}
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

func (p *warmPool) fill() {
	defer close(p.done)
	for {
		select {
		case <-p.kick:
		case <-time.After(warmCheck):
		}
		for {
			p.mu.Lock()
			closed, wait := p.closed, warmQuiet-time.Since(p.lastTake)
			p.mu.Unlock()
			if closed {
				return
			}
			if wait <= 0 {
				break
			}
			time.Sleep(wait)
		}
		p.reconcile()
	}
}

// reconcile drops clones whose template changed, went or died, and makes
// the ones missing, one at a time.
func (p *warmPool) reconcile() {
	ts, err := p.s.cfg.Templates.List()
	if err != nil {
		return
	}
	current := map[string]templates.Template{}
	for _, t := range ts {
		if t.GuestAddr == p.s.cfg.GuestNet.Addr.String() && t.Machine.Accel == p.s.cfg.Accel {
			current[t.Name] = t
		}
	}
	var drop []*warmClone
	p.mu.Lock()
	for name, cs := range p.ready {
		var keep []*warmClone
		for _, c := range cs {
			if t, ok := current[name]; ok && t.StateDigest == c.digest && c.Alive() && c.stateKept(p.s.cfg.Templates) {
				keep = append(keep, c)
			} else {
				drop = append(drop, c)
			}
		}
		p.ready[name] = keep
		if len(keep) == 0 {
			delete(p.ready, name)
		}
	}
	p.mu.Unlock()
	for _, c := range drop {
		c.discard()
	}
	for _, t := range current {
		for {
			p.mu.Lock()
			n, closed, f := len(p.ready[t.Name]), p.closed, p.failed[t.Name]
			p.mu.Unlock()
			if closed || n >= p.want || f.digest == t.StateDigest && time.Since(f.at) < warmRetry {
				break
			}
			c, err := p.make(t)
			if err != nil {
				log := logrus.WithError(err).WithField("template", t.Name)
				if f.digest == t.StateDigest {
					log.Debug("make a warm clone (again)")
				} else {
					log.Warn("make a warm clone; its pods restore the template at start instead (retried every minute)")
				}
				p.mu.Lock()
				p.failed[t.Name] = warmFailure{digest: t.StateDigest, at: time.Now()}
				p.mu.Unlock()
				break
			}
			p.mu.Lock()
			if p.closed {
				p.mu.Unlock()
				c.discard()
				return
			}
			p.ready[t.Name] = append(p.ready[t.Name], c)
			delete(p.failed, t.Name)
			p.mu.Unlock()
		}
	}
}

// make starts a warm clone of t.
func (p *warmPool) make(t templates.Template) (*warmClone, error) {
	s := p.s
	rs, err := s.cfg.Templates.Prepare(t)
	if err != nil {
		return nil, err
	}
	rs.Hold = true
	state, err := os.Stat(rs.State) // Prepare verified it
	if err != nil {
		return nil, err
	}
	id := newID()
	path, err := netns.Create(s.cfg.NetNSDir, warmNetNSPrefix+id[:12])
	if err != nil {
		return nil, err
	}
	if err := vmnet.SetupGuestTap(path, vmnet.TapName(0), s.cfg.GuestNet); err != nil {
		_ = netns.Remove(path)
		return nil, err
	}
	machine := t.Machine
	machine.Name = "warm_" + t.Name
	machine.NICs = []vmm.NIC{{Tap: vmnet.TapName(0), NetNS: path, MAC: s.cfg.GuestNet.MAC}}
	machine.RAM, machine.Incoming = &vmm.RAMBacking{}, true
	ctx, cancel := context.WithTimeout(context.Background(), manager.LaunchTimeout)
	defer cancel()
	w, err := s.vms.StartWarm(ctx, manager.StartSpec{ID: id, Machine: machine, Restore: rs})
	if err != nil {
		_ = netns.Remove(path)
		return nil, err
	}
	logrus.WithFields(logrus.Fields{"template": t.Name, "container": id}).Debug("warm clone ready")
	return &warmClone{Warm: w, template: t.Name, digest: t.StateDigest, netns: path, state: state}, nil
}

// warmNetNSPrefix names warm clones' own network namespaces.
const warmNetNSPrefix = "unilet-warm-"

// take returns a ready clone of template name as it is now, or nil.
func (p *warmPool) take(name string) *warmClone {
	if p == nil {
		return nil
	}
	t, err := p.s.cfg.Templates.Get(name)
	if err != nil {
		return nil
	}
	p.mu.Lock()
	defer p.poke()
	defer p.mu.Unlock()
	p.lastTake = time.Now()
	cs := p.ready[name]
	for len(cs) > 0 {
		c := cs[0]
		cs = cs[1:]
		if c.digest == t.StateDigest && c.Alive() && c.stateKept(p.s.cfg.Templates) {
			p.ready[name] = cs
			return c
		}
		go c.discard()
	}
	p.ready[name] = cs
	return nil
}

// count is how many clones of template name are ready.
func (p *warmPool) count(name string) int {
	if p == nil {
		return 0
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.ready[name])
}

// close discards every ready clone and stops the filler.
func (p *warmPool) close() {
	if p == nil {
		return
	}
	p.mu.Lock()
	p.closed = true
	all, started := p.ready, p.started
	p.ready = map[string][]*warmClone{}
	p.mu.Unlock()
	if started {
		p.poke()
		<-p.done
	}
	for _, cs := range all {
		for _, c := range cs {
			c.discard()
		}
	}
}

// stateKept reports whether the template's state file is still the one
// verified when the clone was made (same size and modification time).
func (c *warmClone) stateKept(ts *templates.Store) bool {
	st, err := os.Stat(filepath.Join(ts.Dir(c.template), templates.StateFile))
	return err == nil && st.Size() == c.state.Size() && st.ModTime().Equal(c.state.ModTime()) && os.SameFile(st, c.state)
}

// discard ends a clone and removes its namespace.
func (c *warmClone) discard() {
	c.Discard()
	_ = netns.Remove(c.netns)
}

// giveNetNS makes the clone's namespace, its tap inside, the pod's: bound
// at dir/name.
func (c *warmClone) giveNetNS(dir, name string) error {
	if _, err := netns.Rename(c.netns, dir, name); err != nil {
		return fmt.Errorf("give the warm clone's network namespace to the pod: %w", err)
	}
	return nil
}
