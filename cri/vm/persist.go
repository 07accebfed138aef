package vm

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/sirupsen/logrus"
	"google.golang.org/protobuf/proto"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/image"
	"github.com/unilet-dev/unilet/pkg/cgroups"
	"github.com/unilet-dev/unilet/pkg/cni"
	"github.com/unilet-dev/unilet/runtime"
	"github.com/unilet-dev/unilet/runtime/shim"
	"github.com/unilet-dev/unilet/runtime/shim/api"
)

// ReasonVMLost is reported for a container whose VM was running when the
// daemon went away: this version cannot re-attach to it.
const ReasonVMLost = "VMLost"

type sandboxRecord struct {
	ID         string      `json:"id"`
	Config     []byte      `json:"config"`
	Handler    string      `json:"handler,omitempty"`
	CreatedAt  time.Time   `json:"createdAt"`
	State      int32       `json:"state"`
	NetNS      string      `json:"netns,omitempty"`
	Net        *cni.Result `json:"net,omitempty"`
	MAC        string      `json:"mac,omitempty"`
	NetPending bool        `json:"netPending,omitempty"`
}

type containerRecord struct {
	ID        string                `json:"id"`
	SandboxID string                `json:"sandboxId"`
	Config    []byte                `json:"config"`
	ImageID   string                `json:"imageId"`
	ImageRef  string                `json:"imageRef"`
	LogPath   string                `json:"logPath,omitempty"`
	CreatedAt time.Time             `json:"createdAt"`
	StartedAt time.Time             `json:"startedAt,omitempty"`
	State     int32                 `json:"state"`
	Exit      runtime.ExitStatus    `json:"exit"`
	Machine   runtime.MachineConfig `json:"machine"`
	VMDir     string                `json:"vmDir"`
	Warnings  []string              `json:"warnings,omitempty"`
	Pid       int                   `json:"pid,omitempty"`
	Sizing    Sizing                `json:"sizing"`
	Cgroup    string                `json:"cgroup,omitempty"`
}

// saveSandbox persists sb; caller holds s.mu.
func (s *Service) saveSandbox(sb *sandbox) {
	if s.meta == nil {
		return
	}
	cfg, _ := proto.Marshal(sb.config)
	rec := sandboxRecord{ID: sb.id, Config: cfg, Handler: sb.handler, CreatedAt: sb.createdAt, State: int32(sb.state),
		NetNS: sb.netns, Net: sb.net, MAC: sb.mac, NetPending: sb.netPending}
	if err := s.meta.PutSandbox(sb.id, rec); err != nil {
		logrus.WithError(err).WithField("sandbox", sb.id).Error("persist sandbox")
	}
}

// saveContainer persists c; caller holds s.mu.
func (s *Service) saveContainer(c *container) {
	if s.meta == nil {
		return
	}
	cfg, _ := proto.Marshal(c.config)
	rec := containerRecord{ID: c.id, SandboxID: c.sandboxID, Config: cfg, ImageID: c.image.ID, ImageRef: c.imageRef, LogPath: c.logPath,
		CreatedAt: c.createdAt, StartedAt: c.startedAt, State: int32(c.state), Exit: c.exit, Machine: c.machine, VMDir: c.vmDir, Warnings: c.warnings,
		Sizing: c.sizing, Cgroup: c.cgroup}
	if c.vm != nil {
		rec.Pid = c.vm.Pid()
	}
	if err := s.meta.PutContainer(c.id, rec); err != nil {
		logrus.WithError(err).WithField("container", c.id).Error("persist container")
	}
}

func (s *Service) forgetSandbox(id string) {
	if s.meta != nil {
		if err := s.meta.DeleteSandbox(id); err != nil {
			logrus.WithError(err).WithField("sandbox", id).Error("delete sandbox record")
		}
	}
}

