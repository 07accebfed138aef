package unikernel

import (
	"context"
	"strconv"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

func nowNano() int64 { return time.Now().UnixNano() }

// Version reports the CRI API and runtime versions.
func (s *Service) Version(ctx context.Context, r *runtimeapi.VersionRequest) (*runtimeapi.VersionResponse, error) {
	return &runtimeapi.VersionResponse{Version: "0.1.0", RuntimeName: RuntimeName, RuntimeVersion: s.cfg.Version, RuntimeApiVersion: "v1"}, nil
}

// Status reports runtime and network readiness of the unikernel side.
func (s *Service) Status(ctx context.Context, r *runtimeapi.StatusRequest) (*runtimeapi.StatusResponse, error) {
	netCond := &runtimeapi.RuntimeCondition{Type: runtimeapi.NetworkReady, Status: true}
	if s.cfg.Network != nil {
		if err := s.cfg.Network.Status(); err != nil {
			netCond.Status, netCond.Reason, netCond.Message = false, "NetworkPluginNotReady", "unilet: "+err.Error()
		}
	}
	resp := &runtimeapi.StatusResponse{Status: &runtimeapi.RuntimeStatus{Conditions: []*runtimeapi.RuntimeCondition{
		{Type: runtimeapi.RuntimeReady, Status: true}, netCond,
	}}}
	if r.GetVerbose() {
		resp.Info = map[string]string{"accel": s.cfg.Accel, "qemu": s.cfg.QEMU}
		if n := s.vms.PoolIdle(); n >= 0 { // idle pre-forked shims (refilled once starts pause)
			resp.Info["shimPoolIdle"] = strconv.Itoa(n)
		}
	}
	return resp, nil
}

// RuntimeConfig reports the cgroup driver.
func (s *Service) RuntimeConfig(ctx context.Context, r *runtimeapi.RuntimeConfigRequest) (*runtimeapi.RuntimeConfigResponse, error) {
	return &runtimeapi.RuntimeConfigResponse{Linux: &runtimeapi.LinuxRuntimeConfiguration{CgroupDriver: runtimeapi.CgroupDriver_CGROUPFS}}, nil
}
