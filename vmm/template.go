package vmm

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/unilet-dev/unilet/pkg/crilog"
)

// VM templates (Kata's VM templating with QEMU's x-ignore-shared migration
// capability): a template VM boots with its RAM in a shared memfd
// (RAMBacking.Shared); Snapshot pauses it and writes only its device state
// (a few hundred KiB) while the RAM stays in the memfd, which SaveRAMFile
// then keeps on disk. A clone starts with Machine.Incoming and that RAM
// loaded once into a sealed memfd (LoadRAMFile) that it maps private
// copy-on-write — clones of one template share every page none of them
// wrote, and none can change it — then Restore loads the device state and
// the guest runs on from where the template stopped.

// ramSeals are the seals of a template's RAM as clones see it.
const ramSeals = unix.F_SEAL_SEAL | unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_WRITE

// NewRAMFile returns an empty memfd of size bytes for the guest RAM of a VM
// that becomes a template.
func NewRAMFile(name string, size int64) (*os.File, error) {
	fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, fmt.Errorf("memfd for guest RAM: %w", err)
	}
	f := os.NewFile(uintptr(fd), "memfd:"+name)
	if err := f.Truncate(size); err != nil {
		f.Close()
		return nil, fmt.Errorf("size the guest RAM memfd: %w", err)
	}
	return f, nil
}

// LoadRAMFile reads a template's RAM file (size bytes) into a new memfd,
// leaving pages that are all zeros as holes (no memory), and seals it
// against writes, growth and shrinking. Every byte read is also written to
// sum (a hash; nil: none), so what is verified is what was loaded.
func LoadRAMFile(path string, size int64, sum io.Writer) (*os.File, error) {
	src, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer src.Close()
	if st, err := src.Stat(); err != nil || st.Size() != size || !st.Mode().IsRegular() {
		return nil, fmt.Errorf("template RAM %s: not a regular file of %d bytes", path, size)
	}
	f, err := NewRAMFile("template-ram", size)
	if err != nil {
		return nil, err
	}
	if err := copySparse(f, src, size, sum); err != nil {
		f.Close()
		return nil, fmt.Errorf("load template RAM %s: %w", path, err)
	}
	if _, err := unix.FcntlInt(f.Fd(), unix.F_ADD_SEALS, ramSeals); err != nil {
		f.Close()
		return nil, fmt.Errorf("seal template RAM: %w", err)
	}
	return f, nil
}

// CheckSealed fails unless f is sealed as LoadRAMFile seals: a clone's RAM
// must be a file no clone can write to.
func CheckSealed(f *os.File) error {
	seals, err := unix.FcntlInt(f.Fd(), unix.F_GET_SEALS, 0)
	if err != nil {
		return fmt.Errorf("guest RAM of a clone: not a sealed memfd: %w", err)
	}
	if seals&ramSeals != ramSeals {
		return fmt.Errorf("guest RAM of a clone: memfd seals %#x lack %#x (write, grow, shrink, seal)", seals, ramSeals)
	}
	return nil
}

// SaveRAMFile writes a template VM's RAM (its memfd, size bytes) to a new
// file at path (never an existing one), pages of zeros as holes, synced.
func SaveRAMFile(ram *os.File, path string, size int64) error {
	dst, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	err = copySparse(dst, ram, size, nil)
	if err == nil {
		err = dst.Truncate(size)
	}
	if err == nil {
		err = dst.Sync()
	}
	if cerr := dst.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = os.Remove(path)
	}
	return err
}

// copySparse copies size bytes from src to dst at the same offsets,
// skipping pages that are all zeros (dst is new: they read as zeros); sum
// (if not nil) gets every byte read.
func copySparse(dst io.WriterAt, src io.ReaderAt, size int64, sum io.Writer) error {
	const page = 4096
	buf := make([]byte, 1<<20)
	for off := int64(0); off < size; {
		n := int64(len(buf))
		if size-off < n {
			n = size - off
		}
		if _, err := src.ReadAt(buf[:n], off); err != nil && !(errors.Is(err, io.EOF) && off+n == size) {
			return err
		}
		if sum != nil {
			_, _ = sum.Write(buf[:n])
		}
		for p := int64(0); p < n; p += page {
			end := min(p+page, n)
			if !allZero(buf[p:end]) {
				if _, err := dst.WriteAt(buf[p:end], off+p); err != nil {
					return err
				}
			}
		}
		off += n
	}
	return nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// Deadlines of template operations.
const (
	// SnapshotTimeout bounds writing a template's device state.
	SnapshotTimeout = 30 * time.Second
	// RestoreTimeout bounds loading a clone's device state until it runs.
	RestoreTimeout = 30 * time.Second
)

// setIgnoreShared turns on x-ignore-shared: RAM in shared files is not in
// the migration stream (it stays in the file).
func (v *VM) setIgnoreShared(mon *monitor) error {
	_, err := mon.call("migrate-set-capabilities", map[string]any{
		"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": true}}}, nil, qmpQueryTimeout)
	return err
}

func (v *VM) monitor() (*monitor, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.mon == nil {
		return nil, errors.New("the VM has no QMP monitor")
	}
	return v.mon, nil
}