func (s *Service) forgetContainer(id string) {
	if s.meta != nil {
		if err := s.meta.DeleteContainer(id); err != nil {
			logrus.WithError(err).WithField("container", id).Error("delete container record")
		}
	}
}

// Load restores sandboxes and containers recorded by an earlier daemon.
// Containers whose VM was running are reported EXITED with reason VMLost
// (and a surviving QEMU of theirs is stopped, never left running unmanaged).
func (s *Service) Load() error {
	if s.meta == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	err := s.meta.EachSandbox(func(v []byte) error {
		var rec sandboxRecord
		if err := json.Unmarshal(v, &rec); err != nil {
			return err
		}
		cfg := &runtimeapi.PodSandboxConfig{}
		if err := proto.Unmarshal(rec.Config, cfg); err != nil {
			return fmt.Errorf("sandbox %s: %w", rec.ID, err)
		}
		s.sandboxes[rec.ID] = &sandbox{id: rec.ID, config: cfg, handler: rec.Handler, createdAt: rec.CreatedAt,
			state: runtimeapi.PodSandboxState(rec.State), netns: rec.NetNS, net: rec.Net, mac: rec.MAC, netPending: rec.NetPending}
		return nil
	})
	if err != nil {
		return fmt.Errorf("load sandboxes: %w", err)
	}
	// Read every record first: writing to the store from inside its read
	// transaction deadlocks once the file has to grow.
	var raws [][]byte
	if err := s.meta.EachContainer(func(v []byte) error {
		raws = append(raws, append([]byte(nil), v...))
		return nil
	}); err != nil {
		return fmt.Errorf("load containers: %w", err)
	}
	var lost []*container
	for _, v := range raws {
		if err := s.loadContainer(v, &lost); err != nil {
			return fmt.Errorf("load containers: %w", err)
		}
	}
	s.reapOrphanVMDirs()
	for _, c := range lost {
		s.releaseCgroup(c)
		s.saveContainer(c)
		logrus.WithFields(logrus.Fields{"sandbox": c.sandboxID, "container": c.id, "reason": c.exit.Reason}).Warn("container's VM ended while the daemon was away; reported as exited")
	}
	// Staged shims did not survive the earlier daemon (the pool reaps idle
	// shims): remove their staging cgroups.
	if s.cfg.CgroupRoot != "" {
		for _, sb := range s.sandboxes {
			if p, err := cgroups.Path(sb.config.GetLinux().GetCgroupParent(), s.cfg.CgroupRoot, stageName(sb.id)); err == nil {
				if cg, err := cgroups.Load(p); err == nil {
					_ = cg.Delete()
				}
			}
		}
	}
	// A stop the earlier daemon did not finish: retry its CNI DEL now.
	for _, sb := range s.sandboxes {
		if sb.state == runtimeapi.PodSandboxState_SANDBOX_READY || !sb.netPending {
			continue
		}
		if err := s.teardownNetwork(context.Background(), sb); err != nil {
			logrus.WithError(err).WithField("sandbox", sb.id).Warn("retrying the network teardown of a stopped pod failed; StopPodSandbox retries it")
			continue
		}
		s.saveSandbox(sb)
		logrus.WithField("sandbox", sb.id).Info("finished the network teardown of a pod stopped before the restart")
	}
	logrus.WithFields(logrus.Fields{"sandboxes": len(s.sandboxes), "containers": len(s.containers)}).Debug("restored unikernel pod state")
	return nil
}

// reapOrphanVMDirs ends VMs whose directory has no container record (a
// crash between launching a shim and recording it): their shim is told to
// kill the VM and exit, and the directory goes. Caller holds s.mu.
func (s *Service) reapOrphanVMDirs() {
	root := filepath.Join(s.cfg.StateDir, "vm")
	ents, err := os.ReadDir(root)
	if err != nil {
		return
	}
	known := map[string]bool{}
	for _, c := range s.containers {
		known[filepath.Base(c.vmDir)] = true
	}
	for _, e := range ents {
		if known[e.Name()] {
			continue
		}
		dir := filepath.Join(root, e.Name())
		if h := reconnect(dir); h != nil {
			logrus.WithFields(logrus.Fields{"dir": dir, "pid": h.Pid()}).Warn("stopping a VM that has no container record")
			h.Stop(0)
			h.Release()
		}
		_ = os.RemoveAll(dir)
	}
}

