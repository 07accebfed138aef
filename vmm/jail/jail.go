// Package jail confines one QEMU with least privilege, in the manner of
// Firecracker's jailer. The VM's supervisor (unilet-shim) starts itself
// again as the jail helper (Command) in new mount and IPC namespaces; the
// helper (Run, before any other goroutine) builds a root that holds only
// what QEMU needs — /usr read-only (QEMU, its libraries and firmware),
// /etc/ld.so.cache, /dev/{null,zero,random,urandom} (and /dev/kvm when used),
// a /proc that shows only the jail's own processes, the kernel and initrd
// read-only at /kernel and /initrd, and each volume at /vol/<tag> — pivots
// into it (the host's tree is detached), makes it read-only, joins the pod's
// network namespace (a new, empty one for a VM without network), drops every
// capability including the bounding set, switches to the VM's own
// unprivileged uid/gid, sets NoNewPrivs and the parent-death signal, and
// executes QEMU. QEMU opens no path of the host by name: its console, QMP
// monitor and tap devices are file descriptors the supervisor hands over,
// and QEMU's own seccomp filter (-sandbox, see vmm.BuildArgv) follows.
package jail

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Arg is the first argument that makes unilet-shim the jail helper.
const Arg = "__jail"

// env carries the Config to the helper.
const env = "UNILET_JAIL"

// Paths inside the jail.
const (
	Kernel = "/kernel"
	Initrd = "/initrd"
	VolDir = "/vol"
)

// VolPath is where the share tagged tag is inside the jail.
func VolPath(tag string) string { return VolDir + "/" + tag }

// Config is one jailed QEMU.
type Config struct {
	// Root is an empty directory of the VM's own (inside its state
	// directory); the jail's root filesystem is mounted over it in the
	// helper's mount namespace only.
	Root   string
	QEMU   string   // host path of the QEMU binary
	Argv   []string // QEMU's arguments (paths as the jail sees them)
	Env    []string // QEMU's whole environment
	UID    uint32
	GID    uint32
	Groups []uint32
	Kernel string // host path, bound read-only at Kernel
	Initrd string // host path, bound read-only at Initrd ("" = none)
	Shares []Share
	KVM    bool   // bind /dev/kvm
	NetNS  string // network namespace to join ("" = a new, empty one)
	// Parent is the supervisor's PID: the helper exits if it is gone
	// before the parent-death signal is armed.
	Parent int
}

// Share is one volume: a host directory bound at VolPath(Tag).
type Share struct {
	Tag      string
	HostPath string
	ReadOnly bool
}

// Command returns the helper command for c: the supervisor's own binary
// (self) in new mount, IPC and (without NetNS) network namespaces. The
// caller sets Stdin/Stdout/Stderr, ExtraFiles and extends SysProcAttr.
func Command(self string, c Config) (*exec.Cmd, error) {
	if !filepath.IsAbs(c.Root) || c.UID == 0 || c.GID == 0 {
		return nil, errors.New("jail: root must be absolute and the uid/gid non-zero")
	}
	b, err := json.Marshal(c)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(self, Arg)
	cmd.Env = []string{env + "=" + string(b)}
	flags := uintptr(unix.CLONE_NEWNS | unix.CLONE_NEWIPC)
	if c.NetNS == "" {
		flags |= unix.CLONE_NEWNET
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: flags}
	return cmd, nil
}

// IsHelper reports whether this process was started as the jail helper.
func IsHelper() bool { return len(os.Args) > 1 && os.Args[1] == Arg }

// Main runs the helper: it never returns. Call it first thing in main (the
// caller locks the main goroutine to its thread in init, so the
// thread-scoped settings — NoNewPrivs, the parent-death signal — belong to
// the thread that executes QEMU).
func Main() {
	var c Config
	err := json.Unmarshal([]byte(os.Getenv(env)), &c)
	if err == nil {
		err = run(c)
	}
	fmt.Fprintf(os.Stderr, "unilet jail: %v\n", err)
	os.Exit(126)
}

func run(c Config) error {
	runtime.LockOSThread()
	// Nothing mounted here reaches the host's namespace.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_SLAVE, ""); err != nil {
		return fmt.Errorf("make mounts private: %w", err)
	}
	var netns *os.File
	if c.NetNS != "" {
		f, err := os.Open(c.NetNS)
		if err != nil {
			return fmt.Errorf("open network namespace: %w", err)
		}
		netns = f
	}
	// Executed by descriptor: QEMU need not be under /usr. Not close-on-exec,
	// so a wrapper script's interpreter can read it through /dev/fd.
	exe, err := unix.Open(c.QEMU, unix.O_RDONLY, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", c.QEMU, err)
	}
	if err := build(c); err != nil {
		return err
	}
	if err := pivot(c.Root); err != nil {
		return err
	}
	if netns != nil {
		if err := unix.Setns(int(netns.Fd()), unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("join the pod's network namespace: %w", err)
		}
		netns.Close()
	}
	if err := drop(c); err != nil {
		return err
	}
	argv := append([]string{filepath.Base(c.QEMU)}, c.Argv...)
	err = execveat(exe, argv, c.Env)
	return fmt.Errorf("execute %s: %w", c.QEMU, err)
}

