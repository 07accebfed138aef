package unikernel

// Pure functions that turn CRI configuration and pod annotations into a VM's
// resources, NIC parameters and 9p shares. Everything here validates what a
// pod may ask for: nothing from a pod reaches QEMU unchecked.

import (
	"errors"
	"fmt"
	"net"
	"path"
	"regexp"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/pkg/cni"
	"github.com/unilet-dev/unilet/pkg/vmnet"
	"github.com/unilet-dev/unilet/vmm"
	"github.com/unilet-dev/unilet/vmm/templates"
)

// Per-pod annotations (docs/annotations.md).
const (
	AnnotationVCPUs     = "unilet.dev/vcpus"
	AnnotationMemory    = "unilet.dev/memory"
	AnnotationMachine   = "unilet.dev/machine"
	AnnotationLibParams = "unilet.dev/lib-params"
	// AnnotationTemplate is Kraftlet's: the VM starts from this template.
	AnnotationTemplate = "cloud.unikraft.v1.instances/template"
	// Kraftlet's scale-to-zero and autostart annotations.
	AnnotationScaleToZeroPolicy   = "cloud.unikraft.v1.instances/scale_to_zero.policy"
	AnnotationScaleToZeroStateful = "cloud.unikraft.v1.instances/scale_to_zero.stateful"
	AnnotationScaleToZeroCooldown = "cloud.unikraft.v1.instances/scale_to_zero.cooldown_time_ms"
	AnnotationAutostart           = "cloud.unikraft.v1.instances/autostart"
)

// Scale-to-zero policies, and the cooldown's default and bounds.
const (
	ScaleToZeroOff  = "off"
	ScaleToZeroOn   = "on"
	ScaleToZeroIdle = "idle"

	DefaultCooldownMs = 1000
	MinCooldownMs     = 10
	MaxCooldownMs     = 24 * 60 * 60 * 1000
)

// LabelMinMemory is the image label giving the least guest RAM (MiB) the
// unikernel boots with.
const LabelMinMemory = "dev.unilet.min-memory"

// Limits are the operator's bounds (daemon flags).
type Limits struct {
	DefaultMemMiB  int      // guest RAM when the container sets no memory limit
	MaxMemMiB      int      // most guest RAM a pod may ask for
	MaxVCPUs       int      // most vCPUs
	OverheadMiB    int      // what QEMU itself needs inside the container's memory limit
	AllowLibParams []string // library parameter names (or "prefix.*") pods may set
	MaxMounts      int      // vfs.fstab entries the guest takes
}

// Defaults for Limits.
const (
	DefaultMemMiB      = 64
	DefaultMaxMemMiB   = 16384
	DefaultMaxVCPUs    = 64
	DefaultOverheadMiB = 64
	DefaultMaxMounts   = 12 // Unikraft's CONFIG_LIBVFSCORE_AUTOMOUNT_UP_SIZE default
	MinMemoryMiB       = 16
)

func (l Limits) withDefaults() Limits {
	if l.DefaultMemMiB <= 0 {
		l.DefaultMemMiB = DefaultMemMiB
	}
	if l.MaxMemMiB <= 0 {
		l.MaxMemMiB = DefaultMaxMemMiB
	}
	if l.MaxVCPUs <= 0 {
		l.MaxVCPUs = DefaultMaxVCPUs
	}
	if l.OverheadMiB < 0 {
		l.OverheadMiB = 0
	}
	if l.MaxMounts <= 0 {
		l.MaxMounts = DefaultMaxMounts
	}
	return l
}

// PodTuning is what a pod's annotations ask for (zero = not set).
type PodTuning struct {
	VCPUs     int
	MemoryMiB int
	Machine   string
	LibParams []string
	// Template is the template the pod's VM starts from (Kraftlet's
	// cloud.unikraft.v1.instances/template).
	Template string
	// Scale-to-zero (Kraftlet's scale_to_zero.*): policy on, off or idle;
	// whether the guest's memory must survive a suspension; the cooldown.
	ScaleToZero string
	Stateful    bool
	Cooldown    time.Duration
	// NoAutostart: the VM is prepared but its guest first runs on the
	// first packet or console input (Kraftlet's autostart false).
	NoAutostart bool
}

