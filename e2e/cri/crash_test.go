package cri_test

import (
	"context"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/unilet-dev/unilet/internal/testutil"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/pkg/cgroups"
)

// crash is the state shared by the churning workers and the chaos loop.
type crash struct {
	t   *testing.T
	d   *daemon
	rt  runtimeapi.RuntimeServiceClient
	mu  sync.Mutex
	log []string // what happened, printed on failure
	// removed holds containers and pods whose removal was answered OK.
	removed map[string]bool
	// victims wait for the chaos loop to kill their QEMU or shim.
	victims map[string]*victim // by container ID
}

type victim struct {
	hit     chan string // "qemu" or "shim"
	claimed bool
}

func (c *crash) note(format string, a ...any) {
	c.mu.Lock()
	c.log = append(c.log, time.Now().Format("15:04:05.000 ")+fmt.Sprintf(format, a...))
	c.mu.Unlock()
}

// call retries f while the daemon is away (Unavailable), for up to 90 s.
func (c *crash) call(what string, f func(ctx context.Context) error) error {
	deadline := time.Now().Add(90 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		err := f(ctx)
		cancel()
		if status.Code(err) != codes.Unavailable || time.Now().After(deadline) {
			if err != nil {
				c.note("%s: %v", what, err)
			}
			return err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// runPod runs (or, after an interrupted answer, finds) pod name.
func (c *crash) runPod(name string) (string, *runtimeapi.PodSandboxConfig, error) {
	cfg := vmPodConfig(c.t, name)
	cfg.Labels = map[string]string{"crash-pod": name}
	var id string
	err := c.call("runp "+name, func(ctx context.Context) error {
		r, err := c.rt.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{Config: cfg})
		if status.Code(err) == codes.AlreadyExists { // the answer to an earlier try was lost
			l, lerr := c.rt.ListPodSandbox(ctx, &runtimeapi.ListPodSandboxRequest{Filter: &runtimeapi.PodSandboxFilter{LabelSelector: cfg.Labels}})
			if lerr != nil {
				return lerr
			}
			for _, p := range l.Items {
				if p.State == runtimeapi.PodSandboxState_SANDBOX_READY {
					id = p.Id
					return nil
				}
			}
			return err
		}
		if err == nil {
			id = r.PodSandboxId
		}
		return err
	})
	return id, cfg, err
}

func (c *crash) createContainer(pod string, cfg *runtimeapi.PodSandboxConfig, args ...string) (string, error) {
	ccfg := vmContainerConfig(args...)
	ccfg.Labels = map[string]string{"crash-ctr": cfg.Metadata.Name}
	var id string
	err := c.call("create "+cfg.Metadata.Name, func(ctx context.Context) error {
		r, err := c.rt.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: pod, Config: ccfg, SandboxConfig: cfg})
		if status.Code(err) == codes.AlreadyExists {
			l, lerr := c.rt.ListContainers(ctx, &runtimeapi.ListContainersRequest{Filter: &runtimeapi.ContainerFilter{LabelSelector: ccfg.Labels}})
			if lerr != nil || len(l.Containers) != 1 {
				return err
			}
			id = l.Containers[0].Id
			return nil
		}
		if err == nil {
			id = r.ContainerId
		}
		return err
	})
	return id, err
}

// start starts ctr. A daemon killed during the start leaves the retry a
// container that is already RUNNING (the next daemon reconnected it) or
// EXITED with StartError (abandoned before the VM ran): abandoned says so.
func (c *crash) start(ctr string) (abandoned bool, err error) {
	err = c.call("start "+ctr[:12], func(ctx context.Context) error {
		_, err := c.rt.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: ctr})
		return err
	})
	if status.Code(err) != codes.FailedPrecondition {
		return false, err
	}
	st, serr := c.status(ctr)
	if serr != nil {
		return false, serr
	}
	switch {
	case st.State == runtimeapi.ContainerState_CONTAINER_EXITED && st.Reason == "StartError":
		c.note("start of %s abandoned by a daemon restart: %s", ctr[:12], st.Message)
		return true, nil
	case st.State == runtimeapi.ContainerState_CONTAINER_RUNNING, st.State == runtimeapi.ContainerState_CONTAINER_EXITED:
		return false, nil // it started (and may have ended already)
	}
	return false, err
}

