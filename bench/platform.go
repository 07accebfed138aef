package main

import (
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/internal/testimages"
)

// PlatformRow is Kraftlet's platform features on this node: starts from a
// template, scale-to-zero wakes, the memory clones share, idle CPU.
type PlatformRow struct {
	// ms from RunPodSandbox to the first console line: a pod restored from a
	// template, a pod booted cold, a bare QEMU cold boot (test kernel).
	TemplatePod, ColdPod, Bare Summary
	// Where a templated pod's start went (RunPodSandbox, CreateContainer,
	// StartContainer, the first console line after).
	TemplatePhases []Phase
	// ms from RunPodSandbox to the first HTTP response (network guest).
	TemplateHTTP, ColdHTTP Summary
	// A new TCP connection to a suspended VM: ms until it is established
	// (the guest's SYN-ACK, its first answer, wake included) and until the
	// first byte of the HTTP response; the same to a running VM.
	Wake, WakeHTTP, Awake, AwakeHTTP Summary
	// PSS per VM (MB): clones of one template vs cold-booted VMs of the
	// same guest (network guest, Clones at once); the template's memory
	// held once by its holder is included, shared among the clones.
	Clones                int
	ClonePSSMB, ColdPSSMB float64
	HolderMB              float64
	IdlePods              int
	IdleCPUOffPct         float64 // % of one core, IdlePods idle pods, scale-to-zero off
	IdleCPUOnPct          float64 // the same with scale-to-zero on
	IdlePodMB             float64 // PSS of one suspended pod (QEMU + shim)
	IdlePodsFit           int     // how many such pods this machine's memory holds
	Notes                 []string
}

// annotated returns a pod config with extra annotations.
func (e *env) annotated(name string, ann map[string]string) *runtimeapi.PodSandboxConfig {
	pc := e.podConfig(name)
	for k, v := range ann {
		pc.Annotations[k] = v
	}
	return pc
}

// uniletctl runs uniletctl against the bench daemon.
func (e *env) uniletctl(args ...string) error {
	_, err := e.uniletctlOut(args...)
	return err
}

func (e *env) uniletctlOut(args ...string) (string, error) {
	out, err := exec.Command(filepath.Join(e.bin, "uniletctl"), append(args, "--endpoint", "unix://"+filepath.Join(e.dir, "unilet.sock"))...).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("uniletctl %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// waitWarm waits (outside any measured interval) until template name has
// a warm clone ready, as a node that was not just busy starting pods has.
func (e *env) waitWarm(name string) error {
	re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + `\s.*\s[1-9]\d*$`)
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if out, err := e.uniletctlOut("template", "ls"); err == nil && re.MatchString(out) {
			return nil
		}
	}
	return fmt.Errorf("template %s got no warm clone within 30 s", name)
}

// podStart runs a pod and one container; it returns the pod, container,
// pod IP and log path, and when it began.
func (e *env) podStart(name, image string, ann map[string]string, cmd, args []string) (vm, string, time.Time, error) {
	pc := e.annotated(name, ann)
	t0 := time.Now()
	mark := t0
	var v vm
	phase := func(i int) { now := time.Now(); v.phases[i] = now.Sub(mark); mark = now }
	pod, err := e.rt.RunPodSandbox(bg, &runtimeapi.RunPodSandboxRequest{Config: pc})
	if err != nil {
		return vm{}, "", t0, err
	}
	phase(0)
	v.pod, v.log = pod.GetPodSandboxId(), filepath.Join(pc.LogDirectory, "app", "0.log")
	ctr, err := e.rt.CreateContainer(bg, &runtimeapi.CreateContainerRequest{PodSandboxId: v.pod, SandboxConfig: pc,
		Config: &runtimeapi.ContainerConfig{Metadata: &runtimeapi.ContainerMetadata{Name: "app"}, Image: &runtimeapi.ImageSpec{Image: image},
			Command: cmd, Args: args, LogPath: "app/0.log"}})
	if err != nil {
		return v, "", t0, err
	}
	phase(1)
	v.ctr = ctr.GetContainerId()
	if _, err := e.rt.StartContainer(bg, &runtimeapi.StartContainerRequest{ContainerId: v.ctr}); err != nil {
		return v, "", t0, err
	}
	phase(2)
	st, err := e.rt.PodSandboxStatus(bg, &runtimeapi.PodSandboxStatusRequest{PodSandboxId: v.pod})
	if err != nil {
		return v, "", t0, err
	}
	return v, st.GetStatus().GetNetwork().GetIp(), t0, nil
}

