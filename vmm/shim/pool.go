package shim

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/unilet-dev/unilet/vmm"
	"github.com/unilet-dev/unilet/vmm/shim/api"
)

// Pool keeps idle, pre-forked shims (`unilet-shim --pool-dir`), so starting a
// VM does not wait for a shim process to exec and initialise (8–10 ms under
// TCG here, docs/benchmarks.md). A VM start takes one (Adopt) and the pool
// refills in the background once the node has been quiet for a while (see
// RefillQuiet); with none ready, a shim is spawned as before.
type Pool struct {
	binary, dir string
	size        int
	quiet       time.Duration
	mu          sync.Mutex
	idle        []*idleShim
	seq         int
	closed      bool
	lastTake    time.Time
	refill      chan struct{}
	done        chan struct{}
}

// RefillQuiet is the default for how long after the last Take the pool waits before it
// spawns replacements, unless it ran empty. Spawning a shim costs about
// 10 ms of CPU; done at once it competed with the QEMU that had just been
// started (and, on a 2-core TCG node, delayed that VM's first console line
// by as much). A pod start takes its shim in RunPodSandbox and boots the VM
// well within this window.
const RefillQuiet = 300 * time.Millisecond

type idleShim struct {
	dir    string
	pid    int
	exited chan error
}

// NewPool starts a pool of size idle shims under dir that refills once no
// shim was taken for quiet (0: at once). Idle shims an earlier daemon left
// there are shut down first.
func NewPool(binary, dir string, size int, quiet time.Duration) (*Pool, error) {
	if ents, err := os.ReadDir(dir); err == nil {
		for _, e := range ents {
			sub := filepath.Join(dir, e.Name())
			if c, err := Connect(sub); err == nil {
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				_, _ = c.Shutdown(ctx, &api.ShutdownRequest{})
				cancel()
				c.Close()
			}
			_ = os.RemoveAll(sub)
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	p := &Pool{binary: binary, dir: dir, size: size, quiet: quiet, refill: make(chan struct{}, 1), done: make(chan struct{})}
	go p.filler()
	p.kick()
	return p, nil
}

func (p *Pool) kick() {
	select {
	case p.refill <- struct{}{}:
	default:
	}
}

func (p *Pool) filler() {
	for {
		select {
		case <-p.done:
			return
		case <-p.refill:
		}
		for {
			if !p.waitQuiet() { // before each spawn: a start may have come meanwhile
				return
			}
			p.mu.Lock()
			full := p.closed || len(p.idle) >= p.size
			p.mu.Unlock()
			if full {
				break
			}
			s, err := p.spawn()
			if err != nil {
				logrus.WithError(err).Warn("pre-forking a unilet-shim failed; VMs start with a fresh shim")
				break
			}
			p.mu.Lock()
			if p.closed {
				p.mu.Unlock()
				p.discard(s)
				return
			}
			p.idle = append(p.idle, s)
			p.mu.Unlock()
		}
	}
}

// waitQuiet returns once no shim was taken for p.quiet, or at once when the
// pool ran empty (the next start would otherwise spawn its own); false when
// the pool closed meanwhile.
func (p *Pool) waitQuiet() bool {
	for {
		p.mu.Lock()
		wait := time.Until(p.lastTake.Add(p.quiet))
		empty := len(p.idle) == 0
		p.mu.Unlock()
		if wait <= 0 || empty {
			return true
		}
		t := time.NewTimer(wait)
		select {
		case <-p.done:
			t.Stop()
			return false
		case <-p.refill: // taken again: look anew
		case <-t.C:
		}
		t.Stop()
	}
}

func (p *Pool) spawn() (*idleShim, error) {
	p.mu.Lock()
	p.seq++
	// Named by this daemon's PID and a sequence number: a shim an earlier
	// daemon was still spawning when it died can never take over (and steal
	// the socket of) a directory of this pool.
	dir := filepath.Join(p.dir, strconv.Itoa(os.Getpid())+"-"+strconv.Itoa(p.seq))
	p.mu.Unlock()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	logf, err := os.OpenFile(filepath.Join(dir, LogFile), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(p.binary, "--pool-dir", dir)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	s := &idleShim{dir: dir, pid: cmd.Process.Pid, exited: make(chan error, 1)}
	go func() { s.exited <- cmd.Wait() }()
	for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(2 * time.Millisecond) {
		if c, err := Connect(dir); err == nil {
			_, err := c.State(context.Background(), &api.StateRequest{})
			c.Close()
			if err == nil {
				return s, nil
			}
		}
		select {
		case err := <-s.exited:
			return nil, fmt.Errorf("pool shim exited: %v", err)
		default:
		}
	}
	p.discard(s)
	return nil, fmt.Errorf("pool shim did not serve %s", dir)
}

// discard ends an idle shim and removes its directory.
func (p *Pool) discard(s *idleShim) {
	_ = syscall.Kill(s.pid, syscall.SIGKILL)
	select {
	case <-s.exited:
	case <-time.After(5 * time.Second):
	}
	_ = os.RemoveAll(s.dir)
}

func (p *Pool) take() *idleShim {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.idle) == 0 {
		return nil
	}
	s := p.idle[0]
	p.idle = p.idle[1:]
	p.lastTake = time.Now()
	return s
}

// Idle reports how many shims are ready.
func (p *Pool) Idle() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.idle)
}