// execveat executes the program open as fd (execveat with AT_EMPTY_PATH).
func execveat(fd int, argv, envv []string) error {
	argvp, err := syscall.SlicePtrFromStrings(argv)
	if err != nil {
		return err
	}
	envp, err := syscall.SlicePtrFromStrings(envv)
	if err != nil {
		return err
	}
	empty, _ := unix.BytePtrFromString("")
	_, _, e := unix.Syscall6(unix.SYS_EXECVEAT, uintptr(fd), uintptr(unsafe.Pointer(empty)),
		uintptr(unsafe.Pointer(&argvp[0])), uintptr(unsafe.Pointer(&envp[0])), unix.AT_EMPTY_PATH, 0)
	return e
}

const (
	roFlags = unix.MS_RDONLY | unix.MS_NOSUID | unix.MS_NODEV
)

// build mounts the jail's tree over c.Root.
func build(c Config) error {
	r := c.Root
	if err := unix.Mount("tmpfs", r, "tmpfs", unix.MS_NOSUID, "mode=0755,size=64k,nr_inodes=256"); err != nil {
		return fmt.Errorf("mount the jail root: %w", err)
	}
	for _, d := range []string{"usr", "etc", "dev", "proc", "vol"} {
		if err := os.Mkdir(filepath.Join(r, d), 0o755); err != nil {
			return err
		}
	}
	if err := bind("/usr", filepath.Join(r, "usr"), roFlags, true); err != nil {
		return err
	}
	// Merged /usr: /lib, /lib64, /bin are links into it; otherwise bound too.
	for _, d := range []string{"lib", "lib64", "bin", "sbin"} {
		host := "/" + d
		fi, err := os.Lstat(host)
		switch {
		case err != nil:
			continue
		case fi.Mode()&os.ModeSymlink != 0:
			t, err := os.Readlink(host)
			if err != nil {
				return err
			}
			if err := os.Symlink(t, filepath.Join(r, d)); err != nil {
				return err
			}
		case fi.IsDir():
			if err := os.Mkdir(filepath.Join(r, d), 0o755); err != nil {
				return err
			}
			if err := bind(host, filepath.Join(r, d), roFlags, true); err != nil {
				return err
			}
		}
	}
	if _, err := os.Stat("/etc/ld.so.cache"); err == nil {
		if err := bindFile("/etc/ld.so.cache", filepath.Join(r, "etc/ld.so.cache"), roFlags); err != nil {
			return err
		}
	}
	if err := unix.Mount("tmpfs", filepath.Join(r, "dev"), "tmpfs", unix.MS_NOSUID|unix.MS_NOEXEC, "mode=0755,size=4k,nr_inodes=16"); err != nil {
		return fmt.Errorf("mount the jail's /dev: %w", err)
	}
	devs := []string{"null", "zero", "random", "urandom"}
	if c.KVM {
		devs = append(devs, "kvm")
	}
	for _, d := range devs {
		if err := bindFile("/dev/"+d, filepath.Join(r, "dev", d), unix.MS_NOSUID|unix.MS_NOEXEC); err != nil {
			return err
		}
	}
	if err := os.Symlink("/proc/self/fd", filepath.Join(r, "dev", "fd")); err != nil {
		return err
	}
	// QEMU's 9p server reaches files through /proc/self/fd; this /proc
	// shows the jail's own processes only.
	// Before Linux 5.8 every proc mount of a PID namespace shares its
	// options (setting them here would change the host's /proc): there the
	// jail's /proc shows what it shows any unprivileged user.
	procFlags := uintptr(unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC)
	err := unix.Mount("proc", filepath.Join(r, "proc"), "proc", procFlags, "hidepid=invisible,subset=pid")
	if errors.Is(err, unix.EINVAL) {
		err = unix.Mount("proc", filepath.Join(r, "proc"), "proc", procFlags, "")
	}
	if err != nil {
		return fmt.Errorf("mount the jail's /proc: %w", err)
	}
	if err := bindFile(c.Kernel, r+Kernel, roFlags|unix.MS_NOEXEC); err != nil {
		return err
	}
	if c.Initrd != "" {
		if err := bindFile(c.Initrd, r+Initrd, roFlags|unix.MS_NOEXEC); err != nil {
			return err
		}
	}
	for _, s := range c.Shares {
		if strings.ContainsAny(s.Tag, "/.") || s.Tag == "" {
			return fmt.Errorf("invalid share tag %q", s.Tag)
		}
		dst := filepath.Join(r, VolPath(s.Tag))
		if err := os.Mkdir(dst, 0o755); err != nil {
			return err
		}
		flags := uintptr(unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC)
		if s.ReadOnly {
			flags |= unix.MS_RDONLY
		}
		if err := bindShare(s.HostPath, dst, flags); err != nil {
			return fmt.Errorf("volume %s: %w", s.Tag, err)
		}
	}
	return nil
}

