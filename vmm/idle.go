package vmm

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/unilet-dev/unilet/pkg/netns"
	"github.com/unilet-dev/unilet/pkg/vmnet"
)

// Scale-to-zero and autostart (Kraftlet's scale_to_zero.* and autostart):
// the supervisor suspends a VM that saw no network traffic (and, with
// IdleCPU, used no CPU) for Cooldown — QMP stop: its vCPUs stop, it uses no
// host CPU, its memory stays — and resumes it (QMP cont) when a packet for
// is sent to its tap (vmnet.Waker) or input reaches its console. Packets
// that arrive while it is suspended wait — in the tap's queue, the first
// in QEMU's own — and are delivered on resume: none is lost. A VM started with
// Paused waits the same way before its guest runs at all.

// IdleSpec is a VM's scale-to-zero and autostart settings.
type IdleSpec struct {
	// Cooldown without traffic after which the VM is suspended (0: never).
	Cooldown time.Duration `json:",omitempty"`
	// IdleCPU also requires the guest to have used (almost) no CPU during
	// the cooldown (policy "idle").
	IdleCPU bool `json:",omitempty"`
	// Paused starts the VM suspended: the guest first runs on the first
	// packet or console input (autostart false).
	Paused bool `json:",omitempty"`
}

// idleCPUShare is the CPU use (of one core) below which a guest counts as idle.
const idleCPUShare = 0.01

// idleState is the scale-to-zero state of a VM.
type idleState struct {
	spec  IdleSpec
	waker *vmnet.Waker // tells of packets for the suspended VM (nil: no NIC)
	dev   *os.File     // /proc/net/dev opened inside the pod's namespace
	name  string       // the tap's name there

	mu        sync.Mutex
	suspended bool
	since     time.Time // when suspended
	wakes     int
	wake      chan struct{} // poked to resume (console input)
}

