package unikernel

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/sirupsen/logrus"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/cri/errdefs"
	"github.com/unilet-dev/unilet/cri/store"
	"github.com/unilet-dev/unilet/image"
	"github.com/unilet-dev/unilet/pkg/vmnet"
	"github.com/unilet-dev/unilet/vmm"
	"github.com/unilet-dev/unilet/vmm/templates"
)

// CreateContainer turns the container config into a VM spec (kernel command
// line validated now, so a bad pod fails here with InvalidArgument). The
// checks against the pod (ready, name unique, ports its own), the choice of
// its VM's tap and the insertion happen under the sandbox's lock, so two
// creates cannot both pass them.
func (s *Service) CreateContainer(ctx context.Context, r *runtimeapi.CreateContainerRequest) (*runtimeapi.CreateContainerResponse, error) {
	cfg := r.GetConfig()
	if cfg == nil || cfg.GetMetadata() == nil || cfg.GetMetadata().GetName() == "" {
		return nil, errorf(errdefs.ErrInvalidArgument, "container config with a metadata name is required")
	}
	if cfg.GetImage().GetImage() == "" {
		return nil, errorf(errdefs.ErrInvalidArgument, "container %q has no image", cfg.GetMetadata().GetName())
	}
	if err := checkContainerConfig(cfg); err != nil {
		return nil, errorf(errdefs.ErrInvalidArgument, "container %.64q: %v", cfg.GetMetadata().GetName(), err)
	}
	// As every CRI runtime: a group alone names no user to run as.
	if sc := cfg.GetLinux().GetSecurityContext(); sc.GetRunAsGroup() != nil && sc.GetRunAsUser() == nil && sc.GetRunAsUsername() == "" {
		return nil, errorf(errdefs.ErrInvalidArgument, "container %q sets run_as_group without run_as_user or run_as_username", cfg.GetMetadata().GetName())
	}
	img, err := s.images.Get(cfg.GetImage().GetImage())
	if errors.Is(err, image.ErrNotFound) {
		return nil, errorf(errdefs.ErrNotFound, "unikernel image %q is not present on this node; pull it first", cfg.GetImage().GetImage())
	}
	if err != nil {
		return nil, errorf(errdefs.ErrInternal, "look up image: %v", err)
	}
	sb, err := s.getSandbox(r.GetPodSandboxId())
	if err != nil {
		return nil, err
	}
	// A warm clone staged for the pod was made for a container ID: the
	// first container to start from the template is given it.
	id := newID()
	sb.Lifecycle.Lock()
	if w := sb.Meta().rt.warmID; w != "" && !s.containers.Has(w) {
		id = w
	}
	sb.Lifecycle.Unlock()
	meta, size, warnings, err := s.containerSpec(id, sb, cfg, img)
	if err != nil {
		return nil, err
	}
	ports, err := ContainerPorts(cfg.GetAnnotations())
	if err != nil {
		return nil, errorf(errdefs.ErrInvalidArgument, "container %q: %v", cfg.GetMetadata().GetName(), err)
	}
	log := logrus.WithFields(podFields(sb.ID(), sb.Meta().Config)).WithFields(logrus.Fields{"container": id, "name": cfg.GetMetadata().GetName(), "image": cfg.GetImage().GetImage()})
	for _, w := range warnings {
		log.Warn(w)
	}

	sb.Lifecycle.Lock()
	defer sb.Lifecycle.Unlock()
	if sb.Status().State != store.SandboxReady {
		return nil, errorf(errdefs.ErrFailedPrecondition, "pod sandbox %s is not ready", sb.ID())
	}
	name := cfg.GetMetadata().GetName()
	for _, c := range s.containersOf(sb.ID()) {
		m := c.Meta().Config.GetMetadata()
		if m.GetName() == name && m.GetAttempt() == cfg.GetMetadata().GetAttempt() {
			return nil, errorf(errdefs.ErrAlreadyExists, "container %q (attempt %d) already exists in pod %s as %s", m.GetName(), m.GetAttempt(), sb.ID(), c.ID())
		}
	}
	if len(meta.Machine.NICs) > 0 {
		tap, err := s.assignTap(sb, name, ports)
		if err != nil {
			return nil, err
		}
		meta.Machine.NICs[0].Tap = vmnet.TapName(tap)
	}
	// The staged shim's cgroup becomes this container's: no migration later.
	// A staged warm clone serves only the container it was made for, if
	// that starts from the template it was made from.
	digest := sb.Meta().rt.warmDigest
	staged := sb.Meta().rt.takeStaged()
	if w := staged.WarmID(); w != "" && (w != id || meta.Template == "" || !s.templateIs(meta.Template, digest)) {
		staged.Drop()
		staged = nil
	}
	staged = s.vms.Claim(staged, meta.Cgroup)
	c, err := s.containers.Add(id, meta, containerStatus{State: store.ContainerCreated, Sizing: size, Warnings: warnings, staged: staged})
	if err != nil {
		staged.Drop()
		if cerr := s.vms.Cleanup(id, meta.Cgroup); cerr != nil {
			log.WithError(cerr).Warn("clean up after a failed create")
		}
		return nil, err
	}
	if err := s.routePod(sb); err != nil {
		log.WithError(err).Warn("the pod's routing does not have the new container's ports yet; its start retries")
	}
	s.emit(c, runtimeapi.ContainerEventType_CONTAINER_CREATED_EVENT)
	log.Info("unikernel container created")
	return &runtimeapi.CreateContainerResponse{ContainerId: id}, nil
}

