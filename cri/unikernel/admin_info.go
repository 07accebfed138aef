package unikernel

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/api/admin"
	"github.com/unilet-dev/unilet/vmm"
)

// ListUnikernelImages lists the unikernel images with their Unikraft details.
func (s *Service) ListUnikernelImages(ctx context.Context, r *admin.ListImagesRequest) (*admin.ListImagesResponse, error) {
	imgs, err := s.images.List()
	if err != nil {
		return nil, err
	}
	out := &admin.ListImagesResponse{}
	for _, img := range imgs {
		v := imageView(img)
		out.Images = append(out.Images, &admin.Image{Id: img.ID, Refs: img.RepoTags, Digests: img.RepoDigests, SizeBytes: img.Size,
			Cmd: img.Cmd, UnikraftVersion: v.UnikraftVersion, KernelBytes: v.KernelSize, InitrdBytes: v.InitrdSize, Architecture: "x86_64"})
	}
	return out, nil
}

// Info reports versions, the effective configuration, the accelerator and
// its probe, and where the daemon logs.
func (s *Service) Info(ctx context.Context, r *admin.InfoRequest) (*admin.InfoResponse, error) {
	out := &admin.InfoResponse{Version: s.cfg.Version, Accel: s.cfg.Accel, Config: s.cfg.Effective, StartedUnix: s.started.Unix(),
		KvmProbe: kvmProbe(s.cfg.StateDir, s.cfg.Accel), Qemu: s.cfg.QEMU}
	vctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if b, err := exec.CommandContext(vctx, s.cfg.QEMU, "--version").Output(); err == nil {
		out.Qemu += ": " + strings.SplitN(strings.TrimSpace(string(b)), "\n", 2)[0]
	}
	// The daemon's stderr: a file when an installer or unit redirects it.
	if p, err := os.Readlink("/proc/self/fd/2"); err == nil && filepath.IsAbs(p) {
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() {
			out.LogFile = p
		}
	}
	return out, nil
}

// kvmProbe says what the KVM probe found (vmm.ProbeVerdict).
func kvmProbe(stateDir, accel string) string {
	found, err := vmm.ProbeVerdict(stateDir)
	switch {
	case !found && accel == vmm.AccelTCG && errors.Is(err, os.ErrNotExist):
		return "not probed (--accel=tcg)"
	case !found:
		return "no verdict recorded: " + err.Error()
	case err != nil:
		return "KVM cannot run guests: " + err.Error()
	}
	return "KVM runs guests"
}

// redacted replaces secrets in DumpState's output.
const redacted = "<redacted>"

// DumpState returns the state database's records, environment values (and
// every string they appear in, such as guest command lines) and the
// last-applied-configuration annotation redacted; quarantined records are
// listed without their content.
func (s *Service) DumpState(ctx context.Context, r *admin.DumpStateRequest) (*admin.DumpStateResponse, error) {
	if s.meta == nil {
		return &admin.DumpStateResponse{Json: []byte("{}")}, nil
	}
	doc := map[string]any{}
	var sandboxes, containers []any
	err := s.meta.EachSandbox(func(k, v []byte) error {
		sandboxes = append(sandboxes, redactRecord(v, &runtimeapi.PodSandboxConfig{}))
		return nil
	})
	if err != nil {
		return nil, err
	}
	if err := s.meta.EachContainer(func(k, v []byte) error {
		containers = append(containers, redactRecord(v, &runtimeapi.ContainerConfig{}))
		return nil
	}); err != nil {
		return nil, err
	}
	doc["sandboxes"], doc["containers"] = sandboxes, containers
	if q, err := s.meta.Quarantine(); err == nil {
		var list []any
		for _, e := range q {
			list = append(list, map[string]any{"bucket": e.Bucket, "key": e.Key, "reason": e.Reason, "at": e.At, "content": "omitted"})
		}
		doc["quarantined"] = list
	}
	b, err := indentJSON(doc)
	return &admin.DumpStateResponse{Json: b}, err
}

// redactRecord decodes one record (its "config" a CRI config in protobuf,
// shown as JSON) and redacts it.
func redactRecord(raw []byte, cfg proto.Message) any {
	var rec map[string]any
	if err := json.Unmarshal(raw, &rec); err != nil {
		return map[string]any{"unreadable": err.Error()}
	}
	var secrets []string
	if enc, ok := rec["config"].(string); ok {
		if b, err := base64.StdEncoding.DecodeString(enc); err == nil && proto.Unmarshal(b, cfg) == nil {
			switch c := cfg.(type) {
			case *runtimeapi.ContainerConfig:
				for _, e := range c.GetEnvs() {
					if len(e.GetValue()) > 0 {
						secrets = append(secrets, string(e.GetValue()))
					}
					e.Value = nil
				}
				redactAnnotations(c.GetAnnotations())
			case *runtimeapi.PodSandboxConfig:
				redactAnnotations(c.GetAnnotations())
			}
			if j, err := protojson.Marshal(cfg); err == nil {
				var m map[string]any
				if json.Unmarshal(j, &m) == nil {
					if envs, ok := m["envs"].([]any); ok {
						for _, e := range envs {
							if kv, ok := e.(map[string]any); ok {
								kv["value"] = redacted
							}
						}
					}
					rec["config"] = m
				}
			}
		}
	}
	return redactStrings(rec, secrets)
}

// redactAnnotations blanks annotations that carry whole objects (kubectl's
// last-applied-configuration holds the pod's env values).
func redactAnnotations(a map[string]string) {
	for k := range a {
		if strings.Contains(k, "last-applied-configuration") {
			a[k] = redacted
		}
	}
}

// redactStrings replaces every secret inside every string of v.
func redactStrings(v any, secrets []string) any {
	switch t := v.(type) {
	case string:
		for _, sec := range secrets {
			t = strings.ReplaceAll(t, sec, redacted)
		}
		return t
	case map[string]any:
		for k, e := range t {
			t[k] = redactStrings(e, secrets)
		}
	case []any:
		for i, e := range t {
			t[i] = redactStrings(e, secrets)
		}
	}
	return v
}

// indentJSON is v as indented JSON, with <, > and & as they are (the
// documents are for people, not HTML).
func indentJSON(v any) ([]byte, error) {
	var b bytes.Buffer
	e := json.NewEncoder(&b)
	e.SetEscapeHTML(false)
	e.SetIndent("", "  ")
	err := e.Encode(v)
	return b.Bytes(), err
}
