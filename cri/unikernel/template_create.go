package unikernel

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/unilet-dev/unilet/api/admin"
	"github.com/unilet-dev/unilet/cri/errdefs"
	"github.com/unilet-dev/unilet/image"
	"github.com/unilet-dev/unilet/pkg/cni"
	"github.com/unilet-dev/unilet/pkg/netns"
	"github.com/unilet-dev/unilet/pkg/vmnet"
	"github.com/unilet-dev/unilet/vmm"
	"github.com/unilet-dev/unilet/vmm/manager"
	"github.com/unilet-dev/unilet/vmm/templates"
)

// Template creation (Kraftlet's instance templates, on this node): the
// image boots once, in a network namespace of its own whose tap is the
// guest network's gateway (the guest network is what every pod's guest
// sees, so clones keep a working network), with its RAM in a shared memfd;
// once its console matches the ready pattern (or the ready delay passed)
// the shim saves its device state and RAM, the VM ends and the template is
// published under its name.

// Bounds of a template creation.
const (
	DefaultTemplateTimeout = 60 * time.Second
	MaxTemplateTimeout     = 10 * time.Minute
	// templatePoll is how often the console is read for the ready pattern.
	templatePoll = 10 * time.Millisecond
)

// CreateTemplate boots an image once and saves it as a template.
func (s *Service) CreateTemplate(ctx context.Context, r *admin.CreateTemplateRequest) (*admin.Template, error) {
	if s.cfg.Templates == nil {
		return nil, errorf(errdefs.ErrUnavailable, "templates are off on this node")
	}
	name := r.GetName()
	if err := templates.CheckName(name); err != nil {
		return nil, errorf(errdefs.ErrInvalidArgument, "%v", err)
	}
	if s.cfg.Templates.Exists(name) {
		return nil, errorf(errdefs.ErrAlreadyExists, "template %q exists; remove it first (uniletctl template rm %s)", name, name)
	}
	img, err := s.images.Get(r.GetImage())
	if err != nil {
		return nil, errorf(errdefs.ErrNotFound, "image %q: %v (pull it first, e.g. crictl pull)", r.GetImage(), err)
	}
	var ready *regexp.Regexp
	switch {
	case r.GetReadyLog() != "" && r.GetReadyAfterMs() > 0:
		return nil, errorf(errdefs.ErrInvalidArgument, "give either a ready pattern or a ready delay, not both")
	case r.GetReadyLog() != "":
		if ready, err = regexp.Compile(r.GetReadyLog()); err != nil {
			return nil, errorf(errdefs.ErrInvalidArgument, "ready pattern %q: %v", r.GetReadyLog(), err)
		}
	case r.GetReadyAfterMs() <= 0:
		return nil, errorf(errdefs.ErrInvalidArgument, "give a ready pattern (--ready-log) or a ready delay (--ready-after)")
	}
	timeout := time.Duration(r.GetTimeoutMs()) * time.Millisecond
	if timeout <= 0 {
		timeout = DefaultTemplateTimeout
	}
	if timeout > MaxTemplateTimeout || time.Duration(r.GetReadyAfterMs())*time.Millisecond >= timeout {
		return nil, errorf(errdefs.ErrInvalidArgument, "the timeout must exceed the ready delay and be at most %s", MaxTemplateTimeout)
	}
	machine, args, env, err := s.templateMachine(r, img)
	if err != nil {
		return nil, errorf(errdefs.ErrInvalidArgument, "template %q: %v", name, err)
	}
	log := logrus.WithFields(logrus.Fields{"template": name, "image": img.ID})

	var undo []func()
	defer func() {
		for i := len(undo) - 1; i >= 0; i-- {
			undo[i]()
		}
	}()
	id := newID()
	nsPath, err := netns.Create(s.cfg.NetNSDir, templateNetNS(id))
	if err != nil {
		return nil, errorf(errdefs.ErrInternal, "template network namespace: %v", err)
	}
	undo = append(undo, func() { _ = netns.Remove(nsPath) })
	if err := vmnet.SetupGuestTap(nsPath, vmnet.TapName(0), s.cfg.GuestNet); err != nil {
		return nil, errorf(errdefs.ErrInternal, "template tap: %v", err)
	}
	machine.NICs = []vmm.NIC{{Tap: vmnet.TapName(0), NetNS: nsPath, MAC: s.cfg.GuestNet.MAC}}
	staged, err := s.cfg.Templates.Stage(name)
	if err != nil {
		return nil, errorf(errdefs.ErrInternal, "stage template %q: %v", name, err)
	}
	undo = append(undo, func() { _ = os.RemoveAll(staged) }) // harmless once published (renamed away)
	logPath := filepath.Join(staged, "console.log")
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	vm, _, err := s.vms.Start(ctx, manager.StartSpec{ID: id, Machine: machine, LogPath: logPath})
	if err != nil {
		return nil, errorf(errdefs.ErrUnknown, "boot the template VM: %v", err)
	}
	undo = append(undo, func() {
		sctx, scancel := context.WithTimeout(context.Background(), manager.StopGrace)
		_, _ = vm.Stop(sctx, 0)
		scancel()
		if err := s.vms.Release(id, vm, ""); err != nil {
			log.WithError(err).Warn("clean up the template VM")
		}
	})
	if err := waitReady(ctx, vm, logPath, ready, time.Duration(r.GetReadyAfterMs())*time.Millisecond); err != nil {
		return nil, errorf(errdefs.ErrDeadlineExceeded, "template %q: %v; its console is in %s until this call returns", name, err, logPath)
	}
	sctx, scancel := context.WithTimeout(context.Background(), vmm.SnapshotTimeout+manager.CallTimeout)
	_, _, err = vm.Snapshot(sctx, staged)
	scancel()
	if err != nil {
		return nil, errorf(errdefs.ErrInternal, "save template %q: %v", name, err)
	}
	t := templates.Template{Name: name, ImageID: img.ID, ImageRef: r.GetImage(), Created: time.Now().UTC(), Args: args, Env: env,
		Machine: machine, GuestAddr: s.cfg.GuestNet.Addr.String(), QEMU: qemuIdentity(s.cfg.QEMU)}
	t.Machine.NICs = nil // a clone's NIC is its pod's
	if err := s.cfg.Templates.Commit(staged, t); err != nil {
		if errors.Is(err, templates.ErrExists) {
			return nil, errorf(errdefs.ErrAlreadyExists, "template %q was made meanwhile", name)
		}
		return nil, errorf(errdefs.ErrInternal, "publish template %q: %v", name, err)
	}
	s.warm.poke()
	t, err = s.cfg.Templates.Get(name)
	if err != nil {
		return nil, errorf(errdefs.ErrInternal, "read template %q back: %v", name, err)
	}
	log.WithFields(logrus.Fields{"stateBytes": t.StateSize, "ramBytes": t.RAMSize}).Info("template saved")
	return s.templateInfo(t), nil
}

