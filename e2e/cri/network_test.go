package cri_test

// Pod networking, volumes, cgroups and port-forward of unikernel pods, with
// real CNI plugins (bridge + host-local) on a bridge the test makes, and the
// network guest (Debian's kernel + busybox initramfs, e2e/guest/netguest)
// whose init honours netdev.ip, vfs.fstab 9p entries and env.vars.

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/unilet-dev/unilet/internal/testutil"
	"github.com/unilet-dev/unilet/pkg/cgroups"
)

func netImage() string { return regHost + "/unikraft/netguest:latest" }

func (d *daemon) podIP(pod string) string {
	d.t.Helper()
	var in struct {
		Status struct {
			Network struct {
				IP string `json:"ip"`
			} `json:"network"`
		} `json:"status"`
	}
	require.NoError(d.t, json.Unmarshal([]byte(d.must("inspectp", "-o", "json", pod)), &in))
	return in.Status.Network.IP
}

// withPortmap adds CNI's portmap plugin to the daemon's network (read at
// each pod's CNI ADD) and returns a free TCP port for a hostPort.
func (d *daemon) withPortmap() int {
	t := d.t
	t.Helper()
	f := filepath.Join(d.cniConf, "10-unilet-e2e.conflist")
	b, err := os.ReadFile(f)
	require.NoError(t, err)
	var conf map[string]any
	require.NoError(t, json.Unmarshal(b, &conf))
	conf["plugins"] = append(conf["plugins"].([]any), map[string]any{"type": "portmap", "capabilities": map[string]bool{"portMappings": true}})
	b, err = json.Marshal(conf)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(f, b, 0o644))
	l, err := net.Listen("tcp4", "127.0.0.1:0") // a port no one on the node listens on
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// cgroupValue reads a cgroup v1 control file of a VM's cgroup.
func cgroupValue(t *testing.T, controller, cgPath, file string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/sys/fs/cgroup", controller, cgPath, file))
	require.NoError(t, err)
	return strings.TrimSpace(string(b))
}