// Idle is the VM's scale-to-zero and autostart (nil: always running).
func (t PodTuning) Idle() *vmm.IdleSpec {
	spec := vmm.IdleSpec{Paused: t.NoAutostart}
	if t.ScaleToZero == ScaleToZeroOn || t.ScaleToZero == ScaleToZeroIdle {
		spec.Cooldown, spec.IdleCPU = t.Cooldown, t.ScaleToZero == ScaleToZeroIdle
	}
	if spec == (vmm.IdleSpec{}) {
		return nil
	}
	return &spec
}

var (
	memQuantity = regexp.MustCompile(`^([0-9]{1,9})(Mi|Gi|M|G)?$`)
	libParam    = regexp.MustCompile(`^([a-z0-9_]+(\.[a-z0-9_]+)+)=(.*)$`)
)

// reservedParams are set by unilet itself; pods may not override them.
var reservedParams = []string{"netdev.", "vfs.", "env."}

// ParseTuning validates the unilet.dev/* annotations of a pod.
func ParseTuning(ann map[string]string, lim Limits) (PodTuning, error) {
	lim = lim.withDefaults()
	var t PodTuning
	if v, ok := ann[AnnotationVCPUs]; ok {
		n, err := strconv.Atoi(strings.TrimSpace(v))
		if err != nil || n < 1 || n > lim.MaxVCPUs {
			return t, fmt.Errorf("annotation %s=%q: want a whole number of vCPUs from 1 to %d", AnnotationVCPUs, v, lim.MaxVCPUs)
		}
		t.VCPUs = n
	}
	if v, ok := ann[AnnotationMemory]; ok {
		m := memQuantity.FindStringSubmatch(strings.TrimSpace(v))
		if m == nil {
			return t, fmt.Errorf("annotation %s=%q: want guest RAM as MiB or a quantity such as 128Mi or 1Gi", AnnotationMemory, v)
		}
		n, _ := strconv.Atoi(m[1])
		switch m[2] {
		case "Gi":
			n *= 1024
		case "G":
			n = int(int64(n) * 1000 * 1000 * 1000 >> 20)
		case "M":
			n = int(int64(n) * 1000 * 1000 >> 20)
		}
		if n < MinMemoryMiB || n > lim.MaxMemMiB {
			return t, fmt.Errorf("annotation %s=%q: guest RAM must be from %d to %d MiB", AnnotationMemory, v, MinMemoryMiB, lim.MaxMemMiB)
		}
		t.MemoryMiB = n
	}
	if v, ok := ann[AnnotationTemplate]; ok {
		if err := templates.CheckName(v); err != nil {
			return t, fmt.Errorf("annotation %s: %v", AnnotationTemplate, err)
		}
		t.Template = v
	}
	t.ScaleToZero, t.Cooldown = ScaleToZeroOff, DefaultCooldownMs*time.Millisecond
	if v, ok := ann[AnnotationScaleToZeroPolicy]; ok {
		switch v {
		case ScaleToZeroOn, ScaleToZeroOff, ScaleToZeroIdle:
			t.ScaleToZero = v
		default:
			return t, fmt.Errorf("annotation %s=%q: want on, off or idle", AnnotationScaleToZeroPolicy, v)
		}
	}
	if v, ok := ann[AnnotationScaleToZeroStateful]; ok {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return t, fmt.Errorf("annotation %s=%q: want true or false", AnnotationScaleToZeroStateful, v)
		}
		t.Stateful = b
	}
	if v, ok := ann[AnnotationScaleToZeroCooldown]; ok {
		n, err := strconv.Atoi(strings.TrimSpace(v))
		if err != nil || n < MinCooldownMs || n > MaxCooldownMs {
			return t, fmt.Errorf("annotation %s=%q: want a whole number of milliseconds from %d to %d", AnnotationScaleToZeroCooldown, v, MinCooldownMs, MaxCooldownMs)
		}
		t.Cooldown = time.Duration(n) * time.Millisecond
	}
	if v, ok := ann[AnnotationAutostart]; ok {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return t, fmt.Errorf("annotation %s=%q: want true or false", AnnotationAutostart, v)
		}
		t.NoAutostart = !b
	}
	if v, ok := ann[AnnotationMachine]; ok {
		switch v {
		case vmm.MachinePC, vmm.MachineMicroVM:
			t.Machine = v
		default:
			return t, fmt.Errorf("annotation %s=%q: want %s or %s", AnnotationMachine, v, vmm.MachinePC, vmm.MachineMicroVM)
		}
	}
	if v, ok := ann[AnnotationLibParams]; ok {
		for _, p := range strings.Fields(v) {
			m := libParam.FindStringSubmatch(p)
			if m == nil {
				return t, fmt.Errorf("annotation %s: %q is not a library parameter (want lib.name=value)", AnnotationLibParams, p)
			}
			name := m[1]
			for _, r := range reservedParams {
				if strings.HasPrefix(name, r) {
					return t, fmt.Errorf("annotation %s: %s is set by unilet itself and cannot be overridden", AnnotationLibParams, name)
				}
			}
			if !allowed(name, lim.AllowLibParams) {
				return t, fmt.Errorf("annotation %s: library parameter %s is not allowed on this node (the operator allows: %s)",
					AnnotationLibParams, name, allowList(lim.AllowLibParams))
			}
			for _, r := range m[3] {
				if r < 0x20 || r == 0x7f || r == '"' || r == '\\' || r == '\'' {
					return t, fmt.Errorf("annotation %s: the value of %s contains a character the guest command line cannot carry", AnnotationLibParams, name)
				}
			}
			if err := vmm.CheckLibParam(p); err != nil {
				return t, fmt.Errorf("annotation %s: %w", AnnotationLibParams, err)
			}
			t.LibParams = append(t.LibParams, p)
		}
	}
	return t, nil
}