// getUntil GETs url until it answers 200 (deadline 60 s); the body.
func getUntil(url string) (string, error) {
	c := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	deadline := time.Now().Add(60 * time.Second)
	for {
		r, err := c.Get(url)
		if err == nil {
			b, _ := io.ReadAll(r.Body)
			r.Body.Close()
			if r.StatusCode == 200 {
				return string(b), nil
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("GET %s: no answer within 60 s: %v", url, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// pssMB is a process's proportional set size.
func pssMB(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "Pss:") {
			var kb float64
			fmt.Sscanf(strings.TrimSpace(strings.TrimPrefix(l, "Pss:")), "%f", &kb)
			return kb / 1024
		}
	}
	return 0
}

// vmPids are the processes of container ctr's VM: its cgroup's (QEMU and
// its shim).
func vmPids(ctr string) []int {
	var out []int
	for _, p := range []string{"/sys/fs/cgroup/memory" + benchCgrp, "/sys/fs/cgroup" + benchCgrp} {
		b, err := os.ReadFile(filepath.Join(p, ctr, "cgroup.procs"))
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(b)) {
			if pid, err := strconv.Atoi(f); err == nil {
				out = append(out, pid)
			}
		}
		break
	}
	return out
}

// vmPSS sums the PSS of the QEMUs and shims of the containers ctrs.
func vmPSS(ctrs []string) float64 {
	var sum float64
	for _, c := range ctrs {
		for _, pid := range vmPids(c) {
			sum += pssMB(pid)
		}
	}
	return sum
}

// memfdMB is what the memfds a process holds take in memory.
func memfdMB(pid int) float64 {
	var sum float64
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	for _, en := range ents {
		p := fmt.Sprintf("/proc/%d/fd/%s", pid, en.Name())
		if l, _ := os.Readlink(p); strings.HasPrefix(l, "/memfd:") {
			var st unix.Stat_t
			if unix.Stat(p, &st) == nil {
				sum += float64(st.Blocks*512) / (1 << 20)
			}
		}
	}
	return sum
}

// netGuest builds the network test guest (cached under _output) and pushes
// it to the bench registry.
func (e *env) netGuest() (string, error) {
	repo, _ := os.Getwd()
	out := filepath.Join(repo, "_output", "netguest")
	if err := sh(repo, "./e2e/guest/netguest/build.sh", out); err != nil {
		return "", err
	}
	kc := filepath.Join(e.dir, "netguest.kconfig")
	if err := os.WriteFile(kc, []byte(testimages.NetGuestKConfig), 0o644); err != nil {
		return "", err
	}
	ref := strings.Replace(e.image, "testkernel:bench", "netguest:bench", 1)
	if err := sh(repo, filepath.Join(e.bin, "uniletctl"), "pack", "--kernel", filepath.Join(out, "vmlinuz"), "--initrd", filepath.Join(out, "initrd.gz"),
		"--kconfig", kc, "--label", "dev.unilet.min-memory=128", "--push", ref, "--insecure"); err != nil {
		return "", err
	}
	if _, err := e.img.PullImage(bg, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: ref}, SandboxConfig: e.podConfig("pull")}); err != nil {
		return "", err
	}
	return ref, nil
}

const (
	annTemplate = "cloud.unikraft.v1.instances/template"
	annPolicy   = "cloud.unikraft.v1.instances/scale_to_zero.policy"
	annCooldown = "cloud.unikraft.v1.instances/scale_to_zero.cooldown_time_ms"
	webScript   = "mkdir -p /w && echo hello > /w/index.html && echo SERVING && exec httpd -f -p 8080 -h /w"
)