// Snapshot pauses the guest and writes its device state to state; its RAM
// (RAMBacking.Shared) stays in its RAM file. The VM stays paused; the
// caller ends it.
func (v *VM) Snapshot(state *os.File, timeout time.Duration) error {
	if v.spec.Machine.RAM == nil || !v.spec.Machine.RAM.Shared {
		return errors.New("only a VM started with shared file-backed RAM can become a template")
	}
	mon, err := v.monitor()
	if err != nil {
		return err
	}
	if err := v.setIgnoreShared(mon); err != nil {
		return err
	}
	if _, err := mon.execute("stop", qmpQueryTimeout); err != nil {
		return err
	}
	if err := mon.sendFD("snapshot", state); err != nil {
		return err
	}
	if _, err := mon.call("migrate", map[string]string{"uri": "fd:snapshot"}, nil, qmpQueryTimeout); err != nil {
		return err
	}
	deadline := time.Now().Add(timeout)
	for {
		raw, err := mon.execute("query-migrate", qmpQueryTimeout)
		if err != nil {
			return err
		}
		var st struct {
			Status    string `json:"status"`
			ErrorDesc string `json:"error-desc"`
		}
		if err := json.Unmarshal(raw, &st); err != nil {
			return err
		}
		switch st.Status {
		case "completed":
			return nil
		case "failed", "cancelled":
			return fmt.Errorf("writing the VM state failed: %s %s", st.Status, st.ErrorDesc)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("writing the VM state took longer than %s (status %s)", timeout, st.Status)
		}
		time.Sleep(time.Millisecond)
	}
}

// Restore loads the device state in state into a VM started with
// Machine.Incoming and returns once the guest runs.
func (v *VM) Restore(state *os.File, timeout time.Duration) error {
	if !v.spec.Machine.Incoming {
		return errors.New("the VM was not started to receive a state")
	}
	mon, err := v.monitor()
	if err != nil {
		return err
	}
	if err := v.setIgnoreShared(mon); err != nil {
		return err
	}
	if err := mon.sendFD("restore", state); err != nil {
		return err
	}
	if _, err := mon.call("migrate-incoming", map[string]string{"uri": "fd:restore"}, nil, qmpQueryTimeout); err != nil {
		return err
	}
	deadline := time.Now().Add(timeout)
	resumed := false
	for {
		st, err := mon.status()
		if err != nil {
			return err
		}
		switch st {
		case "running":
			return nil
		case "inmigrate", "prelaunch":
		case "paused":
			// A template is saved paused, and its clones arrive paused; a
			// clone with autostart off stays so until woken, a held one
			// until claimed.
			if idle := v.idle.Load(); idle != nil && idle.spec.Paused || v.spec.Restore != nil && v.spec.Restore.Hold {
				return nil
			}
			if resumed {
				break
			}
			if _, err := mon.execute("cont", qmpQueryTimeout); err != nil {
				return err
			}
			resumed = true
		default:
			return fmt.Errorf("the VM is %s after loading its state", st)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("loading the VM state took longer than %s", timeout)
		}
		select {
		case <-v.done:
			return errors.New("QEMU exited while loading the VM state")
		case <-time.After(200 * time.Microsecond):
		}
	}
}

// Claim gives a held clone (RestoreSpec.Hold: restored ahead of any pod,
// paused) to its container. spec is the VM as its pod sees it: its CRI
// log, its NIC's network namespace (the tap was moved there), its
// scale-to-zero and autostart; the machine is the one it was started with.
// The guest then runs on (with autostart off: at its first wake).
func (v *VM) Claim(spec VMSpec) error {
	if v.spec.Restore == nil || !v.spec.Restore.Hold {
		return errors.New("the VM is not a warm clone waiting for a pod")
	}
	if v.claimed.Swap(true) {
		return errors.New("the warm clone was claimed already")
	}
	if spec.LogPath != "" {
		l, err := crilog.Open(spec.LogPath)
		if err != nil {
			return err
		}
		v.log.Store(l)
	}
	idle, err := prepareIdle(spec)
	if err != nil {
		return err
	}
	v.idle.Store(idle)
	v.spec.LogPath, v.spec.Idle, v.spec.Machine.NICs = spec.LogPath, spec.Idle, spec.Machine.NICs
	v.mu.Lock()
	v.startedAt = time.Now() // the container's start, not its QEMU's
	v.mu.Unlock()
	if idle == nil || !idle.spec.Paused {
		if err := v.Resume(); err != nil {
			return err
		}
	}
	v.StartWatching()
	return nil
}

// Pause stops the guest's vCPUs (QMP stop): it uses no host CPU until
// Resume; its memory and devices stay as they are.
func (v *VM) Pause() error {
	mon, err := v.monitor()
	if err != nil {
		return err
	}
	_, err = mon.execute("stop", qmpQueryTimeout)
	return err
}

// Resume runs the guest's vCPUs again (QMP cont); packets that reached its
// tap meanwhile are delivered.
func (v *VM) Resume() error {
	mon, err := v.monitor()
	if err != nil {
		return err
	}
	_, err = mon.execute("cont", qmpQueryTimeout)
	return err
}