// containerSpec builds the VM of a new container (pure but for the image
// label and the host paths of volumes).
func (s *Service) containerSpec(id string, sb *sandbox, cfg *runtimeapi.ContainerConfig, img *image.Image) (containerMeta, Sizing, []string, error) {
	name := cfg.GetMetadata().GetName()
	sbCfg := sb.Meta().Config
	invalid := func(err error) (containerMeta, Sizing, []string, error) {
		return containerMeta{}, Sizing{}, nil, errorf(errdefs.ErrInvalidArgument, "container %q: %v", name, err)
	}
	tuning, err := ParseTuning(sbCfg.GetAnnotations(), s.cfg.Limits)
	if err != nil {
		return invalid(err)
	}
	minMiB := 0
	if v := img.Labels[LabelMinMemory]; v != "" {
		if minMiB, err = strconv.Atoi(v); err != nil {
			logrus.WithFields(logrus.Fields{"image": img.ID, "label": v}).Warn("image label " + LabelMinMemory + " is not a number of MiB; ignored")
			minMiB = 0
		}
	}
	size, err := Size(cfg.GetLinux().GetResources(), tuning, minMiB, s.cfg.Limits)
	if err != nil {
		return invalid(err)
	}
	logPath, err := s.containerLogPath(sbCfg.GetLogDirectory(), cfg.GetLogPath())
	if err != nil {
		return invalid(err)
	}
	args := append(append([]string{}, cfg.GetCommand()...), cfg.GetArgs()...)
	if len(args) == 0 {
		args = img.Cmd
	}
	env := append([]string{}, img.Env...)
	for _, kv := range cfg.GetEnvs() {
		if kv.GetKey() == "" {
			return invalid(errors.New("environment variable with an empty name"))
		}
		env = append(env, kv.GetKey()+"="+string(kv.GetValue()))
	}
	env = dedupEnv(env)
	features := vmm.NewFeatures(img.Features)
	vols, err := PlanVolumes(cfg.GetMounts(), features, img.Initrd != "", statDir, s.cfg.Limits)
	if err != nil {
		return invalid(err)
	}
	// Each share is bound at start by the path its host directory has now,
	// symlinks resolved: the jail then opens it refusing any symlink, so one
	// swapped in meanwhile cannot redirect the bind (vmm/jail).
	for i, sh := range vols.Shares {
		r, err := filepath.EvalSymlinks(sh.HostPath)
		if err != nil {
			return invalid(fmt.Errorf("volume host path %s: %v", sh.HostPath, err))
		}
		vols.Shares[i].HostPath = r
	}
	params := append([]string{}, tuning.LibParams...)
	var warnings []string
	var nics []vmm.NIC
	if net := sb.Status().Net; net != nil {
		// Its tap is assigned under the pod's lock (assignTap).
		nics = []vmm.NIC{{Tap: vmnet.TapName(0), NetNS: sb.Meta().NetNS, MAC: sb.Status().MAC}}
		if features.Has(FeatureNetdev) {
			p, err := NetdevParam(net, sb.Status().Guest, sbCfg.GetHostname(), sbCfg.GetDnsConfig())
			if err != nil {
				return invalid(err)
			}
			params = append([]string{p}, params...)
		} else {
			warnings = append(warnings, "image lacks "+FeatureNetdev+"=y (no network stack): the guest is not told its pod IP")
		}
	}
	line, cmdWarnings, err := vmm.BuildCmdline(vmm.GuestConfig{KernelName: img.Kernel, Params: params, Fstab: vols.Fstab,
		Env: env, Args: args, Features: features})
	var ce *vmm.CmdlineError
	if errors.As(err, &ce) {
		return invalid(err)
	}
	if err != nil {
		return containerMeta{}, Sizing{}, nil, errorf(errdefs.ErrInternal, "build guest command line: %v", err)
	}
	warnings = append(append(warnings, cmdWarnings...), vols.Warnings...)
	machine := vmm.MachinePC
	if tuning.Machine != "" {
		machine = tuning.Machine
	}
	if _, err := s.vms.Dir(id); err != nil {
		return containerMeta{}, Sizing{}, nil, err
	}
	md := sbCfg.GetMetadata()
	meta := containerMeta{SandboxID: sb.ID(), Config: cfg, Image: img, ImageRef: cfg.GetImage().GetImage(), LogPath: logPath, CreatedAt: time.Now(),
		Machine: vmm.MachineConfig{
			Name:  fmt.Sprintf("%s_%s_%s", md.GetNamespace(), md.GetName(), name),
			Accel: s.cfg.Accel, Machine: machine, MemoryMiB: size.MemoryMiB, VCPUs: size.VCPUs,
			Kernel: img.Kernel, Initrd: img.Initrd, Cmdline: line,
			NICs: nics, Shares: vols.Shares,
		}}
	if err := meta.Machine.Validate(); err != nil {
		return invalid(err)
	}
	meta.Idle = tuning.Idle()
	if tuning.Template != "" {
		t, tw, err := s.templateFor(tuning.Template, sb, cfg, img, env, vols.Shares, size)
		if err != nil {
			return invalid(err)
		}
		meta.Template = tuning.Template
		size.MemoryMiB, size.VCPUs = t.Machine.MemoryMiB, t.Machine.VCPUs
		warnings = append(warnings, tw...)
	}
	if meta.Cgroup, err = s.vms.CgroupPath(sbCfg.GetLinux().GetCgroupParent(), id); err != nil {
		return invalid(err)
	}
	return meta, size, warnings, nil
}