// measurePlatform measures templates, scale-to-zero and idle density.
func (e *env) measurePlatform(o options, res *Results) error {
	row := &PlatformRow{}
	res.Details.Platform = row
	runs, httpRuns, wakes, clones, idle := 15, 5, 12, 20, 100
	if o.quick {
		runs, httpRuns, wakes, clones = 6, 2, 5, 10
	}

	// 1. Starts to the first console line: template pod vs cold pod vs bare.
	if err := e.uniletctl("template", "create", "bt", "--image", e.image, "--arg", "tick=5", "--ready-log", `tick 3\b`); err != nil {
		return err
	}
	var tp, cp, bq []float64
	var tph [4][]float64
	for i := 0; i < runs; i++ {
		if err := e.waitWarm("bt"); err != nil {
			return err
		}
		e.settle()
		v, _, t0, err := e.podStart(fmt.Sprintf("tp%d", i), e.image, map[string]string{annTemplate: "bt"}, nil, []string{"tick=5"})
		if err == nil {
			err = waitLine(v.log, 30*time.Second)
		}
		if err != nil {
			return fmt.Errorf("templated pod: %w", err)
		}
		total := time.Since(t0)
		tp = append(tp, ms(total))
		v.phases[3] = total - v.phases[0] - v.phases[1] - v.phases[2]
		for j, p := range v.phases {
			tph[j] = append(tph[j], ms(p))
		}
		if b, _ := os.ReadFile(v.log); strings.Contains(string(b), "could not be restored") {
			return fmt.Errorf("the templated pod booted cold: %s", b)
		}
		e.remove(v)
		e.settle()
		d, cv, err := e.startVM([]string{tickArg})
		if err != nil {
			return err
		}
		cp = append(cp, ms(d))
		e.remove(cv)
		e.settle()
		d, q, err := e.startBare(e.bareArgv(e.argv, i, "", ""), 0)
		if err != nil {
			return err
		}
		q.kill()
		bq = append(bq, ms(d))
	}
	row.TemplatePod, row.ColdPod, row.Bare = summarize(tp), summarize(cp), summarize(bq)
	for j, n := range phaseNames {
		row.TemplatePhases = append(row.TemplatePhases, Phase{Name: n, Summary: summarize(tph[j])})
	}
	res.TemplateStartRatio = round(row.TemplatePod.P50/row.Bare.P50, 3)

	// 2. The network guest: to the first HTTP response, template vs cold.
	ng, err := e.netGuest()
	if err != nil {
		row.Notes = append(row.Notes, "network guest sections skipped: "+err.Error())
		log.Printf("  network guest unavailable, its sections skipped: %v", err)
	} else if err := e.measureWeb(o, row, res, ng, httpRuns, wakes, clones); err != nil {
		return err
	}

	// 3. Idle CPU of many idle pods (the test kernel printing a line every
	// 100 ms), scale-to-zero off and on.
	if err := e.ensureTaps(1); err != nil {
		return err
	}
	for _, on := range []bool{false, true} {
		ann := map[string]string{}
		if on {
			ann = map[string]string{annPolicy: "on", annCooldown: "500"}
		}
		var vs []vm
		for i := 0; i < idle; i++ {
			v, _, _, err := e.podStart(fmt.Sprintf("idle%v%d", on, i), e.image, ann, nil, []string{"tick=100"})
			if err != nil {
				for _, v := range vs {
					e.remove(v)
				}
				return fmt.Errorf("idle pods: %w", err)
			}
			vs = append(vs, v)
		}
		time.Sleep(5 * time.Second) // booted, and (with scale-to-zero) suspended
		var pids []int
		var ctrs []string
		for _, v := range vs {
			ctrs = append(ctrs, v.ctr)
			pids = append(pids, vmPids(v.ctr)...)
		}
		before := cpuMap(pids)
		window := 10 * time.Second
		time.Sleep(window)
		pct := round(100*cpuOf(pids, before)/window.Seconds(), 2)
		if on {
			row.IdleCPUOnPct = pct
			row.IdlePodMB = round(vmPSS(ctrs)/float64(len(ctrs)), 1)
			if row.IdlePodMB > 0 {
				row.IdlePodsFit = int(float64(memTotalMB()) / row.IdlePodMB)
			}
		} else {
			row.IdleCPUOffPct = pct
		}
		for _, v := range vs {
			e.remove(v)
		}
	}
	row.IdlePods = idle
	res.IdleCPUPct100 = row.IdleCPUOnPct
	return nil
}

