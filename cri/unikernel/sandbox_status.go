package unikernel

import (
	"context"
	"net"
	"strings"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/cri/store"
	"github.com/unilet-dev/unilet/pkg/cni"
)

func sandboxToAPI(sb *sandbox) *runtimeapi.PodSandbox {
	m, st := sb.Meta(), sb.Status()
	return &runtimeapi.PodSandbox{
		Id: sb.ID(), Metadata: m.Config.GetMetadata(), State: st.State.CRI(), CreatedAt: m.CreatedAt.UnixNano(),
		Labels: m.Config.GetLabels(), Annotations: m.Config.GetAnnotations(), RuntimeHandler: m.Handler,
	}
}

// ips returns the pod's addresses without prefix length, primary first.
func ips(res *cni.Result) []string {
	if res == nil {
		return nil
	}
	var out []string
	for _, c := range res.IPs {
		if ip, _, err := net.ParseCIDR(c); err == nil {
			out = append(out, ip.String())
		}
	}
	return out
}

func primaryIP(res *cni.Result) string {
	if l := ips(res); len(l) > 0 {
		return l[0]
	}
	return ""
}

// PodSandboxStatus reports the pod and its IP addresses.
func (s *Service) PodSandboxStatus(ctx context.Context, r *runtimeapi.PodSandboxStatusRequest) (*runtimeapi.PodSandboxStatusResponse, error) {
	sb, err := s.getSandbox(r.GetPodSandboxId())
	if err != nil {
		return nil, err
	}
	m, cur := sb.Meta(), sb.Status()
	netStatus := &runtimeapi.PodSandboxNetworkStatus{}
	if l := ips(cur.Net); len(l) > 0 && cur.State == store.SandboxReady {
		netStatus.Ip = l[0]
		for _, ip := range l[1:] {
			netStatus.AdditionalIps = append(netStatus.AdditionalIps, &runtimeapi.PodIP{Ip: ip})
		}
	}
	st := &runtimeapi.PodSandboxStatus{
		Id: sb.ID(), Metadata: m.Config.GetMetadata(), State: cur.State.CRI(), CreatedAt: m.CreatedAt.UnixNano(),
		Network: netStatus,
		Linux:   &runtimeapi.LinuxPodSandboxStatus{Namespaces: &runtimeapi.Namespace{Options: m.Config.GetLinux().GetSecurityContext().GetNamespaceOptions()}},
		Labels:  m.Config.GetLabels(), Annotations: m.Config.GetAnnotations(), RuntimeHandler: m.Handler,
	}
	resp := &runtimeapi.PodSandboxStatusResponse{Status: st}
	if r.GetVerbose() {
		resp.Info = map[string]string{"runtime": "unilet-vm", "state": string(cur.State), "logDirectory": m.Config.GetLogDirectory(),
			"netns": m.NetNS, "mac": cur.MAC}
	}
	return resp, nil
}

// ListPodSandbox lists unikernel pods matching the filter.
func (s *Service) ListPodSandbox(ctx context.Context, r *runtimeapi.ListPodSandboxRequest) (*runtimeapi.ListPodSandboxResponse, error) {
	f := r.GetFilter()
	var out []*runtimeapi.PodSandbox
	for _, sb := range s.sandboxes.List() {
		if !sandboxMatches(sb, f.GetId(), f.GetLabelSelector()) {
			continue
		}
		api := sandboxToAPI(sb)
		if f.GetState() != nil && f.GetState().GetState() != api.State {
			continue
		}
		out = append(out, api)
	}
	return &runtimeapi.ListPodSandboxResponse{Items: out}, nil
}

// sandboxMatches applies the ID-prefix and label filters of CRI lists.
func sandboxMatches(sb *sandbox, idPrefix string, selector map[string]string) bool {
	return strings.HasPrefix(sb.ID(), idPrefix) && labelsMatch(sb.Meta().Config.GetLabels(), selector)
}

func labelsMatch(labels, selector map[string]string) bool {
	for k, v := range selector {
		if labels[k] != v {
			return false
		}
	}
	return true
}
