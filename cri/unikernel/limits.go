package unikernel

import (
	"fmt"
	"unicode/utf8"

	"google.golang.org/protobuf/proto"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// Request limits for unikernel pods and containers (docs/security.md). Every
// config is kept in meta.db and returned by lists, so none may be large: two
// pods with 15 MiB of annotations made one ListPodSandbox answer larger than
// a CRI client accepts. Kubernetes' own API bounds annotations to 256 KiB.
const (
	MaxMapBytes    = 256 << 10 // annotations, labels: keys + values
	MaxEnv         = 1024      // environment variables of a container
	MaxArgs        = 1024      // command + args of a container
	MaxMounts      = 64        // mounts of a container
	MaxConfigBytes = 1 << 20   // a whole pod or container config, encoded
	// MaxNameLen bounds pod name, namespace and UID (they reach CNI).
	MaxNameLen = 253
)

func mapBytes(m map[string]string) int {
	n := 0
	for k, v := range m {
		n += len(k) + len(v)
	}
	return n
}

func checkMap(what string, m map[string]string) error {
	if n := mapBytes(m); n > MaxMapBytes {
		return fmt.Errorf("%s take %d bytes (keys and values); the limit is %d", what, n, MaxMapBytes)
	}
	return nil
}

// checkCNIValue: pod name, namespace and UID become CNI_ARGS
// ("K=V;K=V"): a '=', ';' or control character there makes every CNI ADD
// and DEL of the pod fail, so the pod could never be torn down.
func checkCNIValue(what, v string) error {
	if len(v) > MaxNameLen {
		return fmt.Errorf("%s is %d bytes long; the limit is %d", what, len(v), MaxNameLen)
	}
	if !utf8.ValidString(v) {
		return fmt.Errorf("%s is not valid UTF-8", what)
	}
	for _, r := range v {
		if r < 0x21 || r == 0x7f || r == '=' || r == ';' || r == ',' {
			return fmt.Errorf("%s %q holds %q: not allowed in a pod's name, namespace or UID (they are passed to CNI as K=V;K=V)", what, v, r)
		}
	}
	return nil
}

// checkSandboxConfig bounds a unikernel pod's config.
func checkSandboxConfig(cfg *runtimeapi.PodSandboxConfig) error {
	md := cfg.GetMetadata()
	for _, f := range []struct{ what, v string }{{"the pod name", md.GetName()}, {"the namespace", md.GetNamespace()}, {"the pod UID", md.GetUid()}} {
		if err := checkCNIValue(f.what, f.v); err != nil {
			return err
		}
	}
	if err := checkMap("the pod's annotations", cfg.GetAnnotations()); err != nil {
		return err
	}
	if err := checkMap("the pod's labels", cfg.GetLabels()); err != nil {
		return err
	}
	if n := proto.Size(cfg); n > MaxConfigBytes {
		return fmt.Errorf("the pod config is %d bytes encoded; the limit is %d", n, MaxConfigBytes)
	}
	return nil
}

// checkContainerConfig bounds a unikernel container's config.
func checkContainerConfig(cfg *runtimeapi.ContainerConfig) error {
	if err := checkMap("the container's annotations", cfg.GetAnnotations()); err != nil {
		return err
	}
	if err := checkMap("the container's labels", cfg.GetLabels()); err != nil {
		return err
	}
	if n := len(cfg.GetEnvs()); n > MaxEnv {
		return fmt.Errorf("the container has %d environment variables; the limit is %d", n, MaxEnv)
	}
	if n := len(cfg.GetCommand()) + len(cfg.GetArgs()); n > MaxArgs {
		return fmt.Errorf("the container has %d command and args entries; the limit is %d", n, MaxArgs)
	}
	if n := len(cfg.GetMounts()); n > MaxMounts {
		return fmt.Errorf("the container has %d mounts; the limit is %d", n, MaxMounts)
	}
	if n := proto.Size(cfg); n > MaxConfigBytes {
		return fmt.Errorf("the container config is %d bytes encoded; the limit is %d", n, MaxConfigBytes)
	}
	return nil
}