func TestNetworkGuestHTTPVolumesCgroupsPortForward(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "")
	d.must("pull", netImage())
	host := t.TempDir()
	data, cfgDir := filepath.Join(host, "data"), filepath.Join(host, "config")
	require.NoError(t, os.MkdirAll(data, 0o755))
	require.NoError(t, os.Chmod(data, 0o777)) // as kubelet makes an emptyDir: QEMU runs as the jail's uid
	require.NoError(t, os.MkdirAll(cfgDir, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(data, "hello.txt"), []byte("written on the host\n"), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(cfgDir, "app.conf"), []byte("mode=ro\n"), 0o644))

	cgParent := d.cgroupRoot + "/pod-net"
	logDir := filepath.Join(t.TempDir(), "pods")
	// hostPort through CNI's portmap plugin: the node's port forwards to
	// the pod IP, which the pod's namespace forwards to the guest.
	hostPort := d.withPortmap()
	pod := d.must("runp", writeJSON(t, map[string]any{
		"metadata":      map[string]any{"name": "web", "namespace": "e2e", "uid": "web-uid"},
		"hostname":      "web-0",
		"log_directory": logDir,
		"annotations":   map[string]string{"kubernetes.io/target-runtime": "unikraft"},
		"dns_config":    map[string]any{"servers": []string{d.subnet + ".53"}, "searches": []string{"e2e.svc.cluster.local"}},
		"linux":         map[string]any{"cgroup_parent": cgParent},
		"port_mappings": []map[string]any{{"container_port": 8080, "host_port": hostPort}}, // TCP
	}))
	ip := d.podIP(pod)
	require.True(t, strings.HasPrefix(ip, d.subnet+"."), "pod IP %s from the test's CNI range", ip)
	nsPath := filepath.Join(d.netnsDir, "unilet-"+pod)
	require.FileExists(t, nsPath)
	// A listener on the test's bridge (the pod's gateway) that records who
	// connects: the guest's own connections must leave as the pod IP.
	callers := make(chan string, 4)
	lis, err := net.Listen("tcp4", d.subnet+".1:0")
	require.NoError(t, err)
	defer lis.Close()
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			callers <- c.RemoteAddr().(*net.TCPAddr).IP.String()
			_, _ = c.Write([]byte("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"))
			c.Close()
		}
	}()

	ctr := d.must("create", pod, writeJSON(t, map[string]any{
		"metadata": map[string]any{"name": "web"}, "image": map[string]string{"image": netImage()}, "log_path": "web/0.log",
		"command": []string{"/bin/sh", "-c", "cat /data/hello.txt; ls /config; echo x > /config/w && echo RO-WRITABLE || echo RO-REFUSED; " +
			"echo guest-wrote > /data/out.txt; echo FOO=$FOO; " +
			// A hostile guest tries to plant what another host process
			// could trip over: setuid-root binaries, files of other users,
			// device nodes, symlinks out of the volume.
			"cp /bin/busybox /data/suid && chown 0:0 /data/suid && chmod 6755 /data/suid; touch /data/owned && chown 4321:4321 /data/owned; " +
			"mknod /data/mem c 1 1; mkfifo /data/fifo; ln -s /etc/shadow /data/shadow; mkdir /data/dir && chmod 4777 /data/dir; " +
			"echo GUEST-VIEW $(stat -c '%A:%u' /data/suid /data/owned /data/mem) $(readlink /data/shadow); " +
			"wget -q -O /dev/null http://" + lis.Addr().String() + "/from-guest; echo CALLED-OUT=$?; exec httpd -f -p 8080 -h /data"},
		"envs":   []map[string]string{{"key": "FOO", "value": "bar baz"}},
		"mounts": []map[string]any{{"container_path": "/data", "host_path": data}, {"container_path": "/config", "host_path": cfgDir, "readonly": true}},
		"linux": map[string]any{"resources": map[string]any{"memory_limit_in_bytes": 256 << 20, "cpu_quota": 150000, "cpu_period": 100000,
			"cpu_shares": 1536}},
	}), "")
	d.must("start", ctr)
	logPath := filepath.Join(logDir, "web/0.log")

	// HTTP from the host to the pod IP: the guest's busybox httpd serves the
	// hostPath volume over 9p.
	require.Equal(t, "written on the host\n", testutil.MustHTTPGet(t, "http://"+net.JoinHostPort(ip, "8080")+"/hello.txt", 60*time.Second))
	require.Equal(t, "written on the host\n", testutil.MustHTTPGet(t, fmt.Sprintf("http://%s.1:%d/hello.txt", d.subnet, hostPort), 10*time.Second),
		"the hostPort on the node's address (the test bridge's) reaches the guest")
	waitLog(t, logPath, "FOO=bar baz")
	b, err := os.ReadFile(logPath)
	require.NoError(t, err)
	log := string(b)
	for _, want := range []string{
		// The guest has the fixed guest network, never the pod IP (routed).
		fmt.Sprintf("stdout F net: ip=100.127.255.254/30 gw=100.127.255.253 dns=%s.53, hostname=web-0 domain=e2e.svc.cluster.local", d.subnet),
		"stdout F net: eth0 up",
		"stdout F fstab: initrd0:/:extract::ramfs=1: (initramfs already extracted",
		"stdout F fstab: fs1:/data:9pfs:::mkmp mounted",
		"stdout F fstab: fs2:/config:9pfs:1::mkmp mounted read-only",
		"stdout F written on the host", "stdout F app.conf", "Read-only file system", "stdout F RO-REFUSED", "stdout F env: FOO=bar baz",
	} {
		require.Contains(t, log, want)
	}
	require.NotContains(t, log, "stdout F RO-WRITABLE")
	select {
	case from := <-callers:
		require.Equal(t, ip, from, "the guest's connection leaves its pod as the pod IP")
	case <-time.After(30 * time.Second):
		t.Fatal("the guest's outbound connection never arrived")
	}
	// The guest sees what it asked for; the host has only plain files and
	// directories of the jail's uid, without setuid/setgid bits.
	waitLog(t, logPath, "GUEST-VIEW")
	b, _ = os.ReadFile(logPath)
	require.Contains(t, string(b), "GUEST-VIEW -rwsr-sr-x:0 -rw-r--r--:4321 crw-r--r--:0 /etc/shadow")
	ents, err := os.ReadDir(data)
	require.NoError(t, err)
	require.Len(t, ents, 8)
	for _, e := range ents {
		fi, err := os.Lstat(filepath.Join(data, e.Name()))
		require.NoError(t, err)
		st := fi.Sys().(*syscall.Stat_t)
		require.True(t, fi.Mode().IsRegular() || fi.IsDir(), "%s is %s on the host", e.Name(), fi.Mode())
		require.Zero(t, fi.Mode()&(os.ModeSetuid|os.ModeSetgid|os.ModeSticky), "%s has %s on the host", e.Name(), fi.Mode())
		if e.Name() != "hello.txt" {
			require.GreaterOrEqual(t, st.Uid, uint32(1<<30), "%s is owned by uid %d on the host", e.Name(), st.Uid)
			require.Equal(t, st.Uid, st.Gid)
		}
	}
	require.Less(t, strings.Index(log, "fstab: initrd0"), strings.Index(log, "fstab: fs1"), "the initrd is extracted as / first")
	out, err := os.ReadFile(filepath.Join(data, "out.txt"))
	require.NoError(t, err)
	require.Equal(t, "guest-wrote\n", string(out), "a write in the guest reaches the host directory")
	_, err = os.Stat(filepath.Join(cfgDir, "w"))
	require.True(t, os.IsNotExist(err), "the read-only volume refused the write")

	// Resources: guest RAM = limit - 64 MiB overhead, vCPUs = ceil(1.5);
	// QEMU and its shim live in a cgroup under the pod's cgroup_parent.
	var verbose map[string]any
	raw := d.must("inspect", "-o", "json", ctr)
	require.NoError(t, json.Unmarshal([]byte(raw), &verbose))
	info := verbose // crictl puts the verbose info keys at the top level
	require.Equal(t, "192", fmt.Sprint(info["memoryMiB"]), raw)
	require.Equal(t, "2", fmt.Sprint(info["vcpus"]), raw)
	cg := cgParent + "/" + ctr
	require.Equal(t, strconv.Itoa(256<<20), cgroupValue(t, "memory", cg, "memory.limit_in_bytes"))
	require.Equal(t, "150000", cgroupValue(t, "cpu", cg, "cpu.cfs_quota_us"))
	require.Equal(t, "1536", cgroupValue(t, "cpu", cg, "cpu.shares"))
	procs := strings.Fields(cgroupValue(t, "memory", cg, "cgroup.procs"))
	require.Len(t, procs, 2, "the shim and QEMU")
	qemu := qemuProcesses(t, d.stateDir)
	require.Len(t, qemu, 1)
	require.Contains(t, procs, strings.Fields(qemu[0])[0])

	// The jail: QEMU has its own uid, no capabilities, NoNewPrivs and
	// QEMU's seccomp filter, and its root shows nothing of the host's.
	qpid := strings.Fields(qemu[0])[0]
	status, err := os.ReadFile("/proc/" + qpid + "/status")
	require.NoError(t, err)
	for _, re := range []string{`(?m)^Uid:\s+1\d{9}\s`, `(?m)^CapEff:\s+0+$`, `(?m)^CapBnd:\s+0+$`, `(?m)^NoNewPrivs:\s+1$`, `(?m)^Seccomp:\s+2$`} {
		require.Regexp(t, re, string(status))
	}
	_, err = os.Stat("/proc/" + qpid + "/root/etc/shadow")
	require.True(t, os.IsNotExist(err), "QEMU sees /etc/shadow")
	_, err = os.Stat("/proc/" + qpid + "/root" + d.stateDir)
	require.True(t, os.IsNotExist(err), "QEMU sees unilet's state directory")

	// Stats come from that cgroup; the pod's NIC counters from its netns.
	var stats struct {
		Stats []struct {
			Memory struct {
				WorkingSetBytes struct{ Value string } `json:"workingSetBytes"`
			} `json:"memory"`
		} `json:"stats"`
	}
	require.NoError(t, json.Unmarshal([]byte(d.must("stats", "-o", "json", ctr)), &stats))
	ws, _ := strconv.ParseUint(stats.Stats[0].Memory.WorkingSetBytes.Value, 10, 64)
	usage, _ := strconv.ParseUint(cgroupValue(t, "memory", cg, "memory.usage_in_bytes"), 10, 64)
	require.Greater(t, ws, uint64(20<<20))
	require.LessOrEqual(t, ws, usage)
	podStats := d.must("statsp", "-o", "json", pod)
	require.Contains(t, podStats, `"rxBytes"`)
	require.Contains(t, podStats, `"workingSetBytes"`)

	// UpdateContainerResources: cgroup limits change live; a limit the
	// guest's fixed RAM cannot fit in is refused.
	d.must("update", "--memory", strconv.Itoa(320<<20), "--cpu-quota", "200000", ctr)
	require.Equal(t, strconv.Itoa(320<<20), cgroupValue(t, "memory", cg, "memory.limit_in_bytes"))
	require.Equal(t, "200000", cgroupValue(t, "cpu", cg, "cpu.cfs_quota_us"))
	_, err = d.crictl("update", "--memory", strconv.Itoa(128<<20), ctr)
	require.ErrorContains(t, err, "guest RAM is fixed at boot")

	// crictl port-forward through the streaming server to the pod IP.
	port, pfOut := d.portForward(pod, 8080)
	require.Equal(t, "written on the host\n", testutil.MustHTTPGet(t, fmt.Sprintf("http://127.0.0.1:%d/hello.txt", port), 20*time.Second), pfOut.String())
	require.Equal(t, "guest-wrote\n", testutil.MustHTTPGet(t, fmt.Sprintf("http://127.0.0.1:%d/out.txt", port), 5*time.Second))

	// Graceful stop: the ACPI power button reaches the guest's init, which
	// ends the app and powers off: exit 0.
	d.must("stop", "--timeout", "20", ctr)
	in := d.inspect(ctr)
	require.Equal(t, "Completed", in.Status.Reason, in.Status.Message)
	waitLog(t, logPath, "power button: stopping the application")

	d.must("rmp", "-f", pod)
	require.NoFileExists(t, nsPath)
	require.Eventually(t, func() bool {
		_, err := os.Stat(filepath.Join("/sys/fs/cgroup/memory", cg))
		return os.IsNotExist(err)
	}, 5*time.Second, 50*time.Millisecond, "the VM's cgroup is removed")
	links, _ := exec.Command("ip", "-o", "link", "show", "master", d.bridge).Output()
	require.Empty(t, strings.TrimSpace(string(links)), "no veth left on the bridge")
}