// containerLogPath is the CRI log file: the pod's log directory (inside a
// configured log root) joined with the container's relative log path,
// which may not leave it. It is checked anew for records read from disk:
// the shim, as root, creates and appends to this file.
func (s *Service) containerLogPath(dir, rel string) (string, error) {
	if dir == "" || rel == "" {
		return "", nil
	}
	if err := s.checkLogDir(dir); err != nil {
		return "", err
	}
	if filepath.IsAbs(rel) || !insideDir(filepath.Join(dir, rel), dir) || filepath.Clean(filepath.Join(dir, rel)) == filepath.Clean(dir) {
		return "", fmt.Errorf("log path %q must be a file below the pod's log directory", rel)
	}
	return filepath.Join(dir, rel), nil
}

// checkLogDir: a pod's log directory must lie inside one of the configured
// log roots (--pod-log-root), as written and once symlinks of its existing
// part are resolved.
func (s *Service) checkLogDir(dir string) error {
	if dir == "" {
		return nil
	}
	if !filepath.IsAbs(dir) {
		return fmt.Errorf("log directory %q is not an absolute path", dir)
	}
	resolved := dir
	for p, rest := filepath.Clean(dir), ""; ; p, rest = filepath.Dir(p), filepath.Join(filepath.Base(p), rest) {
		if r, err := filepath.EvalSymlinks(p); err == nil {
			resolved = filepath.Join(r, rest)
			break
		}
		if p == "/" {
			break
		}
	}
	for _, root := range s.cfg.LogRoots {
		if insideDir(dir, root) && insideDir(resolved, root) {
			return nil
		}
	}
	return fmt.Errorf("log directory %q is outside the pod log roots %v (unilet's --pod-log-root; kubelet's podLogsDir)", dir, s.cfg.LogRoots)
}