// templateNetNS names the namespace a template VM boots in (not a pod's:
// the namespace sweep leaves it; removed when the creation returns).
func templateNetNS(id string) string { return "unilet-template-" + id[:12] }

// templateMachine builds the VM of a template: the image with the
// request's arguments, environment and sizes, the guest network's address,
// RAM in a shared file. Volumes are not part of templates.
func (s *Service) templateMachine(r *admin.CreateTemplateRequest, img *image.Image) (vmm.MachineConfig, []string, []string, error) {
	minMiB, _ := strconv.Atoi(img.Labels[LabelMinMemory])
	size, err := Size(nil, PodTuning{MemoryMiB: int(r.GetMemoryMib()), VCPUs: int(r.GetVcpus())}, minMiB, s.cfg.Limits)
	if err != nil {
		return vmm.MachineConfig{}, nil, nil, err
	}
	args := r.GetArgs()
	if len(args) == 0 {
		args = img.Cmd
	}
	env := append([]string{}, img.Env...)
	for _, kv := range r.GetEnv() {
		if k, _, ok := strings.Cut(kv, "="); !ok || k == "" {
			return vmm.MachineConfig{}, nil, nil, fmt.Errorf("environment %q: want K=V", kv)
		}
		env = append(env, kv)
	}
	env = dedupEnv(env)
	features := vmm.NewFeatures(img.Features)
	var params []string
	if features.Has(FeatureNetdev) {
		if len(r.GetDns()) > 2 {
			return vmm.MachineConfig{}, nil, nil, errors.New("at most 2 DNS servers")
		}
		var search []string
		if r.GetSearch() != "" {
			search = []string{r.GetSearch()}
		}
		g := s.cfg.GuestNet
		p, err := NetdevParam(&cni.Result{IPs: []string{g.Addr.String()}, DNS: r.GetDns(), Search: search}, &g, r.GetHostname(), nil)
		if err != nil {
			return vmm.MachineConfig{}, nil, nil, err
		}
		params = append(params, p)
	}
	line, _, err := vmm.BuildCmdline(vmm.GuestConfig{KernelName: img.Kernel, Params: params, Env: env, Args: args, Features: features})
	if err != nil {
		return vmm.MachineConfig{}, nil, nil, err
	}
	m := vmm.MachineConfig{Name: "template_" + r.GetName(), Accel: s.cfg.Accel, Machine: vmm.MachinePC,
		MemoryMiB: size.MemoryMiB, VCPUs: size.VCPUs, Kernel: img.Kernel, Initrd: img.Initrd, Cmdline: line,
		RAM: &vmm.RAMBacking{Shared: true}}
	return m, args, env, m.Validate()
}

