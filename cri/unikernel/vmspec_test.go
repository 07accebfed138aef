package unikernel

import (
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/pkg/cni"
	"github.com/unilet-dev/unilet/pkg/vmnet"
	"github.com/unilet-dev/unilet/vmm"
)

func TestParseTuning(t *testing.T) {
	lim := Limits{AllowLibParams: []string{"lwip.*", "ukalloc.pages"}, MaxVCPUs: 8, MaxMemMiB: 2048}
	tu, err := ParseTuning(map[string]string{AnnotationVCPUs: "2", AnnotationMemory: "1Gi", AnnotationMachine: "microvm",
		AnnotationLibParams: "lwip.dhcp=0  ukalloc.pages=12"}, lim)
	require.NoError(t, err)
	require.Equal(t, PodTuning{VCPUs: 2, MemoryMiB: 1024, Machine: "microvm", LibParams: []string{"lwip.dhcp=0", "ukalloc.pages=12"},
		ScaleToZero: ScaleToZeroOff, Cooldown: time.Second}, tu)
	require.Nil(t, tu.Idle(), "Kraftlet's defaults on a CRI runtime: always running")
	tu, err = ParseTuning(map[string]string{AnnotationMemory: "96"}, lim)
	require.NoError(t, err)
	require.Equal(t, 96, tu.MemoryMiB)

	for ann, want := range map[[2]string]string{
		{AnnotationVCPUs, "0"}:                       "from 1 to 8",
		{AnnotationVCPUs, "9"}:                       "from 1 to 8",
		{AnnotationVCPUs, "2,id=x"}:                  "whole number",
		{AnnotationMemory, "4Gi"}:                    "from 16 to 2048",
		{AnnotationMemory, "8"}:                      "from 16 to 2048",
		{AnnotationMemory, "64Mi -device foo"}:       "quantity",
		{AnnotationMachine, "q35"}:                   "want pc or microvm",
		{AnnotationMachine, "pc,accel=kvm"}:          "want pc or microvm",
		{AnnotationLibParams, "vfs.fstab=[x]"}:       "set by unilet itself",
		{AnnotationLibParams, "netdev.ip=1.2.3.4/8"}: "set by unilet itself",
		{AnnotationLibParams, "uksched.stack=1"}:     "not allowed on this node",
		{AnnotationLibParams, "-device"}:             "not a library parameter",
		{AnnotationLibParams, `lwip.x="a"`}:          "cannot carry",
		{AnnotationLibParams, "lwip.x=a\x01"}:        "cannot carry",
		{AnnotationTemplate, "Bad_Name"}:             AnnotationTemplate,
		{AnnotationScaleToZeroPolicy, "yes"}:         AnnotationScaleToZeroPolicy,
		{AnnotationScaleToZeroStateful, "maybe"}:     AnnotationScaleToZeroStateful,
		{AnnotationScaleToZeroCooldown, "5"}:         "from 10 to 86400000",
		{AnnotationScaleToZeroCooldown, "1s"}:        AnnotationScaleToZeroCooldown,
		{AnnotationAutostart, "no way"}:              AnnotationAutostart,
	} {
		_, err := ParseTuning(map[string]string{ann[0]: ann[1]}, lim)
		require.ErrorContains(t, err, want, "%s=%q", ann[0], ann[1])
	}
	_, err = ParseTuning(map[string]string{AnnotationLibParams: "lwip.dhcp=0"}, Limits{})
	require.ErrorContains(t, err, "none; see --allow-lib-param")

	// Kraftlet's annotations.
	tu, err = ParseTuning(map[string]string{AnnotationScaleToZeroPolicy: "idle", AnnotationScaleToZeroStateful: "true",
		AnnotationScaleToZeroCooldown: "250", AnnotationAutostart: "false", AnnotationTemplate: "web"}, lim)
	require.NoError(t, err)
	require.Equal(t, "web", tu.Template)
	require.True(t, tu.Stateful)
	require.Equal(t, &vmm.IdleSpec{Cooldown: 250 * time.Millisecond, IdleCPU: true, Paused: true}, tu.Idle())
	tu, err = ParseTuning(map[string]string{AnnotationScaleToZeroPolicy: "on"}, lim)
	require.NoError(t, err)
	require.Equal(t, &vmm.IdleSpec{Cooldown: time.Second}, tu.Idle())
	tu, err = ParseTuning(map[string]string{AnnotationScaleToZeroPolicy: "off", AnnotationAutostart: "true"}, lim)
	require.NoError(t, err)
	require.Nil(t, tu.Idle())
}