// TestNoLeaksAfterManyPodCycles runs 50 networked pods through create and
// delete: no namespace, tap, veth, IP lease, cgroup, shim or QEMU may remain.
func TestNoLeaksAfterManyPodCycles(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "")
	d.must("pull", image())
	ctrCfg := containerConfig(t, image(), []string{"tick=50"}, nil)
	// Two clients cycle pods at once (as kubelet's workers do): 2 × 25.
	const cycles, workers = 50, 2
	podCfgs := make([]string, cycles)
	for i := range podCfgs {
		name := fmt.Sprintf("cycle-%d", i)
		podCfgs[i] = writeJSON(t, map[string]any{
			"metadata":      map[string]any{"name": name, "namespace": "e2e", "uid": name},
			"log_directory": filepath.Join(t.TempDir(), "pods"),
			"annotations":   map[string]string{"kubernetes.io/target-runtime": "unikraft"},
			"linux":         map[string]any{"cgroup_parent": d.cgroupRoot + "/cycles"},
		})
	}
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := w; i < cycles; i += workers {
				name := fmt.Sprintf("cycle-%d", i)
				ctr, err := d.crictl("run", ctrCfg, podCfgs[i])
				if err == nil && i%10 == 0 { // now and then, check the VM really ran networked
					err = d.waitRunningErr(ctr, 10*time.Second)
					if err == nil && len(listDir(t, d.netnsDir)) == 0 {
						err = fmt.Errorf("%s runs without a network namespace", name)
					}
				}
				var pod string
				if err == nil {
					pod, err = d.crictl("pods", "-q", "--name", "^"+name+"$")
				}
				if err == nil {
					_, err = d.crictl("rmp", "-f", pod)
				}
				if err != nil {
					errs <- fmt.Errorf("%s: %w", name, err)
					return
				}
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	require.Empty(t, d.must("pods", "-q"))
	require.Empty(t, listDir(t, d.netnsDir), "network namespaces left")
	links, _ := exec.Command("ip", "-o", "link", "show", "master", d.bridge).Output()
	require.Empty(t, strings.TrimSpace(string(links)), "veths left on the bridge")
	taps, _ := exec.Command("ip", "-o", "link", "show", "type", "tun").Output()
	require.NotContains(t, string(taps), "tap0", "no tap may leak into the host namespace")
	ipamDir := filepath.Join(d.dir, "ipam", "unilet-e2e-"+strings.TrimPrefix(d.bridge, "ulb"))
	require.DirExists(t, ipamDir, "host-local kept its leases here")
	leases := listDir(t, ipamDir)
	for _, l := range leases {
		require.False(t, strings.HasPrefix(l, d.subnet), "IP lease %s left", l)
	}
	require.Eventually(t, func() bool { return len(listDir(t, "/sys/fs/cgroup/memory"+d.cgroupRoot+"/cycles")) == 0 },
		10*time.Second, 100*time.Millisecond, "VM cgroups left: %v", listDir(t, "/sys/fs/cgroup/memory"+d.cgroupRoot+"/cycles"))
	require.Empty(t, qemuProcesses(t, d.stateDir))
	require.Empty(t, testutil.ShimsUnder(d.stateDir), "shims left")
}