func allowed(name string, allow []string) bool {
	for _, a := range allow {
		if a == name || (strings.HasSuffix(a, ".*") && strings.HasPrefix(name, strings.TrimSuffix(a, "*"))) {
			return true
		}
	}
	return false
}

func allowList(allow []string) string {
	if len(allow) == 0 {
		return "none; see --allow-lib-param"
	}
	return strings.Join(allow, ", ")
}

// Sizing is a VM's resources.
type Sizing struct {
	MemoryMiB   int   // guest RAM
	VCPUs       int   // guest CPUs
	MemoryLimit int64 // cgroup memory limit in bytes (0 = none)
	CPUQuota    int64
	CPUPeriod   int64
	CPUShares   int64
}

// Size computes guest RAM and vCPUs. Guest RAM is the container memory limit
// minus the VMM overhead (QEMU itself lives inside the same cgroup limit), or
// the annotation, or the default; never below the image's floor.
func Size(res *runtimeapi.LinuxContainerResources, t PodTuning, imageMinMiB int, lim Limits) (Sizing, error) {
	lim = lim.withDefaults()
	floor := MinMemoryMiB
	if imageMinMiB > floor {
		floor = imageMinMiB
	}
	if floor > lim.MaxMemMiB {
		return Sizing{}, fmt.Errorf("the image asks for at least %d MiB of guest RAM (image label %s) but this node allows at most %d MiB per VM (unilet's --max-memory)",
			floor, LabelMinMemory, lim.MaxMemMiB)
	}
	s := Sizing{VCPUs: 1, CPUQuota: res.GetCpuQuota(), CPUPeriod: res.GetCpuPeriod(), CPUShares: res.GetCpuShares()}
	if l := res.GetMemoryLimitInBytes(); l > 0 {
		s.MemoryLimit = l
		avail := int(l>>20) - lim.OverheadMiB
		switch {
		case t.MemoryMiB > 0 && t.MemoryMiB > avail:
			return s, fmt.Errorf("annotation %s asks for %d MiB of guest RAM but the memory limit (%d MiB) leaves %d MiB after the %d MiB VMM overhead; raise the limit to at least %dMi",
				AnnotationMemory, t.MemoryMiB, l>>20, avail, lim.OverheadMiB, t.MemoryMiB+lim.OverheadMiB)
		case t.MemoryMiB > 0:
			s.MemoryMiB = t.MemoryMiB
		case avail < floor:
			return s, fmt.Errorf("memory limit %d MiB leaves %d MiB of guest RAM after the %d MiB VMM overhead; this image needs at least %d MiB: raise the limit to at least %dMi",
				l>>20, avail, lim.OverheadMiB, floor, floor+lim.OverheadMiB)
		default:
			s.MemoryMiB = avail
			if s.MemoryMiB > lim.MaxMemMiB {
				s.MemoryMiB = lim.MaxMemMiB
			}
		}
	} else {
		// No limit: the image's floor raises the default, within the node's bound.
		s.MemoryMiB = min(max(lim.DefaultMemMiB, floor), lim.MaxMemMiB)
		if t.MemoryMiB > 0 {
			s.MemoryMiB = t.MemoryMiB
		}
	}
	if s.MemoryMiB > lim.MaxMemMiB { // every source is bounded above; this is the last guard
		return s, fmt.Errorf("guest RAM of %d MiB is above the %d MiB this node allows per VM (unilet's --max-memory)", s.MemoryMiB, lim.MaxMemMiB)
	}
	if s.MemoryMiB < floor {
		return s, fmt.Errorf("guest RAM of %d MiB is below the %d MiB this image needs (image label %s); set a larger memory limit or annotation %s",
			s.MemoryMiB, floor, LabelMinMemory, AnnotationMemory)
	}
	if q, p := res.GetCpuQuota(), res.GetCpuPeriod(); q > 0 && p > 0 {
		s.VCPUs = int((q + p - 1) / p)
		if s.VCPUs > lim.MaxVCPUs {
			return s, fmt.Errorf("CPU limit asks for %d vCPUs; at most %d are allowed on this node", s.VCPUs, lim.MaxVCPUs)
		}
	}
	if t.VCPUs > 0 {
		s.VCPUs = t.VCPUs
	}
	return s, nil
}