func TestSize(t *testing.T) {
	lim := Limits{OverheadMiB: 64}
	s, err := Size(nil, PodTuning{}, 0, lim)
	require.NoError(t, err)
	require.Equal(t, Sizing{MemoryMiB: 64, VCPUs: 1}, s)

	// Limit 256Mi → 192 MiB guest RAM after the 64 MiB overhead; 1.5 CPUs → 2 vCPUs.
	s, err = Size(&runtimeapi.LinuxContainerResources{MemoryLimitInBytes: 256 << 20, CpuQuota: 150000, CpuPeriod: 100000, CpuShares: 1536}, PodTuning{}, 0, lim)
	require.NoError(t, err)
	require.Equal(t, Sizing{MemoryMiB: 192, VCPUs: 2, MemoryLimit: 256 << 20, CPUQuota: 150000, CPUPeriod: 100000, CPUShares: 1536}, s)

	// Annotations win within the limit.
	s, err = Size(&runtimeapi.LinuxContainerResources{MemoryLimitInBytes: 256 << 20}, PodTuning{MemoryMiB: 128, VCPUs: 3}, 0, lim)
	require.NoError(t, err)
	require.Equal(t, 128, s.MemoryMiB)
	require.Equal(t, 3, s.VCPUs)
	_, err = Size(&runtimeapi.LinuxContainerResources{MemoryLimitInBytes: 256 << 20}, PodTuning{MemoryMiB: 200}, 0, lim)
	require.ErrorContains(t, err, "raise the limit to at least 264Mi")

	// The image's floor.
	_, err = Size(&runtimeapi.LinuxContainerResources{MemoryLimitInBytes: 128 << 20}, PodTuning{}, 128, lim)
	require.ErrorContains(t, err, "this image needs at least 128 MiB: raise the limit to at least 192Mi")
	s, err = Size(nil, PodTuning{}, 128, lim)
	require.NoError(t, err)
	require.Equal(t, 128, s.MemoryMiB, "without a limit the image's floor raises the default")
	_, err = Size(nil, PodTuning{MemoryMiB: 100}, 128, lim)
	require.ErrorContains(t, err, "below the 128 MiB this image needs")
	s, err = Size(nil, PodTuning{MemoryMiB: 160}, 128, lim)
	require.NoError(t, err)
	require.Equal(t, 160, s.MemoryMiB)
	_, err = Size(&runtimeapi.LinuxContainerResources{MemoryLimitInBytes: 70 << 20}, PodTuning{}, 0, lim)
	require.ErrorContains(t, err, "leaves 6 MiB of guest RAM")

	_, err = Size(&runtimeapi.LinuxContainerResources{CpuQuota: 100 * 100000, CpuPeriod: 100000}, PodTuning{}, 0, lim)
	require.ErrorContains(t, err, "at most 64")
}

// No source of guest RAM lifts a VM above --max-memory: the image's floor
// above it is refused naming the label; a large limit and a default above
// it are clamped; an annotation above it is refused by ParseTuning.
func TestSizeNeverAboveMaxMemory(t *testing.T) {
	lim := Limits{OverheadMiB: 64, MaxMemMiB: 512, DefaultMemMiB: 1024}
	_, err := Size(nil, PodTuning{}, 200000, lim)
	require.ErrorContains(t, err, "image label "+LabelMinMemory)
	require.ErrorContains(t, err, "at most 512 MiB")
	_, err = Size(&runtimeapi.LinuxContainerResources{MemoryLimitInBytes: 1 << 40}, PodTuning{}, 600, lim)
	require.ErrorContains(t, err, "--max-memory")
	s, err := Size(&runtimeapi.LinuxContainerResources{MemoryLimitInBytes: 1 << 40}, PodTuning{}, 0, lim)
	require.NoError(t, err)
	require.Equal(t, 512, s.MemoryMiB)
	s, err = Size(nil, PodTuning{}, 0, lim)
	require.NoError(t, err)
	require.Equal(t, 512, s.MemoryMiB, "the default is bounded too")
	s, err = Size(nil, PodTuning{}, 300, lim)
	require.NoError(t, err)
	require.Equal(t, 512, s.MemoryMiB)
	_, err = ParseTuning(map[string]string{AnnotationMemory: "100000"}, lim)
	require.Error(t, err)
	_, err = Size(nil, PodTuning{MemoryMiB: 100000}, 0, lim)
	require.ErrorContains(t, err, "--max-memory", "a tuning that bypassed the parser is still bounded")
}