// measureWeb runs the network guest's parts of the platform section.
func (e *env) measureWeb(o options, row *PlatformRow, res *Results, image string, runs, wakes, clones int) error {
	sh := []string{"/bin/sh", "-c", webScript}
	args := []string{"--image", image, "--ready-log", "SERVING", "--timeout", "180s"}
	for _, a := range sh {
		args = append(args, "--arg", a)
	}
	if err := e.uniletctl(append([]string{"template", "create", "web"}, args...)...); err != nil {
		return err
	}
	get := func(ip string) (float64, error) {
		t0 := time.Now()
		if _, err := getUntil("http://" + net.JoinHostPort(ip, "8080") + "/index.html"); err != nil {
			return 0, err
		}
		return ms(time.Since(t0)), nil
	}
	var th, ch []float64
	for i := 0; i < runs; i++ {
		for _, tmpl := range []bool{true, false} {
			if tmpl {
				if err := e.waitWarm("web"); err != nil {
					return err
				}
			}
			e.settle()
			ann, cmd := map[string]string{}, sh
			if tmpl {
				ann, cmd = map[string]string{annTemplate: "web"}, nil
			}
			v, ip, t0, err := e.podStart(fmt.Sprintf("web%v%d", tmpl, i), image, ann, cmd, nil)
			if err != nil {
				return err
			}
			if _, err := get(ip); err != nil {
				return err
			}
			if tmpl {
				th = append(th, ms(time.Since(t0)))
			} else {
				ch = append(ch, ms(time.Since(t0)))
			}
			e.remove(v)
		}
	}
	row.TemplateHTTP, row.ColdHTTP = summarize(th), summarize(ch)

	// Wake: a request to a suspended clone, and one to a running one.
	v, ip, _, err := e.podStart("sleepy", image, map[string]string{annTemplate: "web", annPolicy: "on", annCooldown: "300"}, nil, nil)
	if err != nil {
		return err
	}
	if _, err := get(ip); err != nil {
		e.remove(v)
		return err
	}
	var wk, wkh, aw, awh []float64
	for i := 0; i < wakes; i++ {
		if c, h, err := request(ip); err == nil {
			aw, awh = append(aw, c), append(awh, h)
		}
		if err := e.waitReason(v.ctr, "ScaledToZero", 10*time.Second); err != nil {
			e.remove(v)
			return err
		}
		c, h, err := request(ip)
		if err != nil {
			e.remove(v)
			return err
		}
		wk, wkh = append(wk, c), append(wkh, h)
	}
	e.remove(v)
	row.Wake, row.WakeHTTP, row.Awake, row.AwakeHTTP = summarize(wk), summarize(wkh), summarize(aw), summarize(awh)
	res.WakeMsP50 = round(row.Wake.P50, 2)

	// Memory: clones at once vs cold VMs at once.
	for _, tmpl := range []bool{true, false} {
		var vs []vm
		var ctrs []string
		for i := 0; i < clones; i++ {
			ann, cmd := map[string]string{}, sh
			if tmpl {
				ann, cmd = map[string]string{annTemplate: "web"}, nil
			}
			v, ip, _, err := e.podStart(fmt.Sprintf("mem%v%d", tmpl, i), image, ann, cmd, nil)
			if err == nil {
				_, err = get(ip)
			}
			if err != nil {
				for _, v := range vs {
					e.remove(v)
				}
				return err
			}
			vs, ctrs = append(vs, v), append(ctrs, v.ctr)
		}
		pss := vmPSS(ctrs)
		if tmpl {
			for _, pid := range pidsMatching("--template-ram", e.dir) {
				row.HolderMB += memfdMB(pid)
			}
			row.HolderMB = round(row.HolderMB, 1)
			row.ClonePSSMB = round((pss+row.HolderMB)/float64(clones), 1)
		} else {
			row.ColdPSSMB = round(pss/float64(clones), 1)
		}
		for _, v := range vs {
			e.remove(v)
		}
	}
	row.Clones = clones
	if row.ColdPSSMB > 0 {
		res.ClonePSSRatio = round(row.ClonePSSMB/row.ColdPSSMB, 3)
	}
	return nil
}

// waitReason waits until a container's status shows reason.
func (e *env) waitReason(ctr, reason string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		st, err := e.rt.ContainerStatus(bg, &runtimeapi.ContainerStatusRequest{ContainerId: ctr})
		if err == nil && st.GetStatus().GetReason() == reason {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("container %s never showed %s", ctr, reason)
}

// memTotalMB is this machine's memory.
func memTotalMB() int {
	b, _ := os.ReadFile("/proc/meminfo")
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "MemTotal:") {
			kb, _ := strconv.Atoi(strings.Fields(l)[1])
			return kb / 1024
		}
	}
	return 0
}

// request opens a TCP connection to ip:8080 and sends an HTTP request; it
// returns the ms until the connection was established and until the first
// byte of the response.
func request(ip string) (float64, float64, error) {
	t0 := time.Now()
	c, err := net.DialTimeout("tcp", net.JoinHostPort(ip, "8080"), 10*time.Second)
	if err != nil {
		return 0, 0, err
	}
	defer c.Close()
	connected := ms(time.Since(t0))
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, "GET /index.html HTTP/1.0\r\n\r\n"); err != nil {
		return 0, 0, err
	}
	if _, err := c.Read(make([]byte, 1)); err != nil {
		return 0, 0, err
	}
	return connected, ms(time.Since(t0)), nil
}
