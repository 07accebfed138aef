package main

import (
	"fmt"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// KubeRow is pod create → Running through a real kubelet (e2e cluster).
type KubeRow struct {
	Unikernel, Plain Summary
	Note             string
}

// measureKube brings up the e2e cluster (when its binaries are built) and
// times `kubectl create` → phase Running for a unikernel pod and for a plain
// busybox pod (containerd behind unilet), interleaved. Resolution: the 20 ms
// poll of kubectl.
func measureKube(o options, res *Results) error {
	repo, _ := os.Getwd()
	kubeBin := filepath.Join(repo, "_output", "kube", "bin")
	if _, err := os.Stat(filepath.Join(kubeBin, "kubelet")); err != nil {
		res.Details.Kube = &KubeRow{Note: "skipped: Kubernetes binaries not built (make kube-bins)"}
		log.Printf("  skipped (make kube-bins builds the cluster)")
		return nil
	}
	dir, err := os.MkdirTemp("", "unilet-bench-kube-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	bin := filepath.Join(dir, "bin")
	if err := sh(repo, "go", "build", "-o", bin+"/", "./cmd/unilet", "./cmd/unilet-shim", "./cmd/unilet-jail", "./cmd/uniletctl", "./e2e/kube/cluster"); err != nil {
		return err
	}
	cdir := filepath.Join(dir, "cluster")
	// Down also after a failed or half-done up: nothing it started stays.
	defer func() { _ = exec.Command(filepath.Join(bin, "cluster"), "down", "--dir", cdir).Run() }()
	up := exec.Command(filepath.Join(bin, "cluster"), "up", "--dir", cdir, "--kube-bin", kubeBin, "--unilet-bin", bin, "--repo", repo)
	if out, err := up.CombinedOutput(); err != nil {
		return fmt.Errorf("cluster up: %v\n%s", err, out)
	}
	kernel := filepath.Join(dir, "testkernel.elf")
	if err := sh(repo, "./e2e/guest/testkernel/build.sh", kernel); err != nil {
		return err
	}
	if err := sh(repo, filepath.Join(bin, "uniletctl"), "pack", "--kernel", kernel, "--push", "127.0.0.1:5000/unikraft/bench:1", "--insecure"); err != nil {
		return err
	}
	kubectl := func(args ...string) (string, error) {
		out, err := exec.Command(filepath.Join(kubeBin, "kubectl"), append([]string{"--kubeconfig", filepath.Join(cdir, "kubeconfig")}, args...)...).CombinedOutput()
		return strings.TrimSpace(string(out)), err
	}
	manifest := func(name string, vm bool) string {
		if vm {
			return fmt.Sprintf(`{"apiVersion":"v1","kind":"Pod","metadata":{"name":%q,"annotations":{"kubernetes.io/target-runtime":"unikraft"}},
"spec":{"automountServiceAccountToken":false,"enableServiceLinks":false,"containers":[{"name":"app","image":"127.0.0.1:5000/unikraft/bench:1","args":["tick=60000"]}]}}`, name)
		}
		return fmt.Sprintf(`{"apiVersion":"v1","kind":"Pod","metadata":{"name":%q},"spec":{"automountServiceAccountToken":false,"enableServiceLinks":false,
"containers":[{"name":"sh","image":"unilet.test/busybox:1","imagePullPolicy":"Never","command":["/bin/sleep","3600"]}]}}`, name)
	}
	run := func(name string, vm bool) (float64, error) {
		f := filepath.Join(dir, name+".json")
		if err := os.WriteFile(f, []byte(manifest(name, vm)), 0o644); err != nil {
			return 0, err
		}
		t0 := time.Now()
		if out, err := kubectl("create", "-f", f); err != nil {
			return 0, fmt.Errorf("%v: %s", err, out)
		}
		for deadline := time.Now().Add(2 * time.Minute); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			if phase, _ := kubectl("get", "pod", name, "-o", "jsonpath={.status.phase}"); phase == "Running" {
				d := ms(time.Since(t0))
				_, _ = kubectl("delete", "pod", name, "--wait=false")
				return d, nil
			}
		}
		return 0, fmt.Errorf("pod %s never ran", name)
	}
	// Warm-up: image pulls, first pods.
	for _, vm := range []bool{true, false} {
		if _, err := run(fmt.Sprintf("warm-%v", vm), vm); err != nil {
			return err
		}
	}
	n := 5
	if !o.quick {
		n = 10
	}
	var u, p []float64
	for i := 0; i < n; i++ {
		d, err := run(fmt.Sprintf("vm-%d", i), true)
		if err != nil {
			return err
		}
		u = append(u, d)
		d, err = run(fmt.Sprintf("plain-%d", i), false)
		if err != nil {
			return err
		}
		p = append(p, d)
	}
	res.Details.Kube = &KubeRow{Unikernel: summarize(u), Plain: summarize(p)}
	log.Printf("  unikernel pod %.0f ms, plain pod %.0f ms (p50)", res.Details.Kube.Unikernel.P50, res.Details.Kube.Plain.P50)
	return nil
}