func TestNetdevParam(t *testing.T) {
	res := &cni.Result{IPs: []string{"fd00::5/64", "198.18.0.5/24"}, Gateway: "198.18.0.1", DNS: []string{"198.18.0.53"}}
	p, err := NetdevParam(res, nil, "web-0", nil)
	require.NoError(t, err)
	require.Equal(t, "netdev.ip=198.18.0.5/24:198.18.0.1:198.18.0.53::web-0:", p)
	p, err = NetdevParam(res, nil, "web-0", &runtimeapi.DNSConfig{Servers: []string{"10.96.0.10", "fd00::10", "10.96.0.11"}, Searches: []string{"ns.svc.cluster.local", "svc.cluster.local"}})
	require.NoError(t, err)
	require.Equal(t, "netdev.ip=198.18.0.5/24:198.18.0.1:10.96.0.10:10.96.0.11:web-0:ns.svc.cluster.local", p)
	_, err = NetdevParam(res, nil, "bad:host", nil)
	require.ErrorContains(t, err, "not a DNS label")
	_, err = NetdevParam(res, nil, "h", &runtimeapi.DNSConfig{Searches: []string{"a b:c"}})
	require.ErrorContains(t, err, "not a DNS name")
	_, err = NetdevParam(&cni.Result{IPs: []string{"fd00::5/64"}}, nil, "h", nil)
	require.ErrorContains(t, err, "IPv4 only")

	// A routed pod's guest gets the fixed guest network, the pod's DNS.
	g, err := vmnet.ParseGuestNetwork(vmnet.DefaultGuestNetwork)
	require.NoError(t, err)
	p, err = NetdevParam(res, &g, "web-0", nil)
	require.NoError(t, err)
	require.Equal(t, "netdev.ip=100.127.255.254/30:100.127.255.253:198.18.0.53::web-0:", p)
}

func dirStat(dirs ...string) StatFunc {
	return func(p string) (bool, error) {
		for _, d := range dirs {
			if d == p {
				return true, nil
			}
		}
		if p == "/host/file" {
			return false, nil
		}
		return false, errors.New("no such file or directory")
	}
}