// statDir reports whether a host path is a directory (following symlinks).
func statDir(p string) (bool, error) {
	fi, err := os.Stat(p)
	if err != nil {
		return false, err
	}
	return fi.IsDir(), nil
}

func dedupEnv(env []string) []string {
	last := map[string]int{}
	for i, kv := range env {
		last[strings.SplitN(kv, "=", 2)[0]] = i
	}
	var out []string
	for i, kv := range env {
		if last[strings.SplitN(kv, "=", 2)[0]] == i {
			out = append(out, kv)
		}
	}
	return out
}

// templateIs reports whether template name is still the one whose state
// has digest.
func (s *Service) templateIs(name, digest string) bool {
	t, err := s.cfg.Templates.Get(name)
	return err == nil && t.StateDigest == digest
}

// templateFor checks that a container may start from template name: the
// template exists, was made from the container's image, and the
// container's explicit command and arguments are the template's (the guest
// read them at boot). It returns warnings: an environment that differs
// (kubelet adds Service variables; the guest keeps the template's),
// volumes a clone cannot mount (a template has no volume devices).
func (s *Service) templateFor(name string, sb *sandbox, cfg *runtimeapi.ContainerConfig, img *image.Image, env []string,
	shares []vmm.Share, size Sizing) (templates.Template, []string, error) {
	if s.cfg.Templates == nil {
		return templates.Template{}, nil, fmt.Errorf("annotation %s: templates are off on this node", AnnotationTemplate)
	}
	t, err := s.cfg.Templates.Get(name)
	if err != nil {
		return t, nil, fmt.Errorf("annotation %s: %v (uniletctl template ls lists this node's)", AnnotationTemplate, err)
	}
	if t.ImageID != img.ID {
		return t, nil, fmt.Errorf("annotation %s: template %q was made from image %s, the container runs %s (%s); a clone runs its template's image",
			AnnotationTemplate, name, t.ImageID, img.ID, cfg.GetImage().GetImage())
	}
	if explicit := append(append([]string{}, cfg.GetCommand()...), cfg.GetArgs()...); len(explicit) > 0 && !slices.Equal(explicit, t.Args) {
		return t, nil, fmt.Errorf("annotation %s: the container's command and arguments %q differ from template %q's %q; a clone runs with what its template booted with",
			AnnotationTemplate, explicit, name, t.Args)
	}
	if g := sb.Status().Guest; sb.Status().Net != nil && (g == nil || g.Addr.String() != t.GuestAddr) {
		return t, nil, fmt.Errorf("annotation %s: template %q's guest network %s is not this pod's; recreate the template or the pod", AnnotationTemplate, name, t.GuestAddr)
	}
	if size.MemoryLimit > 0 && t.Machine.MemoryMiB > size.MemoryMiB {
		return t, nil, fmt.Errorf("annotation %s: template %q's guest has %d MiB RAM; the container's memory limit leaves room for %d MiB",
			AnnotationTemplate, name, t.Machine.MemoryMiB, size.MemoryMiB)
	}
	var warnings []string
	if !slices.Equal(dedupEnv(env), t.Env) {
		warnings = append(warnings, fmt.Sprintf("the guest keeps template %q's environment (read at its boot); the container's differs", name))
	}
	if len(shares) > 0 {
		warnings = append(warnings, fmt.Sprintf("a clone of template %q has the template's devices: the container's %d volume(s) are not mounted", name, len(shares)))
	}
	return t, warnings, nil
}