// NetdevParam is the Unikraft netdev.ip parameter of a pod's guest:
// <cidr>:<gw>:<dns0>:<dns1>:<hostname>:<domain>. The address and gateway
// are the routed guest network's (guest; nil for a bridged pod: the pod's
// own from the CNI result). DNS servers and the domain come from the pod's
// DNS config (cluster DNS), else from the CNI result.
func NetdevParam(res *cni.Result, guest *vmnet.Guest, hostname string, dns *runtimeapi.DNSConfig) (string, error) {
	if res == nil || len(res.IPs) == 0 {
		return "", fmt.Errorf("the pod has no IP address")
	}
	cidr := ""
	for _, ip := range res.IPs {
		if a, _, err := net.ParseCIDR(ip); err == nil && a.To4() != nil {
			cidr = ip
			break
		}
	}
	if cidr == "" {
		return "", fmt.Errorf("the pod has no IPv4 address (got %s); the guest's netdev.ip takes IPv4 only", strings.Join(res.IPs, ", "))
	}
	servers := dns.GetServers()
	if len(servers) == 0 {
		servers = res.DNS
	}
	var v4 []string
	for _, s := range servers {
		if ip := net.ParseIP(s); ip != nil && ip.To4() != nil {
			v4 = append(v4, ip.String())
		}
	}
	for len(v4) < 2 {
		v4 = append(v4, "")
	}
	domain := ""
	if s := dns.GetSearches(); len(s) > 0 {
		domain = s[0]
	} else if len(res.Search) > 0 {
		domain = res.Search[0]
	}
	if hostname != "" && !dnsLabel.MatchString(hostname) {
		return "", fmt.Errorf("hostname %q is not a DNS label", hostname)
	}
	if domain != "" && !dnsName.MatchString(domain) {
		return "", fmt.Errorf("DNS search domain %q is not a DNS name", domain)
	}
	gw := res.Gateway
	if gw != "" && net.ParseIP(gw) == nil {
		return "", fmt.Errorf("gateway %q is not an IP address", gw)
	}
	if guest != nil {
		cidr, gw = guest.Addr.String(), guest.Gateway.String()
	}
	return "netdev.ip=" + strings.Join([]string{cidr, gw, v4[0], v4[1], hostname, domain}, ":"), nil
}

