package cri_test

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/unilet-dev/unilet/internal/testutil"
)

// TestSeveralVMsInOnePod: a unikernel pod of two containers, each its own
// VM on its own tap, behind the one pod IP — each declared port reaches its
// VM (also through a hostPort and port-forward), an undeclared one the first; the VMs reach each other at the pod IP;
// a volume both mount is written and read by both, a file one made
// rewritten by the other's next attempt (their QEMUs run as the pod's
// jail uid); a port two containers declare is
// refused naming both; one VM crashes and is restarted while the other runs
// on; the daemon's kill -9 loses nothing; removing the pod leaves nothing.
func TestSeveralVMsInOnePod(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "")
	d.must("pull", netImage())
	shared := filepath.Join(t.TempDir(), "shared")
	require.NoError(t, os.MkdirAll(shared, 0o755))
	require.NoError(t, os.Chmod(shared, 0o777)) // as kubelet makes an emptyDir
	logDir := filepath.Join(t.TempDir(), "pods")
	var pod string
	t.Cleanup(func() { // the consoles, when something failed
		if t.Failed() {
			logs, _ := filepath.Glob(filepath.Join(logDir, "*", "*.log"))
			for _, l := range logs {
				b, _ := os.ReadFile(l)
				t.Logf("%s:\n%s", l, b)
			}
			if out, err := exec.Command("nsenter", "--net="+filepath.Join(d.netnsDir, "unilet-"+pod), "nft", "list", "ruleset").CombinedOutput(); err == nil {
				t.Logf("the pod's rules:\n%s", out)
			}
		}
	})
	hostPort := d.withPortmap()
	podCfg := writeJSON(t, map[string]any{
		"metadata":      map[string]any{"name": "duo", "namespace": "e2e", "uid": "duo-uid"},
		"log_directory": logDir,
		"annotations":   map[string]string{"kubernetes.io/target-runtime": "unikraft"},
		"port_mappings": []map[string]any{{"container_port": 9090, "host_port": hostPort}},
		"linux":         map[string]any{"cgroup_parent": d.cgroupRoot + "/pod-duo"},
	})
	pod = d.must("runp", podCfg)
	ip := d.podIP(pod)
	ctr := func(name string, attempt int, port int, script string) string {
		ports, _ := json.Marshal([]map[string]any{{"containerPort": port, "protocol": "TCP"}})
		return writeJSON(t, map[string]any{
			"metadata": map[string]any{"name": name, "attempt": attempt}, "image": map[string]string{"image": netImage()},
			"log_path":    fmt.Sprintf("%s/%d.log", name, attempt),
			"annotations": map[string]string{"io.kubernetes.container.ports": string(ports)},
			"command":     []string{"/bin/sh", "-c", script},
			"envs":        []map[string]string{{"key": "POD_IP", "value": ip}},
			"mounts":      []map[string]any{{"container_path": "/shared", "host_path": shared}},
			"linux":       map[string]any{"resources": map[string]any{"memory_limit_in_bytes": 256 << 20}},
		})
	}
	// web: port 8080 (and 7070, undeclared); fetches the cache's page
	// through the pod IP; adds a line to the file the cache wrote; ends
	// with exit 3 when the host drops a file in the shared volume.
	web := func(attempt int) string {
		return ctr("web", attempt, 8080, "mkdir -p /w && echo web > /w/index.html && echo from-web > /shared/web.txt && "+
			"httpd -p 8080 -h /w && httpd -p 7070 -h /w && "+
			"until wget -q -O /w/peer.html http://$POD_IP:9090/index.html; do sleep 0.5; done; "+
			"until [ -e /shared/index.html ]; do sleep 0.2; done; echo web-was-here >> /shared/index.html; "+
			"echo WEB-READY; while [ ! -e /shared/crash-web ]; do sleep 0.2; done; echo crashing; exit 3")
	}
	webID := d.must("create", pod, web(0), podCfg)
	d.must("start", webID)
	cacheID := d.must("create", pod, ctr("cache", 0, 9090, "echo cache > /shared/index.html && httpd -p 7070 -h /shared && exec httpd -f -p 9090 -h /shared"), podCfg)
	d.must("start", cacheID)

	get := func(port int, path string, timeout time.Duration) string {
		return testutil.MustHTTPGet(t, fmt.Sprintf("http://%s/%s", net.JoinHostPort(ip, fmt.Sprint(port)), path), timeout)
	}
	require.Equal(t, "web\n", get(8080, "", 90*time.Second), "port 8080 reaches the web VM")
	require.Equal(t, "cache\n", get(9090, "index.html", 90*time.Second)[:6], "port 9090 reaches the cache VM")
	require.Equal(t, "web\n", get(7070, "", 10*time.Second), "an undeclared port reaches the first container")
	waitLog(t, filepath.Join(logDir, "web/0.log"), "WEB-READY")
	require.Equal(t, "cache\n", get(8080, "peer.html", 5*time.Second), "the web VM reached the cache VM at the pod IP")
	require.Equal(t, "from-web\n", get(9090, "web.txt", 5*time.Second), "the cache VM reads what the web VM wrote")
	require.Equal(t, "cache\nweb-was-here\n", get(9090, "index.html", 5*time.Second), "the web VM wrote to the cache VM's file")

	require.Equal(t, "from-web\n", testutil.MustHTTPGet(t, fmt.Sprintf("http://%s.1:%d/web.txt", d.subnet, hostPort), 10*time.Second),
		"a hostPort reaches the VM that declares its container port")

	// Two QEMUs, running as the pod's jail uid and gid.
	q := testutil.QEMUsUnder(d.stateDir)
	require.Len(t, q, 2)
	ids := func(pid int) (string, string) {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		require.NoError(t, err)
		u := regexp.MustCompile(`(?m)^Uid:\s+(\d+)`).FindStringSubmatch(string(b))
		g := regexp.MustCompile(`(?m)^Gid:\s+(\d+)`).FindStringSubmatch(string(b))
		return u[1], g[1]
	}
	u0, g0 := ids(q[0].Pid)
	u1, g1 := ids(q[1].Pid)
	require.Equal(t, u0, u1, "the VMs of a pod share its jail uid")
	require.Equal(t, g0, g1)
	require.Equal(t, u0, g0)
	// Each VM has its own cgroup under the pod's, with its own limit and
	// stats, and its own log.
	for _, id := range []string{webID, cacheID} {
		cg := d.cgroupRoot + "/pod-duo/" + id
		require.Equal(t, fmt.Sprint(256<<20), cgroupValue(t, "memory", cg, "memory.limit_in_bytes"))
		procs := strings.Fields(cgroupValue(t, "memory", cg, "cgroup.procs"))
		require.Len(t, procs, 2, "its shim and its QEMU")
		require.Contains(t, procs, d.inspectPid(id))
		var stats struct {
			Stats []struct {
				Attributes struct {
					ID string `json:"id"`
				} `json:"attributes"`
				Memory struct {
					WorkingSetBytes struct{ Value string } `json:"workingSetBytes"`
				} `json:"memory"`
			} `json:"stats"`
		}
		require.NoError(t, json.Unmarshal([]byte(d.must("stats", "-o", "json", id)), &stats))
		require.Len(t, stats.Stats, 1)
		require.Equal(t, id, stats.Stats[0].Attributes.ID)
		require.NotEmpty(t, stats.Stats[0].Memory.WorkingSetBytes.Value)
	}
	require.NotEqual(t, d.inspectPid(webID), d.inspectPid(cacheID))

	// A port two containers declare: refused, naming both.
	_, err := d.crictl("create", pod, ctr("other", 0, 8080, "sleep 1"), podCfg)
	require.ErrorContains(t, err, "InvalidArgument")
	require.ErrorContains(t, err, "declares port 8080/tcp, which container")
	require.Regexp(t, `container .*other.* declares port 8080/tcp, which container .*web`, err.Error())

	// Port-forward reaches the VM that declares the port.
	pfPort, pfOut := d.portForward(pod, 9090)
	require.Equal(t, "from-web\n", testutil.MustHTTPGet(t, fmt.Sprintf("http://127.0.0.1:%d/web.txt", pfPort), 20*time.Second), pfOut.String())

	// A second attempt of web cannot start while the first runs on its tap.
	web1 := d.must("create", pod, web(1), podCfg)
	_, err = d.crictl("start", web1)
	require.ErrorContains(t, err, "still runs")

	// The web VM crashes; the cache VM runs on, undeclared ports move to
	// it; web's next attempt runs on its tap again.
	cachePid := d.inspectPid(cacheID)
	require.NoError(t, os.WriteFile(filepath.Join(shared, "crash-web"), nil, 0o644))
	in := d.waitState(webID, "CONTAINER_EXITED", 30*time.Second)
	require.Equal(t, int32(3), in.Status.ExitCode)
	require.Equal(t, "CONTAINER_RUNNING", d.inspect(cacheID).Status.State)
	require.Equal(t, cachePid, d.inspectPid(cacheID), "the cache VM was not restarted")
	require.Equal(t, "cache\nweb-was-here\n", get(9090, "index.html", 5*time.Second))
	require.Equal(t, "cache\nweb-was-here\n", get(7070, "index.html", 5*time.Second), "undeclared ports moved to the VM that runs")
	require.NoError(t, os.Remove(filepath.Join(shared, "crash-web")))
	d.must("start", web1) // as kubelet does: the exited attempt stays until it is collected
	d.must("rm", webID)
	require.Equal(t, "web\n", get(8080, "", 90*time.Second), "the restarted web VM answers on its port")
	waitLog(t, filepath.Join(logDir, "web/1.log"), "WEB-READY")
	b, err := os.ReadFile(filepath.Join(logDir, "web/1.log"))
	require.NoError(t, err)
	require.NotContains(t, string(b), "can't create", "the next attempt rewrote the file the first made")

	// The daemon is killed and restarted: both VMs run on, routed as before.
	d.crash()
	d.start()
	require.Equal(t, "CONTAINER_RUNNING", d.inspect(web1).Status.State)
	require.Equal(t, "CONTAINER_RUNNING", d.inspect(cacheID).Status.State)
	require.Equal(t, cachePid, d.inspectPid(cacheID))
	require.Equal(t, "web\n", get(8080, "", 10*time.Second))
	require.Equal(t, "from-web\n", get(9090, "web.txt", 10*time.Second))
	require.Equal(t, "web\n", get(7070, "", 10*time.Second), "undeclared ports are web's again")

	d.must("rmp", "-f", pod)
	require.Empty(t, testutil.QEMUsUnder(d.stateDir))
	require.Empty(t, testutil.ShimsUnder(d.stateDir))
	require.Empty(t, listDir(t, d.netnsDir))
	require.Empty(t, listDir(t, filepath.Join(d.stateDir, "vm")), "VM directories left")
}

// inspectPid is the PID crictl reports for a running container (its QEMU).
func (d *daemon) inspectPid(id string) string {
	d.t.Helper()
	var v struct {
		Pid string `json:"pid"`
	}
	require.NoError(d.t, json.Unmarshal([]byte(d.must("inspect", "-o", "json", id)), &v))
	require.NotEmpty(d.t, v.Pid)
	return v.Pid
}