// waitReady waits until the console log at path matches ready (a CRI log:
// each line's text is matched) or, without a pattern, until after passed.
func waitReady(ctx context.Context, vm manager.VM, path string, ready *regexp.Regexp, after time.Duration) error {
	var deadline <-chan time.Time
	if ready == nil {
		deadline = time.After(after)
	}
	tick := time.NewTicker(templatePoll)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return fmt.Errorf("the VM was not ready in time (%v)", ctx.Err())
		case <-vm.Done():
			return fmt.Errorf("the VM ended before it was ready: %s %s", vm.Exit().Reason, vm.Exit().Message)
		case <-deadline:
			return nil
		case <-tick.C:
			if ready != nil {
				if b, err := os.ReadFile(path); err == nil && ready.Match(consoleText(b)) {
					return nil
				}
			}
		}
	}
}

// consoleText is the console's text in a CRI log: each line without its
// timestamp, stream and tag; partial lines joined.
func consoleText(b []byte) []byte {
	var out bytes.Buffer
	for _, l := range bytes.Split(b, []byte("\n")) {
		f := bytes.SplitN(l, []byte(" "), 4)
		if len(f) < 4 {
			continue
		}
		out.Write(f[3])
		if string(f[2]) == "F" {
			out.WriteByte('\n')
		}
	}
	return out.Bytes()
}

// qemuIdentity identifies the QEMU binary (path, size, mtime).
func qemuIdentity(path string) string {
	st, err := os.Stat(path)
	if err != nil {
		return path
	}
	return fmt.Sprintf("%s %d %d", path, st.Size(), st.ModTime().Unix())
}

func (s *Service) templateInfo(t templates.Template) *admin.Template {
	var disk int64
	for _, f := range []string{templates.StateFile, templates.RAMFile} {
		disk += diskUsage(filepath.Join(s.cfg.Templates.Dir(t.Name), f))
	}
	return &admin.Template{Name: t.Name, ImageId: t.ImageID, ImageRef: t.ImageRef, CreatedUnix: t.Created.Unix(),
		StateBytes: t.StateSize, RamBytes: t.RAMSize, DiskBytes: disk, Uses: t.Uses, MemoryMib: int32(t.Machine.MemoryMiB),
		Vcpus: int32(t.Machine.VCPUs), Args: t.Args, GuestAddress: t.GuestAddr, Warm: int32(s.warm.count(t.Name))}
}

// ListTemplates lists the templates.
func (s *Service) ListTemplates(ctx context.Context, r *admin.ListTemplatesRequest) (*admin.ListTemplatesResponse, error) {
	if s.cfg.Templates == nil {
		return &admin.ListTemplatesResponse{}, nil
	}
	list, err := s.cfg.Templates.List()
	if err != nil {
		return nil, errorf(errdefs.ErrInternal, "list templates: %v", err)
	}
	out := &admin.ListTemplatesResponse{}
	for _, t := range list {
		out.Templates = append(out.Templates, s.templateInfo(t))
	}
	return out, nil
}

// RemoveTemplate removes a template; clones running from it go on.
func (s *Service) RemoveTemplate(ctx context.Context, r *admin.RemoveTemplateRequest) (*admin.RemoveTemplateResponse, error) {
	if s.cfg.Templates == nil {
		return nil, errorf(errdefs.ErrNotFound, "template %q: templates are off on this node", r.GetName())
	}
	if err := s.cfg.Templates.Remove(r.GetName()); err != nil {
		if errors.Is(err, templates.ErrNotFound) {
			return nil, errorf(errdefs.ErrNotFound, "%v", err)
		}
		return nil, errorf(errdefs.ErrInvalidArgument, "%v", err)
	}
	s.warm.poke() // its warm clones go
	logrus.WithField("template", r.GetName()).Info("template removed")
	return &admin.RemoveTemplateResponse{}, nil
}

// diskUsage is the space the file at path takes on disk (0 if unreadable).
func diskUsage(path string) int64 {
	var st unix.Stat_t
	if unix.Stat(path, &st) != nil {
		return 0
	}
	return st.Blocks * 512
}