func TestPlanVolumes(t *testing.T) {
	mounts := []*runtimeapi.Mount{
		{ContainerPath: "/etc/hosts", HostPath: "/host/file"},
		{ContainerPath: "/data", HostPath: "/host/data"},
		{ContainerPath: "/etc/config", HostPath: "/host/cfg,readonly=off", Readonly: true},
		{ContainerPath: ServiceAccountDir, HostPath: "/host/sa", Readonly: true},
		{ContainerPath: "/dev/termination-log", HostPath: "/host/file"},
	}
	stat := dirStat("/host/data", "/host/cfg,readonly=off", "/host/sa")
	v, err := PlanVolumes(mounts, nil, false, stat, Limits{})
	require.NoError(t, err)
	require.Equal(t, []vmm.Share{{Tag: "fs1", HostPath: "/host/data"}, {Tag: "fs2", HostPath: "/host/cfg,readonly=off", ReadOnly: true},
		{Tag: "fs3", HostPath: "/host/sa", ReadOnly: true}}, v.Shares)
	require.Equal(t, []string{"fs1:/data:9pfs:::mkmp", "fs2:/etc/config:9pfs:1::mkmp", "fs3:" + ServiceAccountDir + ":9pfs:1::mkmp"}, v.Fstab)
	require.Equal(t, []string{"mounts not passed to the guest: /etc/hosts, /dev/termination-log"}, v.Warnings)

	// An initrd is extracted as / first when the image's vfscore automounts.
	f := vmm.NewFeatures([]string{"CONFIG_LIBVFSCORE_AUTOMOUNT=y", "CONFIG_LIBVFSCORE_AUTOMOUNT_UP=y", "CONFIG_LIB9PFS=y"})
	v, err = PlanVolumes(mounts[1:2], f, true, stat, Limits{})
	require.NoError(t, err)
	require.Equal(t, []string{"initrd0:/:extract::ramfs=1:", "fs1:/data:9pfs:::mkmp"}, v.Fstab)

	// An image that cannot mount: the token is skipped with a warning, a real volume is an error.
	no9p := vmm.NewFeatures([]string{"CONFIG_LIBUKLIBPARAM=y"})
	v, err = PlanVolumes([]*runtimeapi.Mount{mounts[3]}, no9p, false, stat, Limits{})
	require.NoError(t, err)
	require.Empty(t, v.Shares)
	require.Contains(t, v.Warnings[0], ServiceAccountDir)
	_, err = PlanVolumes(mounts[1:2], no9p, false, stat, Limits{})
	require.ErrorContains(t, err, "cannot mount volumes")

	for target, want := range map[string]string{
		"relative": "clean absolute path", "/a:b": "clean absolute path", "/a/../etc": "clean absolute path", "/a//b": "clean absolute path",
		"/": "clean absolute path", "/a b": "clean absolute path", "/a/.": "clean absolute path", "/x\"y": "clean absolute path",
	} {
		_, err := PlanVolumes([]*runtimeapi.Mount{{ContainerPath: target, HostPath: "/host/data"}}, nil, false, stat, Limits{})
		require.ErrorContains(t, err, want, target)
	}
	_, err = PlanVolumes([]*runtimeapi.Mount{{ContainerPath: "/f", HostPath: "/host/file"}}, nil, false, stat, Limits{})
	require.ErrorContains(t, err, "directories only")
	_, err = PlanVolumes([]*runtimeapi.Mount{{ContainerPath: "/f", HostPath: "/missing"}}, nil, false, stat, Limits{})
	require.ErrorContains(t, err, "no such file")
	_, err = PlanVolumes([]*runtimeapi.Mount{{ContainerPath: "/a", HostPath: "/host/data"}, {ContainerPath: "/a", HostPath: "/host/data"}}, nil, false, stat, Limits{})
	require.ErrorContains(t, err, "two volumes")
	var many []*runtimeapi.Mount
	for i := 0; i < 13; i++ {
		many = append(many, &runtimeapi.Mount{ContainerPath: "/v" + string(rune('a'+i)), HostPath: "/host/data"})
	}
	_, err = PlanVolumes(many, nil, false, stat, Limits{})
	require.ErrorContains(t, err, "at most 12")
}

// FuzzParseTuning: arbitrary unilet.dev/* annotation values never panic;
// what is accepted is within the limits, sets no reserved or unlisted
// library parameter, and reaches the guest as exactly the parameters given
// (vmm.BuildCmdline accepts them and adds nothing).
func FuzzParseTuning(f *testing.F) {
	f.Add("2", "128Mi", "microvm", "uk.test=1 ukdebug.loglevel=3")
	f.Add("0", "1G", "pc", "netdev.ip=6.6.6.6/24 x.y=[1")
	f.Add("", "", "", "uk.a=[x] uk.b")
	lim := Limits{AllowLibParams: []string{"uk.*", "ukdebug.loglevel"}}
	f.Fuzz(func(t *testing.T, vcpus, mem, machine, params string) {
		ann := map[string]string{AnnotationVCPUs: vcpus, AnnotationMemory: mem, AnnotationMachine: machine, AnnotationLibParams: params}
		tu, err := ParseTuning(ann, lim)
		if err != nil {
			require.NotEmpty(t, err.Error())
			return
		}
		l := lim.withDefaults()
		require.True(t, tu.VCPUs >= 1 && tu.VCPUs <= l.MaxVCPUs)
		require.True(t, tu.MemoryMiB >= MinMemoryMiB && tu.MemoryMiB <= l.MaxMemMiB)
		for _, p := range tu.LibParams {
			for _, r := range reservedParams {
				require.False(t, len(p) >= len(r) && p[:len(r)] == r, "reserved %q", p)
			}
		}
		_, _, err = vmm.BuildCmdline(vmm.GuestConfig{Params: tu.LibParams, Args: []string{"app"}})
		require.NoError(t, err, "accepted parameters the command line refuses: %v", tu.LibParams)
	})
}
