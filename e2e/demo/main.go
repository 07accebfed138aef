// Command demo is `make demo` for the current stage of unilet. On temporary
// directories it builds the binaries and the repository's test unikernel,
// packs the kernel with `uniletctl pack` and pushes it to a loopback registry,
// starts the unilet daemon, then acts as a CRI client (as kubelet would):
// pulls the image, runs an annotated pod, creates and starts its container,
// waits for the VM to finish and prints the console log — then cleans up.
// A later stage turns this into a real single-node cluster.
package main

import (
	"context"
	"fmt"
	"io"
	"log"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/pkg/cgroups"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func step(format string, a ...any) { fmt.Printf(">> "+format+"\n", a...) }

func sh(name string, args ...string) error {
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	return cmd.Run()
}

func run() error {
	dir, err := os.MkdirTemp("", "unilet-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	bin := filepath.Join(dir, "bin")

	step("building unilet, unilet-shim and uniletctl")
	if err := sh("go", "build", "-o", bin+"/", "./cmd/unilet", "./cmd/uniletctl", "./cmd/unilet-shim", "./cmd/unilet-jail"); err != nil {
		return err
	}
	step("building the test unikernel (e2e/guest/testkernel)")
	kernel := filepath.Join(dir, "testkernel.elf")
	if err := sh("./e2e/guest/testkernel/build.sh", kernel); err != nil {
		return err
	}
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	defer srv.Close()
	u, _ := url.Parse(srv.URL)
	ref := u.Host + "/unikraft/demo:latest"
	step("packing it as a Unikraft OCI image and pushing to a loopback registry: %s", ref)
	if err := sh(filepath.Join(bin, "uniletctl"), "pack", "--kernel", kernel, "--arg", "hello", "--env", "FROM_IMAGE=yes",
		"--push", ref, "--insecure"); err != nil {
		return err
	}

	// A pod network of its own: a bridge in 198.19.254.0/24 (a range reserved
	// for benchmarks, colliding with nothing), removed at the end.
	cniDir := filepath.Join(dir, "cni")
	if err := os.MkdirAll(cniDir, 0o755); err != nil {
		return err
	}
	conf := fmt.Sprintf(`{"cniVersion": "1.0.0", "name": "unilet-demo", "plugins": [{"type": "bridge", "bridge": "unilet-demo0",
  "isGateway": true, "ipam": {"type": "host-local", "dataDir": %q, "ranges": [[{"subnet": "198.19.254.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}}]}`,
		filepath.Join(dir, "ipam"))
	if err := os.WriteFile(filepath.Join(cniDir, "10-demo.conflist"), []byte(conf), 0o644); err != nil {
		return err
	}
	defer func() {
		_ = exec.Command("ip", "link", "del", "unilet-demo0").Run()
		cgroups.RemoveTree("/unilet-demo")
	}()
	cniBin := "/usr/lib/cni"
	if _, err := os.Stat(filepath.Join(cniBin, "bridge")); err != nil {
		cniBin = "/opt/cni/bin"
	}

	sock := filepath.Join(dir, "unilet.sock")
	step("starting unilet (--accel auto: probes KVM, falls back to TCG with a warning)")
	daemon := exec.Command(filepath.Join(bin, "unilet"), "--listen", "unix://"+sock, "--root", filepath.Join(dir, "root"),
		"--state-dir", filepath.Join(dir, "run"), "--upstream-endpoint", "", "--insecure-registry", u.Host,
		"--cni-conf-dir", cniDir, "--cni-bin-dir", cniBin, "--netns-dir", filepath.Join(dir, "netns"), "--cgroup-root", "/unilet-demo",
		"--pod-log-root", filepath.Join(dir, "pods"))
	daemon.Stdout, daemon.Stderr = os.Stdout, os.Stderr
	if err := daemon.Start(); err != nil {
		return err
	}
	defer func() {
		_ = daemon.Process.Signal(syscall.SIGTERM)
		_ = daemon.Wait()
	}()
	for i := 0; ; i++ {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if i > 300 {
			return fmt.Errorf("unilet did not start")
		}
		time.Sleep(20 * time.Millisecond)
	}
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	rt := runtimeapi.NewRuntimeServiceClient(conn)
	is := runtimeapi.NewImageServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	v, err := rt.Version(ctx, &runtimeapi.VersionRequest{})
	if err != nil {
		return err
	}
	step("CRI Version: %s %s (CRI %s)", v.RuntimeName, v.RuntimeVersion, v.RuntimeApiVersion)
	logDir := filepath.Join(dir, "pods", "demo")
	podConfig := &runtimeapi.PodSandboxConfig{
		Metadata:     &runtimeapi.PodSandboxMetadata{Name: "demo", Namespace: "default", Uid: "demo-uid"},
		Annotations:  map[string]string{"kubernetes.io/target-runtime": "unikraft"},
		LogDirectory: logDir,
	}
	step("PullImage %s", ref)
	if _, err := is.PullImage(ctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: ref}, SandboxConfig: podConfig}); err != nil {
		return err
	}
	pod, err := rt.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{Config: podConfig})
	if err != nil {
		return err
	}
	ps, err := rt.PodSandboxStatus(ctx, &runtimeapi.PodSandboxStatusRequest{PodSandboxId: pod.PodSandboxId})
	if err != nil {
		return err
	}
	step("RunPodSandbox (annotation kubernetes.io/target-runtime=unikraft) → %s, pod IP %s (CNI bridge)", pod.PodSandboxId[:13], ps.Status.GetNetwork().GetIp())
	ctr, err := rt.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: pod.PodSandboxId, SandboxConfig: podConfig,
		Config: &runtimeapi.ContainerConfig{
			Metadata: &runtimeapi.ContainerMetadata{Name: "app"},
			Image:    &runtimeapi.ImageSpec{Image: ref},
			Args:     []string{"hello", "unikernel world", "tick=100", "count=5"},
			Envs:     []*runtimeapi.KeyValue{{Key: "GREETING", Value: []byte("hello from a pod")}},
			LogPath:  "app/0.log",
		}})
	if err != nil {
		return err
	}
	step("CreateContainer → %s; StartContainer", ctr.ContainerId[:13])
	start := time.Now()
	if _, err := rt.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: ctr.ContainerId}); err != nil {
		return err
	}
	var st *runtimeapi.ContainerStatus
	for {
		resp, err := rt.ContainerStatus(ctx, &runtimeapi.ContainerStatusRequest{ContainerId: ctr.ContainerId, Verbose: true})
		if err != nil {
			return err
		}
		st = resp.Status
		if st.State == runtimeapi.ContainerState_CONTAINER_EXITED {
			step("guest command line: %s", resp.Info["cmdline"])
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	step("container EXITED after %s: exitCode=%d reason=%s", time.Since(start).Round(time.Millisecond), st.ExitCode, st.Reason)
	b, err := os.ReadFile(st.LogPath)
	if err != nil {
		return err
	}
	step("console log (%s, CRI format — what kubectl logs shows):\n%s", filepath.Base(st.LogPath), b)
	if _, err := rt.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: pod.PodSandboxId}); err != nil {
		return err
	}
	step("RemovePodSandbox done; cleaning up")
	if st.ExitCode != 0 {
		return fmt.Errorf("the VM failed: %s %s", st.Reason, st.Message)
	}
	return nil
}