var (
	dnsLabel = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)
	dnsName  = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*\.?$`)
	// Mount targets the guest's fstab can carry: absolute, clean, no ':'.
	mountTarget = regexp.MustCompile(`^(/[A-Za-z0-9._@+=,~-]+)+$`)
)

// kubeletFiles are single-file mounts kubelet adds to every container; a
// unikernel has no use for them and 9p cannot export a single file.
var kubeletFiles = map[string]bool{"/etc/hosts": true, "/dev/termination-log": true, "/etc/hostname": true, "/etc/resolv.conf": true}

// ServiceAccountDir is where kubelet mounts the service-account token.
const ServiceAccountDir = "/var/run/secrets/kubernetes.io/serviceaccount"

// Volumes is how a container's mounts reach the guest.
type Volumes struct {
	Shares   []vmm.Share
	Fstab    []string
	Warnings []string
}

// StatFunc reports whether a host path exists and is a directory.
type StatFunc func(hostPath string) (isDir bool, err error)

// Features a guest needs to mount volumes (absent os.features = assume all).
const (
	FeatureAutomount   = "CONFIG_LIBVFSCORE_AUTOMOUNT"
	FeatureFstab       = "CONFIG_LIBVFSCORE_AUTOMOUNT_UP"
	Feature9PFS        = "CONFIG_LIB9PFS"
	FeatureNetdev      = "CONFIG_LIBUKNETDEV"
	featureListForMsgs = "CONFIG_LIBVFSCORE_AUTOMOUNT_UP and CONFIG_LIB9PFS"
)

// PlanVolumes turns CRI mounts into 9p shares and vfs.fstab entries. An image
// with an initrd whose os.features enable vfscore automount gets the initrd
// extracted as / first (as `kraft run` does).
func PlanVolumes(mounts []*runtimeapi.Mount, f *vmm.Features, hasInitrd bool, stat StatFunc, lim Limits) (Volumes, error) {
	lim = lim.withDefaults()
	var v Volumes
	if f != nil && hasInitrd && f.Has(FeatureAutomount) && f.Has(FeatureFstab) {
		v.Fstab = append(v.Fstab, "initrd0:/:extract::ramfs=1:")
	}
	canMount := f.Has(FeatureFstab) && f.Has(Feature9PFS)
	var skipped []string
	seen := map[string]bool{}
	for _, m := range mounts {
		target := m.GetContainerPath()
		if kubeletFiles[target] {
			skipped = append(skipped, target)
			continue
		}
		if !canMount && target == ServiceAccountDir {
			skipped = append(skipped, target)
			continue
		}
		if !canMount {
			return v, fmt.Errorf("volume at %s: the image cannot mount volumes (its os.features lack %s)", target, featureListForMsgs)
		}
		if !mountTarget.MatchString(target) || path.Clean(target) != target || strings.Contains(target, "/./") || strings.Contains(target, "/../") || strings.HasSuffix(target, "/..") || strings.HasSuffix(target, "/.") {
			return v, fmt.Errorf("volume mount path %q cannot be mounted in a unikernel: it must be a clean absolute path of letters, digits and ._@+=,~- (no ':')", target)
		}
		if seen[target] {
			return v, fmt.Errorf("two volumes are mounted at %s", target)
		}
		seen[target] = true
		host := m.GetHostPath()
		if !path.IsAbs(host) {
			return v, fmt.Errorf("volume at %s: host path %q is not absolute", target, host)
		}
		isDir, err := stat(host)
		if err != nil {
			return v, fmt.Errorf("volume at %s: host path %s: %v", target, host, err)
		}
		if !isDir {
			return v, fmt.Errorf("volume at %s: host path %s is a file; virtio-9p exports directories only (mount the whole volume instead of a subPath file)", target, host)
		}
		tag := "fs" + strconv.Itoa(len(v.Shares)+1)
		// A writable share keeps what the guest sets (owner, mode, devices,
		// symlinks) in user xattrs, or in metadata files where the file
		// system has none (vmm.Share).
		v.Shares = append(v.Shares, vmm.Share{Tag: tag, HostPath: host, ReadOnly: m.GetReadonly(),
			MappedFile: !m.GetReadonly() && !hasUserXattrs(host)})
		flags := ""
		if m.GetReadonly() {
			flags = "1" // MS_RDONLY
		}
		v.Fstab = append(v.Fstab, tag+":"+target+":9pfs:"+flags+"::mkmp")
	}
	if len(v.Fstab) > lim.MaxMounts {
		return v, fmt.Errorf("the container needs %d vfs.fstab entries; the guest takes at most %d", len(v.Fstab), lim.MaxMounts)
	}
	if len(skipped) > 0 {
		v.Warnings = append(v.Warnings, "mounts not passed to the guest: "+strings.Join(skipped, ", "))
	}
	return v, nil
}

// hasUserXattrs reports whether the file system of dir stores user
// extended attributes: asking for one that does not exist answers ENODATA
// there, ENOTSUP only where there are none (tmpfs before Linux 6.6).
// Nothing is written.
func hasUserXattrs(dir string) bool {
	_, err := unix.Getxattr(dir, "user.unilet.probe", nil)
	return !errors.Is(err, unix.ENOTSUP)
}