func (c *crash) status(ctr string) (*runtimeapi.ContainerStatus, error) {
	var st *runtimeapi.ContainerStatus
	err := c.call("status "+ctr[:12], func(ctx context.Context) error {
		r, err := c.rt.ContainerStatus(ctx, &runtimeapi.ContainerStatusRequest{ContainerId: ctr})
		if err == nil {
			st = r.Status
		}
		return err
	})
	return st, err
}

// waitExited polls until ctr is EXITED and returns its status.
func (c *crash) waitExited(ctr string, within time.Duration) (*runtimeapi.ContainerStatus, error) {
	deadline := time.Now().Add(within)
	for {
		st, err := c.status(ctr)
		if err != nil {
			return nil, err
		}
		if st.State == runtimeapi.ContainerState_CONTAINER_EXITED {
			return st, nil
		}
		if time.Now().After(deadline) {
			return st, fmt.Errorf("container %s still %s after %s", ctr[:12], st.State, within)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (c *crash) removeContainer(ctr string) error {
	err := c.call("rm "+ctr[:12], func(ctx context.Context) error {
		_, err := c.rt.RemoveContainer(ctx, &runtimeapi.RemoveContainerRequest{ContainerId: ctr})
		return err
	})
	if err == nil {
		c.mu.Lock()
		c.removed[ctr] = true
		c.mu.Unlock()
		if left := c.d.vmLeft(ctr); len(left) > 0 {
			return fmt.Errorf("RemoveContainer %s answered OK while its VM was left: %v", ctr[:12], left)
		}
	}
	return err
}

func (c *crash) removePod(pod string, ctrs ...string) error {
	err := c.call("rmp "+pod[:12], func(ctx context.Context) error {
		_, err := c.rt.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: pod})
		return err
	})
	if err == nil {
		c.mu.Lock()
		c.removed[pod] = true
		for _, ctr := range ctrs {
			c.removed[ctr] = true
		}
		c.mu.Unlock()
		for _, ctr := range ctrs {
			if left := c.d.vmLeft(ctr); len(left) > 0 {
				return fmt.Errorf("RemovePodSandbox %s answered OK while a VM was left: %v", pod[:12], left)
			}
		}
	}
	return err
}

// churn runs one pod through a randomly chosen life. It returns the pod
// and container it leaves running ("" when it removed them).
func (c *crash) churn(i int, rng *rand.Rand) (keepPod, keepCtr string, err error) {
	name := fmt.Sprintf("crash-%02d", i)
	pod, cfg, err := c.runPod(name)
	if err != nil {
		return "", "", err
	}
	kind := rng.Intn(5)
	args := []string{"tick=50"}
	if kind == 0 {
		args = []string{"tick=20", "count=3"} // exits by itself, code 0
	}
	ctr, err := c.createContainer(pod, cfg, args...)
	if err != nil {
		return "", "", err
	}
	c.note("pod %s %s ctr %s kind %d", name, pod[:12], ctr[:12], kind)
	switch kind {
	case 0: // runs to completion: the true exit code survives every crash
		abandoned, err := c.start(ctr)
		if err != nil {
			return "", "", err
		}
		st, err := c.waitExited(ctr, 60*time.Second)
		if err != nil {
			return "", "", err
		}
		if !abandoned && (st.ExitCode != 0 || st.Reason != "Completed") {
			return "", "", fmt.Errorf("%s: a VM that powered off cleanly reports exit %d %s (%s)", ctr[:12], st.ExitCode, st.Reason, st.Message)
		}
		if err := c.removeContainer(ctr); err != nil {
			return "", "", err
		}
		return "", "", c.removePod(pod)
	case 1: // stop, then remove
		if _, err := c.start(ctr); err != nil {
			return "", "", err
		}
		time.Sleep(time.Duration(rng.Intn(300)) * time.Millisecond)
		if err := c.call("stop "+ctr[:12], func(ctx context.Context) error {
			_, err := c.rt.StopContainer(ctx, &runtimeapi.StopContainerRequest{ContainerId: ctr, Timeout: int64(rng.Intn(2))})
			return err
		}); err != nil {
			return "", "", err
		}
		if st, err := c.status(ctr); err != nil || st.State != runtimeapi.ContainerState_CONTAINER_EXITED {
			return "", "", fmt.Errorf("%s after a successful stop: %v %v", ctr[:12], st.GetState(), err)
		}
		if err := c.removeContainer(ctr); err != nil {
			return "", "", err
		}
		return "", "", c.removePod(pod)
	case 2: // removed while starting
		started := make(chan struct{})
		go func() { _, _ = c.start(ctr); close(started) }()
		time.Sleep(time.Duration(rng.Intn(30)) * time.Millisecond)
		var err error
		if rng.Intn(2) == 0 {
			err = c.removeContainer(ctr)
		} else {
			err = c.removePod(pod, ctr)
		}
		<-started
		if err != nil {
			return "", "", err
		}
		if left := c.d.vmLeft(ctr); len(left) > 0 {
			return "", "", fmt.Errorf("a start that raced its removal left %v", left)
		}
		return "", "", c.removePod(pod)
	case 3: // a victim: the chaos loop kills its QEMU or its shim
		abandoned, err := c.start(ctr)
		if err != nil {
			return "", "", err
		}
		if abandoned {
			return "", "", c.removePod(pod, ctr)
		}
		v := &victim{hit: make(chan string, 1)}
		c.mu.Lock()
		c.victims[ctr] = v
		c.mu.Unlock()
		var what string
		select {
		case what = <-v.hit:
		case <-time.After(20 * time.Second):
			c.mu.Lock()
			claimed := v.claimed
			delete(c.victims, ctr)
			c.mu.Unlock()
			if claimed { // a hit is under way: its outcome always arrives
				what = <-v.hit
			}
		}
		if what == "qemu" || what == "shim" {
			st, err := c.waitExited(ctr, 60*time.Second)
			if err != nil {
				return "", "", err
			}
			ok := (what == "qemu" && st.ExitCode == 137 && st.Reason == "Error") ||
				(what == "shim" && st.ExitCode == 255 && (st.Reason == "ShimDied" || st.Reason == "VMLost"))
			if !ok {
				return "", "", fmt.Errorf("%s: its %s was killed, but it reports exit %d %s (%s)", ctr[:12], what, st.ExitCode, st.Reason, st.Message)
			}
		}
		return "", "", c.removePod(pod, ctr)
	default: // left running until the end
		if abandoned, err := c.start(ctr); err != nil || abandoned {
			if err == nil {
				err = c.removePod(pod, ctr)
			}
			return "", "", err
		}
		return pod, ctr, nil
	}
}

// liveVMs maps the VM directory names of running QEMUs of the daemon to their PIDs.
func (c *crash) liveVMs() map[string]int {
	vms := map[string]int{}
	for _, q := range testutil.QEMUsUnder(filepath.Join(c.d.stateDir, "vm")) {
		vms[filepath.Base(q.VMDir)] = q.Pid
	}
	return vms
}

// hitVictim kills the QEMU or the shim of one running victim.
func (c *crash) hitVictim(rng *rand.Rand) {
	c.mu.Lock()
	var ids []string
	for id, v := range c.victims {
		if !v.claimed {
			ids = append(ids, id)
		}
	}
	if len(ids) == 0 {
		c.mu.Unlock()
		return
	}
	id := ids[rng.Intn(len(ids))]
	v := c.victims[id]
	v.claimed = true
	c.mu.Unlock()
	what := "qemu"
	qemu, ok := c.liveVMs()[id[:16]]
	pid := qemu
	if rng.Intn(2) == 0 {
		what = "shim"
		pid = 0
		if pids := testutil.ShimsUnder(filepath.Join(c.d.stateDir, "vm", id[:16])); len(pids) == 1 {
			pid = pids[0]
		}
		if pid == 0 && ok { // a pooled shim: QEMU's parent
			pid = parentPid(qemu)
		}
	}
	if !ok || pid <= 1 {
		c.note("victim %s: no live VM to hit", id[:12])
		c.mu.Lock()
		delete(c.victims, id)
		c.mu.Unlock()
		v.hit <- "none"
		return
	}
	c.mu.Lock()
	delete(c.victims, id)
	c.mu.Unlock()
	// pidfd: signal exactly the process found, never a recycled PID.
	if fd, err := unix.PidfdOpen(pid, 0); err == nil {
		_ = unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0)
		unix.Close(fd)
	}
	c.note("chaos: killed the %s (pid %d) of %s", what, pid, id[:12])
	v.hit <- what
}