// Suspended reports whether the VM is suspended by scale-to-zero (or not
// yet started, with autostart off), and since when.
func (v *VM) Suspended() (bool, time.Time) {
	s := v.idle.Load()
	if s == nil {
		return false, time.Time{}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.suspended, s.since
}

// Wakes is how many times the VM was resumed by scale-to-zero.
func (v *VM) Wakes() int {
	s := v.idle.Load()
	if s == nil {
		return 0
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.wakes
}

// prepareIdle opens what watching the VM needs, inside its pod's network
// namespace: the wake rule's NFLOG socket (armed at once for a VM that
// starts suspended) and the namespace's /proc/net/dev.
func prepareIdle(spec VMSpec) (*idleState, error) {
	if spec.Idle == nil || (spec.Idle.Cooldown <= 0 && !spec.Idle.Paused) {
		return nil, nil
	}
	st := &idleState{spec: *spec.Idle, wake: make(chan struct{}, 1)}
	if st.spec.Paused {
		st.suspended, st.since = true, time.Now()
	}
	if len(spec.Machine.NICs) == 0 {
		return st, nil
	}
	nic := spec.Machine.NICs[0]
	st.name = nic.Tap
	open := func() (err error) {
		st.dev, err = os.Open("/proc/thread-self/net/dev") // bound to this thread's namespace for good
		return err
	}
	var err error
	if nic.NetNS != "" {
		err = netns.Do(nic.NetNS, open)
	} else {
		err = open()
	}
	if err == nil && nic.NetNS != "" {
		st.waker, err = vmnet.NewWaker(nic.NetNS, nic.Tap)
	}
	if err == nil && st.waker != nil && st.spec.Paused {
		err = st.waker.Arm()
	}
	if err != nil {
		st.close()
		return nil, fmt.Errorf("watch the VM's traffic: %w", err)
	}
	return st, nil
}

func (s *idleState) close() {
	if s.waker != nil {
		s.waker.Close()
	}
	if s.dev != nil {
		s.dev.Close()
	}
}

// traffic reads the tap's received and sent byte counters.
func (s *idleState) traffic() (uint64, error) {
	if s.dev == nil {
		return 0, nil
	}
	b := make([]byte, 16<<10)
	n, err := s.dev.ReadAt(b, 0)
	if err != nil && n == 0 {
		return 0, err
	}
	return tapBytes(b[:n], s.name)
}

// tapBytes parses /proc/net/dev for interface name's received plus sent bytes.
func tapBytes(b []byte, name string) (uint64, error) {
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		iface, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok || strings.TrimSpace(iface) != name {
			continue
		}
		f := strings.Fields(rest)
		if len(f) < 9 {
			break
		}
		rx, err1 := strconv.ParseUint(f[0], 10, 64)
		tx, err2 := strconv.ParseUint(f[8], 10, 64)
		if err1 != nil || err2 != nil {
			break
		}
		return rx + tx, nil
	}
	return 0, fmt.Errorf("interface %s not in /proc/net/dev", name)
}

// pokeIdle resumes a suspended VM (console input).
func (v *VM) pokeIdle() {
	s := v.idle.Load()
	if s == nil {
		return
	}
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// watchIdle suspends and resumes the VM until it ends.
func (v *VM) watchIdle() {
	s := v.idle.Load()
	defer s.close()
	log := logrus.WithField("vm", v.spec.Machine.Name)
	if s.spec.Paused {
		if !v.waitWake() {
			return
		}
		if err := v.resumeIdle(); err != nil {
			log.WithError(err).Warn("start a VM with autostart off")
		}
	}
	if s.spec.Cooldown <= 0 {
		return
	}
	period := min(max(s.spec.Cooldown/4, 10*time.Millisecond), time.Second)
	lastBytes, _ := s.traffic()
	lastCPU := v.cpuNanos()
	lastActive := time.Now()
	for {
		select {
		case <-v.done:
			return
		case <-s.wake: // input while running: activity
			lastActive = time.Now()
		case <-time.After(period):
		}
		now := time.Now()
		if b, err := s.traffic(); err == nil && b != lastBytes {
			lastBytes, lastActive = b, now
		}
		if s.spec.IdleCPU {
			cpu := v.cpuNanos()
			if float64(cpu-lastCPU) > idleCPUShare*float64(period.Nanoseconds()) {
				lastActive = now
			}
			lastCPU = cpu
		}
		if now.Sub(lastActive) < s.spec.Cooldown {
			continue
		}
		// Armed before the pause: a packet in between wakes it at once
		// (QEMU may have taken it into its own queue, where only a resume
		// delivers it).
		if s.waker != nil {
			if err := s.waker.Arm(); err != nil {
				log.WithError(err).Warn("scale-to-zero: arm the wake rule; the VM stays running")
				lastActive = now
				continue
			}
		}
		if err := v.Pause(); err != nil {
			log.WithError(err).Debug("scale-to-zero: suspend")
			if s.waker != nil {
				_ = s.waker.Disarm()
			}
			lastActive = now
			continue
		}
		s.mu.Lock()
		s.suspended, s.since = true, now
		s.mu.Unlock()
		log.Debug("scale-to-zero: suspended")
		if !v.waitWake() {
			return
		}
		if err := v.resumeIdle(); err != nil {
			log.WithError(err).Warn("scale-to-zero: resume")
		}
		lastBytes, _ = s.traffic()
		lastCPU, lastActive = v.cpuNanos(), time.Now()
	}
}

// waitWake blocks until a packet was sent to the tap or console input
// came; false when the VM ended. It costs no CPU while it waits.
func (v *VM) waitWake() bool {
	s := v.idle.Load()
	var packets <-chan struct{}
	if s.waker != nil {
		packets = s.waker.C()
	}
	select {
	case <-v.done:
		return false
	case <-s.wake:
	case <-packets:
	}
	return true
}

// resumeIdle runs a suspended VM's guest again and disarms the wake rule.
func (v *VM) resumeIdle() error {
	err := v.Resume()
	s := v.idle.Load()
	if s.waker != nil {
		if derr := s.waker.Disarm(); err == nil {
			err = derr
		}
	}
	s.mu.Lock()
	s.suspended = false
	s.wakes++
	s.mu.Unlock()
	return err
}

// cpuNanos is QEMU's CPU time so far (0 if unreadable).
func (v *VM) cpuNanos() uint64 {
	st, err := v.Stats()
	if err != nil {
		return 0
	}
	return st.CPUNanos
}