// Idle is a pre-forked shim taken out of the pool: it can be placed (for
// example in a cgroup) ahead of time and started later.
type Idle struct {
	s         *idleShim
	p         *Pool
	onRelease func()
	once      sync.Once
}

// OnRelease sets f to run once when the shim is started or discarded.
func (i *Idle) OnRelease(f func()) *Idle {
	i.onRelease = f
	return i
}

func (i *Idle) release() {
	i.once.Do(func() {
		if i.onRelease != nil {
			i.onRelease()
		}
	})
}

// Take returns an idle shim, or nil when none is ready; the pool refills.
func (p *Pool) Take() *Idle {
	s := p.take()
	p.kick()
	if s == nil {
		return nil
	}
	return &Idle{s: s, p: p}
}

// Pid is the shim's process ID.
func (i *Idle) Pid() int { return i.s.pid }

// Discard ends the idle shim (nil: nothing to do).
func (i *Idle) Discard() {
	if i == nil {
		return
	}
	i.release()
	i.p.discard(i.s)
}

// AdoptTimeout bounds handing a VM directory to an idle shim (a local
// call answered in about a millisecond): a shim stuck meanwhile is
// discarded and a fresh one started, with the start's own deadline.
const AdoptTimeout = 2 * time.Second

// errAdopt marks a shim that could not be adopted (the caller may spawn one).
type errAdopt struct{ error }

// IsAdoptError reports whether Start failed before the VM was started
// because the idle shim could not be adopted (spawning another is safe).
func IsAdoptError(err error) bool {
	_, ok := err.(errAdopt)
	return ok
}

// Start adopts the shim for the VM directory dir, runs beforeStart (may be
// nil) with its pid and boots the VM of spec.
func (i *Idle) Start(ctx context.Context, dir string, spec vmm.VMSpec, beforeStart func(pid int) error) (*Client, error) {
	i.release()
	t0 := time.Now()
	s := i.s
	if err := writeSpec(dir, spec); err != nil {
		i.Discard()
		return nil, err
	}
	pc, err := Connect(s.dir)
	if err == nil {
		actx, cancel := context.WithTimeout(ctx, AdoptTimeout)
		_, err = pc.Adopt(actx, &api.AdoptRequest{Dir: dir})
		cancel()
		pc.Close()
	}
	if err != nil {
		i.Discard()
		return nil, errAdopt{fmt.Errorf("adopt an idle unilet-shim: %w", err)}
	}
	kill := func() { _ = syscall.Kill(s.pid, syscall.SIGKILL) }
	if beforeStart != nil {
		if err := beforeStart(s.pid); err != nil {
			kill()
			<-s.exited
			return nil, err
		}
	}
	c, err := Connect(dir)
	if err != nil {
		kill()
		<-s.exited
		return nil, fmt.Errorf("connect to the adopted shim: %w", err)
	}
	_ = os.RemoveAll(s.dir) // its log now goes to the VM directory
	c.Spawn = time.Since(t0)
	return startVM(ctx, c, dir, s.exited, kill, t0)
}

// Launch starts the VM of spec in dir like the package's Launch, with an idle
// shim when one is ready.
func (p *Pool) Launch(ctx context.Context, dir string, spec vmm.VMSpec, beforeStart func(pid int) error) (*Client, error) {
	if i := p.Take(); i != nil {
		c, err := i.Start(ctx, dir, spec, beforeStart)
		if _, adopt := err.(errAdopt); !adopt {
			return c, err
		}
		logrus.WithError(err).Warn("starting with a fresh unilet-shim")
	}
	return Launch(ctx, p.binary, dir, spec, beforeStart)
}

// Close ends the idle shims (shims serving VMs go on).
func (p *Pool) Close() {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.closed = true
	idle := p.idle
	p.idle = nil
	p.mu.Unlock()
	close(p.done)
	for _, s := range idle {
		if c, err := Connect(s.dir); err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			_, _ = c.Shutdown(ctx, &api.ShutdownRequest{})
			cancel()
			c.Close()
		}
		select {
		case <-s.exited:
		case <-time.After(3 * time.Second):
			_ = syscall.Kill(s.pid, syscall.SIGKILL)
		}
		_ = os.RemoveAll(s.dir)
	}
}