func parentPid(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	p, _ := strconv.Atoi(f[1])
	return p
}

// 30 pods churned while the daemon is kill -9'd and shims and QEMUs are
// killed at random; then every invariant of a trustworthy runtime is
// checked. The seed is printed; UNILET_CRASH_SEED replays a run.
func TestCrashConsistency(t *testing.T) {
	seed := time.Now().UnixNano()
	if s := os.Getenv("UNILET_CRASH_SEED"); s != "" {
		var err error
		seed, err = strconv.ParseInt(s, 10, 64)
		require.NoError(t, err)
	}
	t.Logf("crash-consistency seed %d (replay: UNILET_CRASH_SEED=%d)", seed, seed)
	d := startDaemon(t, "--upstream-endpoint", "", "--accel", "tcg", "--shim-pool", "2")
	d.must("pull", image())
	conn, err := grpc.NewClient("unix://"+d.sock, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.Config{BaseDelay: 20 * time.Millisecond, Multiplier: 1.5, MaxDelay: 200 * time.Millisecond},
			MinConnectTimeout: time.Second}))
	require.NoError(t, err)
	defer conn.Close()
	c := &crash{t: t, d: d, rt: runtimeapi.NewRuntimeServiceClient(conn), removed: map[string]bool{}, victims: map[string]*victim{}}
	defer func() {
		if t.Failed() {
			t.Logf("seed %d; what happened:\n%s", seed, strings.Join(c.log, "\n"))
		}
	}()

	const pods, workers = 30, 3
	type kept struct{ pod, ctr string }
	var keptMu sync.Mutex
	var keep []kept
	next := make(chan int, pods)
	for i := 0; i < pods; i++ {
		next <- i
	}
	close(next)
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				rng := rand.New(rand.NewSource(seed + int64(i)))
				p, ctr, err := c.churn(i, rng)
				if err != nil {
					t.Errorf("pod %d: %v", i, err)
					return
				}
				if p != "" {
					keptMu.Lock()
					keep = append(keep, kept{p, ctr})
					keptMu.Unlock()
				}
			}
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()

	// Chaos, in this goroutine (it restarts the daemon): four daemon kills
	// and victims' QEMUs and shims, at random moments.
	rng := rand.New(rand.NewSource(seed))
	kills := 0
