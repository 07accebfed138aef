package unikernel

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"

	"github.com/sirupsen/logrus"

	"github.com/unilet-dev/unilet/cri/errdefs"
	"github.com/unilet-dev/unilet/cri/store"
	"github.com/unilet-dev/unilet/pkg/cni"
	"github.com/unilet-dev/unilet/pkg/vmnet"
)

// AnnotationContainerPorts is the container annotation in which kubelet
// passes a container's declared ports (JSON, Kubernetes' ContainerPort
// list): CRI's container config has no ports of its own. A client other
// than kubelet declares a container's ports the same way.
const AnnotationContainerPorts = "io.kubernetes.container.ports"

// containerPort is what unilet reads of Kubernetes' ContainerPort.
type containerPort struct {
	ContainerPort int32  `json:"containerPort"`
	Protocol      string `json:"protocol"`
}

// ContainerPorts parses a container's declared ports (none without the
// annotation), each once, in order.
func ContainerPorts(annotations map[string]string) ([]vmnet.Port, error) {
	raw, ok := annotations[AnnotationContainerPorts]
	if !ok || raw == "" {
		return nil, nil
	}
	var decl []containerPort
	if err := json.Unmarshal([]byte(raw), &decl); err != nil {
		return nil, fmt.Errorf("annotation %s: not a JSON list of container ports: %v", AnnotationContainerPorts, err)
	}
	var out []vmnet.Port
	for _, d := range decl {
		if d.ContainerPort <= 0 || d.ContainerPort > 65535 {
			return nil, fmt.Errorf("annotation %s: containerPort %d is not a port", AnnotationContainerPorts, d.ContainerPort)
		}
		proto := strings.ToLower(d.Protocol)
		if proto == "" {
			proto = "tcp"
		}
		if proto != "tcp" && proto != "udp" && proto != "sctp" {
			return nil, fmt.Errorf("annotation %s: protocol %.16q is not TCP, UDP or SCTP", AnnotationContainerPorts, d.Protocol)
		}
		p := vmnet.Port{Proto: proto, Port: uint16(d.ContainerPort)}
		if !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	return out, nil
}

// tapOf is the index of c's VM's tap in the pod namespace (-1: no NIC).
func tapOf(c *container) int {
	nics := c.Meta().Machine.NICs
	if len(nics) == 0 {
		return -1
	}
	i, ok := vmnet.TapIndex(nics[0].Tap)
	if !ok {
		return -1
	}
	return i
}

// portsOf are c's declared ports (records are checked when read).
func portsOf(c *container) []vmnet.Port {
	p, _ := ContainerPorts(c.Meta().Config.GetAnnotations())
	return p
}

// assignTap gives a new container of sb, named name and declaring ports,
// the tap of its VM: the tap of earlier containers of the same name (a
// restart), else the lowest free one, created now. A port another
// container of the pod declares is InvalidArgument naming both. A pod made
// before routed networking has one tap. The caller holds sb.Lifecycle.
func (s *Service) assignTap(sb *sandbox, name string, ports []vmnet.Port) (int, error) {
	used := map[int]bool{}
	idx := -1
	for _, c := range s.containersOf(sb.ID()) {
		other := c.Meta().Config.GetMetadata().GetName()
		if other == name {
			idx = tapOf(c)
			continue
		}
		used[tapOf(c)] = true
		for _, p := range portsOf(c) {
			if slices.Contains(ports, p) {
				return 0, errorf(errdefs.ErrInvalidArgument, "container %q declares port %s, which container %q (%s) of the same pod declares too; "+
					"the pod's VMs share one pod IP, so a port can reach only one of them", name, p, other, c.ID())
			}
		}
	}
	if idx >= 0 {
		return idx, nil
	}
	if sb.Status().Guest == nil { // bridged: the one tap owns the pod IP
		return 0, nil
	}
	for idx = 0; used[idx]; idx++ {
	}
	if idx >= vmnet.MaxVMs {
		return 0, errorf(errdefs.ErrResourceExhausted, "pod %s has containers on all %d VM taps; remove exited containers first", sb.ID(), vmnet.MaxVMs)
	}
	if idx > 0 {
		if err := vmnet.AddTap(sb.Meta().NetNS, cni.IfName, idx, *sb.Status().Guest); err != nil {
			return 0, errorf(errdefs.ErrInternal, "prepare tap %s for container %q in pod %s: %v", vmnet.TapName(idx), name, sb.ID(), err)
		}
	}
	return idx, nil
}

// tapHolder returns the container of c's pod (other than c) whose VM runs
// or is starting on c's tap — an earlier attempt of the same container, or
// in a pod made before routed networking any VM. The caller holds the
// sandbox's lock.
func (s *Service) tapHolder(sb *sandbox, c *container) *container {
	tap := tapOf(c)
	if tap < 0 {
		return nil
	}
	for _, o := range s.containersOf(sb.ID()) {
		if o.ID() != c.ID() && o.Status().State.Live() && (tapOf(o) == tap || sb.Status().Guest == nil) {
			return o
		}
	}
	return nil
}

// errTapBusy explains why c cannot start while holder's VM runs.
func errTapBusy(sb *sandbox, c, holder *container) error {
	name, other := c.Meta().Config.GetMetadata().GetName(), holder.Meta().Config.GetMetadata().GetName()
	if sb.Status().Guest == nil {
		return errorf(errdefs.ErrFailedPrecondition, "container %q cannot run: pod %s was made before routed pod networking and runs one VM at a time "+
			"(container %q, %s, runs); recreate the pod to run several", name, sb.ID(), other, holder.ID())
	}
	return errorf(errdefs.ErrFailedPrecondition, "container %q cannot run: its attempt %d (%s) still runs; stop it first",
		name, holder.Meta().Config.GetMetadata().GetAttempt(), holder.ID())
}

// podRoutes is how the pod IP should reach sb's VMs now: each tap's
// declared ports (those of its newest container), anything else to the
// lowest tap whose VM runs (or is starting), else the lowest tap. The
// default VM's own ports need no rule and are left out, so a pod of one
// container routes as vmnet.Single.
func (s *Service) podRoutes(sb *sandbox) vmnet.Routes {
	newest := map[int]*container{}
	def := -1
	for _, c := range s.containersOf(sb.ID()) {
		i := tapOf(c)
		if i < 0 {
			continue
		}
		if n := newest[i]; n == nil || c.Meta().CreatedAt.After(n.Meta().CreatedAt) {
			newest[i] = c
		}
		if c.Status().State.Live() && (def < 0 || i < def) {
			def = i
		}
	}
	if _, ok := newest[0]; !ok {
		newest[0] = nil // tap 0 exists from the pod's start
	}
	var idx []int
	for i := range newest {
		idx = append(idx, i)
	}
	slices.Sort(idx)
	if def < 0 {
		def = idx[0]
	}
	r := vmnet.Routes{Default: def}
	for _, i := range idx {
		m := vmnet.Member{Index: i}
		if c := newest[i]; c != nil && i != def {
			m.Ports = portsOf(c)
		}
		r.Members = append(r.Members, m)
	}
	return r
}

// routePod brings the routing in sb's namespace in line with its
// containers (nothing if it is already). The caller holds sb.Lifecycle.
func (s *Service) routePod(sb *sandbox) error {
	st := sb.Status()
	if st.Guest == nil || sb.Meta().NetNS == "" || st.State != store.SandboxReady {
		return nil
	}
	r := s.podRoutes(sb)
	rt := sb.Meta().rt
	if rt.routes != nil && rt.routes.Equal(r) {
		return nil
	}
	if err := vmnet.Route(sb.Meta().NetNS, cni.IfName, *st.Guest, r); err != nil {
		return fmt.Errorf("route the pod IP to the pod's VMs: %w", err)
	}
	rt.routes = &r
	logrus.WithFields(logrus.Fields{"sandbox": sb.ID(), "default": vmnet.TapName(r.Default), "members": len(r.Members)}).Debug("pod routing updated")
	return nil
}

// reroute is routePod for a caller not holding sb.Lifecycle; a failure is
// logged (the next change retries).
func (s *Service) reroute(sandboxID string) {
	sb, err := s.sandboxes.Get(sandboxID)
	if err != nil {
		return
	}
	sb.Lifecycle.Lock()
	defer sb.Lifecycle.Unlock()
	if err := s.routePod(sb); err != nil {
		logrus.WithError(err).WithField("sandbox", sandboxID).Warn("update the pod's routing to its VMs")
	}
}