// waitRunningErr waits until container id runs (usable off the test's
// goroutine: it fails with an error, not the test).
func (d *daemon) waitRunningErr(id string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		out, err := d.crictl("inspect", "-o", "json", id)
		var in inspect
		if err == nil && json.Unmarshal([]byte(out), &in) == nil && in.Status.State == "CONTAINER_RUNNING" {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("container %s not running after %s (%v)", id, timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// listDir lists the entries of dir (none if it does not exist), cgroup
// control files left out.
func listDir(t *testing.T, dir string) []string {
	ents, err := os.ReadDir(dir)
	if err != nil && !os.IsNotExist(err) {
		require.NoError(t, err)
	}
	var out []string
	for _, e := range ents {
		if strings.HasPrefix(dir, "/sys/fs/cgroup") && !e.IsDir() {
			continue
		}
		out = append(out, e.Name())
	}
	return out
}

// TestInitContainersSidecarAndAnnotations: init containers run to
// completion one after another, then the app and a sidecar, each in a VM of
// its own; a second attempt of the app cannot start while the first runs;
// per-pod annotations size the VMs and bad ones fail the pod.
func TestInitContainersSidecarAndAnnotations(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "", "--allow-lib-param", "uk.*")
	d.must("pull", image())
	logDir := filepath.Join(t.TempDir(), "pods")
	podCfg := writeJSON(t, map[string]any{
		"metadata":      map[string]any{"name": "init", "namespace": "e2e", "uid": "init-uid"},
		"log_directory": logDir,
		"annotations": map[string]string{"kubernetes.io/target-runtime": "unikraft", "unilet.dev/vcpus": "2",
			"unilet.dev/memory": "96Mi", "unilet.dev/lib-params": "uk.test=1"},
	})
	pod := d.must("runp", podCfg)
	ctr := func(name string, args ...string) string {
		return writeJSON(t, map[string]any{"metadata": map[string]any{"name": name}, "image": map[string]string{"image": image()},
			"args": args, "log_path": name + "/0.log"})
	}
	// Two init containers, in order (kubelet starts each once the one before it has exited 0).
	for _, name := range []string{"init-1", "init-2"} {
		id := d.must("create", pod, ctr(name, "count=3", "tick=10", name), podCfg)
		d.must("start", id)
		in := d.waitState(id, "CONTAINER_EXITED", 30*time.Second)
		require.Equal(t, int32(0), in.Status.ExitCode)
		require.Equal(t, "Completed", in.Status.Reason)
		waitLog(t, in.Status.LogPath, "argv[3]: "+name)
	}
	app := d.must("create", pod, ctr("app", "tick=100"), podCfg)
	d.must("start", app)
	d.waitState(app, "CONTAINER_RUNNING", 10*time.Second)
	var verbose map[string]any
	require.NoError(t, json.Unmarshal([]byte(d.must("inspect", "-o", "json", app)), &verbose))
	require.Equal(t, "2", fmt.Sprint(verbose["vcpus"]))
	require.Equal(t, "96", fmt.Sprint(verbose["memoryMiB"]))
	require.Contains(t, fmt.Sprint(verbose["cmdline"]), "uk.test=1 ")
	q := qemuProcesses(t, d.stateDir)
	require.Len(t, q, 1)
	require.Contains(t, q[0], "-m 96 -smp 2")
	waitLog(t, filepath.Join(logDir, "app/0.log"), "param: uk.test=1")

	// A sidecar runs beside the app, in a VM (and tap) of its own.
	side := d.must("create", pod, ctr("sidecar", "tick=100", "sidecar"), podCfg)
	d.must("start", side)
	d.waitState(side, "CONTAINER_RUNNING", 10*time.Second)
	waitLog(t, filepath.Join(logDir, "sidecar/0.log"), "argv[2]: sidecar")
	q = qemuProcesses(t, d.stateDir)
	require.Len(t, q, 2)
	require.Contains(t, strings.Join(q, "\n"), "-m 96 -smp 2")
	require.Equal(t, "CONTAINER_RUNNING", d.inspect(app).Status.State)
	// The app's next attempt waits for the first to end.
	again := d.must("create", pod, writeJSON(t, map[string]any{"metadata": map[string]any{"name": "app", "attempt": 1},
		"image": map[string]string{"image": image()}, "args": []string{"tick=100"}, "log_path": "app/1.log"}), podCfg)
	_, err := d.crictl("start", again)
	require.ErrorContains(t, err, "still runs")
	require.Len(t, qemuProcesses(t, d.stateDir), 2)
	d.must("rmp", "-f", pod)
	require.Empty(t, qemuProcesses(t, d.stateDir))

	// Bad annotations fail the pod with InvalidArgument and a clear message.
	for ann, want := range map[string]string{
		"unilet.dev/vcpus":      "whole number of vCPUs",
		"unilet.dev/machine":    "want pc or microvm",
		"unilet.dev/lib-params": "not allowed on this node",
	} {
		bad := writeJSON(t, map[string]any{
			"metadata":    map[string]any{"name": "bad", "namespace": "e2e", "uid": "bad-uid"},
			"annotations": map[string]string{"kubernetes.io/target-runtime": "unikraft", ann: map[string]string{"unilet.dev/vcpus": "lots", "unilet.dev/machine": "q35,accel=kvm", "unilet.dev/lib-params": "lwip.dhcp=1"}[ann]},
		})
		_, err := d.crictl("runp", bad)
		require.ErrorContains(t, err, want)
		require.ErrorContains(t, err, "InvalidArgument")
	}
	require.Empty(t, d.must("pods", "-q"))
	require.Empty(t, listDir(t, d.netnsDir), "a refused pod leaves no namespace")

	// microvm machine type: the VM exits through isa-debug-exit, reported Completed.
	mvm := writeJSON(t, map[string]any{
		"metadata":      map[string]any{"name": "mvm", "namespace": "e2e", "uid": "mvm-uid"},
		"log_directory": logDir,
		"annotations":   map[string]string{"kubernetes.io/target-runtime": "unikraft", "unilet.dev/machine": "microvm"},
	})
	mpod := d.must("runp", mvm)
	m := d.must("create", mpod, ctr("m", "hello"), mvm)
	d.must("start", m)
	in := d.waitState(m, "CONTAINER_EXITED", 30*time.Second)
	require.Equal(t, "Completed", in.Status.Reason, in.Status.Message)
	d.must("rmp", "-f", mpod)
}

// TestCNIReadinessAndTeardownRetry: without a CNI configuration the runtime
// reports NetworkReady=false and refuses unikernel pods; a configuration
// written later is used without a restart. A CNI DEL that fails is retried
// by the next daemon; a namespace that is already gone is not an error.
func TestCNIReadinessAndTeardownRetry(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "")
	conf := filepath.Join(d.cniConf, "10-unilet-e2e.conflist")
	saved, err := os.ReadFile(conf)
	require.NoError(t, err)
	require.NoError(t, os.Remove(conf))

	var info struct {
		Status struct {
			Conditions []struct {
				Type    string `json:"type"`
				Status  bool   `json:"status"`
				Reason  string `json:"reason"`
				Message string `json:"message"`
			} `json:"conditions"`
		} `json:"status"`
	}
	networkReady := func() (bool, string) {
		require.NoError(t, json.Unmarshal([]byte(d.must("info", "-o", "json")), &info))
		for _, c := range info.Status.Conditions {
			if c.Type == "NetworkReady" {
				return c.Status, c.Reason + ": " + c.Message
			}
		}
		t.Fatal("no NetworkReady condition")
		return false, ""
	}
	ready, why := networkReady()
	require.False(t, ready)
	require.Contains(t, why, "NetworkPluginNotReady: unilet: no CNI network configuration in "+d.cniConf)
	podCfg, _ := podConfig(t, "cni-retry", true)
	_, err = d.crictl("runp", podCfg)
	require.ErrorContains(t, err, "FailedPrecondition")
	require.ErrorContains(t, err, "pod network is not ready")
	require.Empty(t, listDir(t, d.netnsDir))

	require.NoError(t, os.WriteFile(conf, saved, 0o644))
	ready, _ = networkReady()
	require.True(t, ready, "a configuration written later is picked up without a restart")
	pod := d.must("runp", podCfg)
	ns := filepath.Join(d.netnsDir, "unilet-"+pod)
	require.FileExists(t, ns)

	// DEL fails (the configuration is gone): the stop fails and says so,
	// the sandbox keeps its namespace for a retry.
	require.NoError(t, os.Remove(conf))
	_, err = d.crictl("stopp", pod)
	require.ErrorContains(t, err, "tear down the network")
	require.FileExists(t, ns)
	// The next daemon, with the configuration back, finishes the teardown.
	d.stop()
	require.NoError(t, os.WriteFile(conf, saved, 0o644))
	d.start()
	require.Eventually(t, func() bool { return len(listDir(t, d.netnsDir)) == 0 }, 5*time.Second, 50*time.Millisecond,
		"the restarted daemon retries the CNI DEL")
	links, _ := exec.Command("ip", "-o", "link", "show", "master", d.bridge).Output()
	require.Empty(t, strings.TrimSpace(string(links)), "the pod's veth is gone")
	d.must("rmp", pod)

	// A namespace that vanished behind unilet's back does not fail the stop.
	pod = d.must("runp", podCfg)
	ns = filepath.Join(d.netnsDir, "unilet-"+pod)
	require.NoError(t, exec.Command("umount", ns).Run())
	require.NoError(t, os.Remove(ns))
	d.must("stopp", pod)
	d.must("rmp", pod)
	require.Empty(t, d.must("pods", "-q"))

	// A CNI DEL that keeps failing fails the stop, but not the removal: the
	// pod and its namespace go (logged), nothing is kept forever.
	pod = d.must("runp", podCfg)
	ns = filepath.Join(d.netnsDir, "unilet-"+pod)
	require.NoError(t, os.Remove(conf))
	_, err = d.crictl("stopp", pod)
	require.ErrorContains(t, err, "tear down the network")
	d.must("rmp", pod)
	require.NoFileExists(t, ns)
	require.Empty(t, d.must("pods", "-q"))
	require.NoError(t, os.WriteFile(conf, saved, 0o644))

	// A systemd-style cgroup parent is expanded to its slice path.
	const slice = "unilete2e-pod1.slice"
	t.Cleanup(func() { cgroups.RemoveTree("/unilete2e.slice") })
	d.must("pull", image())
	sp := writeJSON(t, map[string]any{
		"metadata":    map[string]any{"name": "slice", "namespace": "e2e", "uid": "slice-uid"},
		"annotations": map[string]string{"kubernetes.io/target-runtime": "unikraft"},
		"linux":       map[string]any{"cgroup_parent": slice},
	})
	spod := d.must("runp", sp)
	sctr := d.must("create", spod, containerConfig(t, image(), []string{"tick=100"}, nil), sp)
	d.must("start", sctr)
	d.waitState(sctr, "CONTAINER_RUNNING", 10*time.Second)
	require.DirExists(t, "/sys/fs/cgroup/memory/unilete2e.slice/unilete2e-pod1.slice/unilet-"+sctr+".scope")
	d.must("rmp", "-f", spod)
}

type syncBuf = testutil.SyncBuf

// portForward runs crictl port-forward to remote port of pod until the
// test ends; it returns the local port and crictl's output.
func (d *daemon) portForward(pod string, remote int) (int, *syncBuf) {
	return testutil.PortForward(d.t, remote, func(mapping string) *exec.Cmd {
		return exec.Command(crictl, "--runtime-endpoint", "unix://"+d.sock, "port-forward", pod, mapping)
	})
}

// TestShimPool: with --shim-pool the daemon keeps idle pre-forked shims; a VM
// runs under one of them, the pool refills, and a restarted daemon ends the
// idle shims of the old one and reconnects the running VM.
func TestShimPool(t *testing.T) {
	d := startDaemon(t, "--upstream-endpoint", "", "--shim-pool", "2")
	poolShims := func() []string { // the pool's shims, adopted or not (their --pool-dir)
		var out []string
		for _, pid := range testutil.ProcsUnder("unilet-shim", filepath.Join(d.stateDir, "pool")) {
			out = append(out, strconv.Itoa(pid))
		}
		return out
	}
	require.Eventually(t, func() bool { return len(poolShims()) == 2 }, 15*time.Second, 20*time.Millisecond, "two idle shims")
	idle := poolShims()
	// RunPodSandbox stages an idle shim in the pod's staging cgroup (while CNI
	// runs); CreateContainer renames that cgroup to the container's; the VM
	// then boots under that very shim — no cgroup migration on the start path.
	d.must("pull", image())
	podCfg, _ := podConfig(t, "vm-pool", true)
	pod := d.must("runp", podCfg)
	procs := func(cg string) []string {
		b, _ := os.ReadFile(filepath.Join("/sys/fs/cgroup/memory", cg, "cgroup.procs"))
		return strings.Fields(string(b))
	}
	stage := d.cgroupRoot + "/stage-" + pod[:12]
	staged := procs(stage)
	require.Len(t, staged, 1, "one shim staged for the pod")
	require.Contains(t, idle, staged[0])
	ctr := d.must("create", pod, containerConfig(t, image(), []string{"tick=100"}, nil), podCfg)
	require.NoDirExists(t, filepath.Join("/sys/fs/cgroup/memory", stage), "renamed")
	require.Equal(t, staged, procs(d.cgroupRoot+"/"+ctr), "the staged shim is in the container's cgroup")
	d.must("start", ctr)
	in := d.waitState(ctr, "CONTAINER_RUNNING", 10*time.Second)
	waitLog(t, in.Status.LogPath, "tick 2")
	var verbose map[string]any
	require.NoError(t, json.Unmarshal([]byte(d.must("inspect", "-o", "json", ctr)), &verbose))
	qemuPid := fmt.Sprint(verbose["pid"])
	ppid, err := os.ReadFile("/proc/" + qemuPid + "/stat")
	require.NoError(t, err)
	shimPid := strings.Fields(string(ppid[strings.LastIndexByte(string(ppid), ')')+1:]))[1]
	require.Equal(t, staged[0], shimPid, "QEMU's supervisor is the staged shim")
	require.Eventually(t, func() bool { return len(poolShims()) == 3 }, 15*time.Second, 20*time.Millisecond, "refilled: 2 idle + the adopted one")

	d.crash()
	d.start()
	require.Eventually(t, func() bool { return len(poolShims()) == 3 }, 15*time.Second, 20*time.Millisecond,
		"the new daemon ended the old idle shims and made its own")
	require.Contains(t, poolShims(), shimPid, "the VM's shim lives on")
	require.Equal(t, "CONTAINER_RUNNING", d.inspect(ctr).Status.State)
	d.must("stop", "--timeout", "10", ctr)
	require.Equal(t, "Completed", d.inspect(ctr).Status.Reason)
	d.stop()
	require.Eventually(t, func() bool { return len(poolShims()) == 0 }, 10*time.Second, 20*time.Millisecond, "SIGTERM ends the idle shims")
}