chaos:
	for {
		select {
		case <-done:
			break chaos
		case <-time.After(time.Duration(200+rng.Intn(1200)) * time.Millisecond):
		}
		if kills < 4 && rng.Intn(3) == 0 {
			kills++
			c.note("chaos: kill -9 the daemon (%d)", kills)
			d.crash()
			time.Sleep(time.Duration(rng.Intn(300)) * time.Millisecond)
			d.start()
			c.note("chaos: daemon back")
			continue
		}
		c.hitVictim(rng)
	}
	require.False(t, t.Failed())
	c.note("churn done; kill -9 the daemon once more")
	d.crash()
	d.start()

	// Every live QEMU is visible through CRI, and every RUNNING container
	// has a live QEMU.
	require.Eventually(t, func() bool {
		live := c.liveVMs()
		l, err := c.rt.ListContainers(context.Background(), &runtimeapi.ListContainersRequest{})
		if err != nil {
			return false
		}
		running := map[string]bool{}
		for _, ctr := range l.Containers {
			if c.removed[ctr.Id] {
				t.Fatalf("removed container %s is listed again", ctr.Id)
			}
			if ctr.State == runtimeapi.ContainerState_CONTAINER_RUNNING {
				running[ctr.Id[:16]] = true
			}
		}
		for dir := range live {
			if !running[dir] {
				c.note("live QEMU of %s is not a RUNNING container", dir)
				return false
			}
		}
		for dir := range running {
			if _, ok := live[dir]; !ok {
				c.note("RUNNING container %s has no live QEMU", dir)
				return false
			}
		}
		return len(running) == len(keep)
	}, 20*time.Second, 100*time.Millisecond, "CRI and the live VMs disagree")
	pl, err := c.rt.ListPodSandbox(context.Background(), &runtimeapi.ListPodSandboxRequest{})
	require.NoError(t, err)
	for _, p := range pl.Items {
		require.False(t, c.removed[p.Id], "removed pod %s is listed again", p.Id)
	}

	// Remove what is left; nothing of any pod may remain.
	for _, k := range keep {
		require.NoError(t, c.removePod(k.pod, k.ctr))
	}
	d.crash()
	d.start()
	l, err := c.rt.ListContainers(context.Background(), &runtimeapi.ListContainersRequest{})
	require.NoError(t, err)
	require.Empty(t, l.Containers)
	pl, err = c.rt.ListPodSandbox(context.Background(), &runtimeapi.ListPodSandboxRequest{})
	require.NoError(t, err)
	require.Empty(t, pl.Items)
	require.Eventually(t, func() bool { return len(qemuProcesses(t, d.stateDir)) == 0 }, 10*time.Second, 50*time.Millisecond, "QEMU left")
	require.Empty(t, testutil.ShimsUnder(d.stateDir), "shims left")
	ents, _ := os.ReadDir(filepath.Join(d.stateDir, "vm"))
	require.Empty(t, ents, "VM directories left")
	ents, _ = os.ReadDir(d.netnsDir)
	require.Empty(t, ents, "network namespaces left")
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	require.NotContains(t, string(mounts), d.netnsDir, "netns mounts left")
	cgRoot := filepath.Join("/sys/fs/cgroup/memory", d.cgroupRoot)
	if cgroups.Unified() {
		cgRoot = filepath.Join("/sys/fs/cgroup", d.cgroupRoot)
	}
	var cgLeft []string
	require.Eventually(t, func() bool {
		sub, _ := os.ReadDir(cgRoot)
		cgLeft = nil
		for _, e := range sub {
			if e.IsDir() {
				procs, _ := os.ReadFile(filepath.Join(cgRoot, e.Name(), "cgroup.procs"))
				cgLeft = append(cgLeft, e.Name()+" (procs: "+strings.Join(strings.Fields(string(procs)), ",")+")")
			}
		}
		return len(cgLeft) == 0
	}, 10*time.Second, 100*time.Millisecond, "VM or staging cgroups left under %s: %v", d.cgroupRoot, &cgLeft)
	links, _ := exec.Command("ip", "-o", "link", "show", "master", d.bridge).Output()
	if len(strings.TrimSpace(string(links))) > 0 {
		dbg, _ := exec.Command("sh", "-c", "lsns -t net; for p in /proc/[0-9]*; do l=$(readlink $p/ns/net); echo \"$l $(cat $p/comm) ${p#/proc/}\"; done | sort | uniq -c -w 20 | sort -n | head -50; ip netns list-id; ls -la /proc/*/fd 2>/dev/null | grep 'net:\\[' | head").CombinedOutput()
		t.Logf("debug:\n%s", dbg)
	}
	require.Empty(t, strings.TrimSpace(string(links)), "veths left on the test bridge")
}