// bind mounts src on dst and remounts the bind with flags.
func bind(src, dst string, flags uintptr, rec bool) error {
	bf := uintptr(unix.MS_BIND)
	if rec {
		bf |= unix.MS_REC
	}
	if err := unix.Mount(src, dst, "", bf, ""); err != nil {
		return fmt.Errorf("bind %s: %w", src, err)
	}
	if err := unix.Mount("", dst, "", unix.MS_REMOUNT|unix.MS_BIND|flags, ""); err != nil {
		return fmt.Errorf("remount %s: %w", dst, err)
	}
	return nil
}

// bindShare binds the host directory src — a path the daemon resolved
// when the container was created, so it holds no symlink — on dst. The
// directory is opened without following any symlink and bound through its
// descriptor: a component swapped for a symlink since (to reach elsewhere
// on the host) fails the start instead of being followed.
func bindShare(src, dst string, flags uintptr) error {
	fd, err := unix.Openat2(unix.AT_FDCWD, src, &unix.OpenHow{
		Flags: unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC, Resolve: unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS})
	if err != nil {
		if errors.Is(err, unix.ELOOP) || errors.Is(err, unix.ENOTDIR) {
			return fmt.Errorf("host path %s is no longer the directory checked when the container was created (a symlink or file now); refusing to bind it", src)
		}
		return fmt.Errorf("open host path %s: %w", src, err)
	}
	defer unix.Close(fd)
	return bind(fmt.Sprintf("/proc/self/fd/%d", fd), dst, flags, true)
}

// bindFile binds the file src on a new empty file dst.
func bindFile(src, dst string, flags uintptr) error {
	f, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	f.Close()
	return bind(src, dst, flags, false)
}

// pivot makes root the root of the mount namespace, detaches the host's
// tree and leaves the new root read-only.
func pivot(root string) error {
	if err := unix.Chdir(root); err != nil {
		return err
	}
	if err := unix.PivotRoot(".", "."); err != nil {
		return fmt.Errorf("pivot_root: %w", err)
	}
	if err := unix.Unmount(".", unix.MNT_DETACH); err != nil {
		return fmt.Errorf("detach the host's tree: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return err
	}
	if err := unix.Mount("", "/", "", unix.MS_REMOUNT|unix.MS_RDONLY|unix.MS_NOSUID, ""); err != nil {
		return fmt.Errorf("make the jail root read-only: %w", err)
	}
	return nil
}

// drop empties the capability bounding set, switches to the jail's
// uid/gid (which clears the permitted and effective sets), sets
// NoNewPrivs and arms the parent-death signal.
func drop(c Config) error {
	for cp := 0; cp <= 63; cp++ {
		if err := unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(cp), 0, 0, 0); err != nil && !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("drop capability %d: %w", cp, err)
		}
	}
	// This thread only (it executes QEMU; the kernel ends the helper's
	// other threads then): Go's own setters change every thread, a signal
	// round trip to each on the start path.
	var groups unsafe.Pointer
	if len(c.Groups) > 0 {
		groups = unsafe.Pointer(&c.Groups[0])
	}
	if _, _, e := unix.RawSyscall(unix.SYS_SETGROUPS, uintptr(len(c.Groups)), uintptr(groups), 0); e != 0 {
		return fmt.Errorf("setgroups: %w", e)
	}
	if _, _, e := unix.RawSyscall(unix.SYS_SETRESGID, uintptr(c.GID), uintptr(c.GID), uintptr(c.GID)); e != 0 {
		return fmt.Errorf("setresgid: %w", e)
	}
	if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, uintptr(c.UID), uintptr(c.UID), uintptr(c.UID)); e != 0 {
		return fmt.Errorf("setresuid: %w", e)
	}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("no_new_privs: %w", err)
	}
	// A credential change cleared the parent-death signal: arm it again,
	// then make sure the supervisor did not die in between.
	if err := unix.Prctl(unix.PR_SET_PDEATHSIG, uintptr(unix.SIGKILL), 0, 0, 0); err != nil {
		return err
	}
	if os.Getppid() != c.Parent {
		return errors.New("the VM's supervisor is gone")
	}
	return nil
}