// reconnect connects to the shim of a VM directory, or returns nil.
func reconnect(vmDir string) vmHandle {
	c, err := shim.Connect(vmDir)
	if err != nil {
		return nil
	}
	h, err := shim.NewHandle(c)
	if err != nil {
		// A shim that never started its VM (the daemon died mid-start): end it.
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, _ = c.Shutdown(ctx, &api.ShutdownRequest{})
		cancel()
		c.Close()
		return nil
	}
	return h
}

// loadContainer restores one container record; caller holds s.mu.
func (s *Service) loadContainer(v []byte, lostOut *[]*container) error {
	var rec containerRecord
	if err := json.Unmarshal(v, &rec); err != nil {
		return err
	}
	cfg := &runtimeapi.ContainerConfig{}
	if err := proto.Unmarshal(rec.Config, cfg); err != nil {
		return fmt.Errorf("container %s: %w", rec.ID, err)
	}
	img, err := s.images.Get(rec.ImageID)
	if err != nil {
		img = &image.Image{ID: rec.ImageID}
	}
	c := &container{id: rec.ID, sandboxID: rec.SandboxID, config: cfg, image: img, imageRef: rec.ImageRef, logPath: rec.LogPath,
		createdAt: rec.CreatedAt, startedAt: rec.StartedAt, state: runtimeapi.ContainerState(rec.State), exit: rec.Exit,
		machine: rec.Machine, vmDir: rec.VMDir, warnings: rec.Warnings, sizing: rec.Sizing, cgroup: rec.Cgroup}
	inFlight := c.state == runtimeapi.ContainerState_CONTAINER_RUNNING || c.state == runtimeapi.ContainerState_CONTAINER_UNKNOWN
	if inFlight {
		if h := reconnect(c.vmDir); h != nil {
			// A StartContainer the earlier daemon did not finish ends here as RUNNING.
			c.vm, c.state, c.startedAt = h, runtimeapi.ContainerState_CONTAINER_RUNNING, h.StartedAt()
			s.saveContainer(c)
			s.containers[rec.ID] = c
			s.refresh(c)
			logrus.WithFields(logrus.Fields{"sandbox": c.sandboxID, "container": c.id, "pid": h.Pid()}).Info("reconnected to running VM")
			return nil
		}
		if st, ok := shim.ReadExit(c.vmDir); ok {
			// The VM ended (and its shim went away) while the daemon was down.
			c.state, c.exit = runtimeapi.ContainerState_CONTAINER_EXITED, st
			_ = os.RemoveAll(c.vmDir)
			s.containers[rec.ID] = c
			*lostOut = append(*lostOut, c)
			return nil
		}
	}
	if c.state == runtimeapi.ContainerState_CONTAINER_RUNNING || c.state == runtimeapi.ContainerState_CONTAINER_UNKNOWN {
		if rec.Pid > 0 {
			logrus.WithField("pid", rec.Pid).Warn("stopping a VM left running without its supervisor")
			shim.KillIfQEMU(rec.Pid, rec.Machine.QMPSocket)
		}
		c.state = runtimeapi.ContainerState_CONTAINER_EXITED
		c.exit = runtime.ExitStatus{Code: 255, Reason: ReasonVMLost, FinishedAt: time.Now(),
			Message: "unilet restarted while this VM was running; this version cannot re-attach to VMs, so the VM was stopped"}
		_ = os.RemoveAll(c.vmDir)
		*lostOut = append(*lostOut, c)
	}
	s.containers[rec.ID] = c
	return nil
}
