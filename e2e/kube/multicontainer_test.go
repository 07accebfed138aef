package kube_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/unilet-dev/unilet/internal/testutil"
)

// TestTwoContainerUnikernelPod: Kraftlet's way — each container of a
// unikernel pod is a VM of its own behind the one pod IP. Each answers on
// its own port (from the host, a Service and port-forward), they reach each
// other at the pod IP, share an emptyDir both ways, restart independently
// (one crashes, the other runs on in the same QEMU), and deleting the pod
// leaves nothing of either.
func TestTwoContainerUnikernelPod(t *testing.T) {
	t.Parallel() // its own pod and Service
	apply(t, fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata:
  name: duo
  labels: {app: duo}
spec:
  runtimeClassName: unikraft
  automountServiceAccountToken: false
  enableServiceLinks: false
  terminationGracePeriodSeconds: 5
  containers:
  - name: web
    image: %[1]s/unikraft/netguest:latest
    command: ["/bin/sh", "-c", "mkdir -p /w && echo web > /w/index.html && echo from-web > /shared/web.txt && httpd -p 8080 -h /w && until wget -q -O /w/peer.html http://$POD_IP:9090/index.html; do sleep 0.5; done; until [ -e /shared/index.html ]; do sleep 0.2; done; echo web-was-here >> /shared/index.html; echo WEB-READY; while [ ! -e /shared/crash-web ]; do sleep 0.2; done; rm /shared/crash-web; echo crashing; exit 3"]
    env: [{name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}]
    ports: [{containerPort: 8080}]
    readinessProbe: {tcpSocket: {port: 8080}, periodSeconds: 1}
    resources: {limits: {memory: 256Mi}}
    volumeMounts: [{name: shared, mountPath: /shared}]
  - name: cache
    image: %[1]s/unikraft/netguest:latest
    command: ["/bin/sh", "-c", "echo cache > /shared/index.html && exec httpd -f -p 9090 -h /shared"]
    ports: [{containerPort: 9090}]
    readinessProbe: {tcpSocket: {port: 9090}, periodSeconds: 1}
    resources: {limits: {memory: 256Mi}}
    volumeMounts: [{name: shared, mountPath: /shared}]
  volumes:
  - {name: shared, emptyDir: {}}
---
apiVersion: v1
kind: Service
metadata: {name: duo}
spec:
  selector: {app: duo}
  ports:
  - {name: web, port: 80, targetPort: 8080}
  - {name: cache, port: 90, targetPort: 9090}
`, registry))
	waitPod(t, "duo", `{.status.conditions[?(@.type=="Ready")].status}`, "True", 180*time.Second)
	ip := must(t, "get", "pod", "duo", "-o", "jsonpath={.status.podIP}")
	svc := must(t, "get", "service", "duo", "-o", "jsonpath={.spec.clusterIP}")
	q := qemuOf(t, "duo")
	require.Len(t, q, 2, "a VM per container: %v", q)

	require.Equal(t, "web\n", testutil.MustHTTPGet(t, "http://"+ip+":8080/", 30*time.Second))
	require.Equal(t, "from-web\n", testutil.MustHTTPGet(t, "http://"+ip+":9090/web.txt", 30*time.Second), "the cache VM reads what the web VM wrote")
	webLog := waitLogs(t, "duo", "WEB-READY", "-c", "web")
	require.NotContains(t, webLog, "can't", "web's writes to the emptyDir")
	require.Equal(t, "cache\n", testutil.MustHTTPGet(t, "http://"+ip+":8080/peer.html", 5*time.Second), "web reached cache at the pod IP")
	// What web appended, as the cache VM's httpd serves it (once seen
	// missing right after web said so: asked for a few seconds).
	var index string
	require.Eventually(t, func() bool {
		index, _ = get("http://" + ip + ":9090/index.html")
		return index == "cache\nweb-was-here\n"
	}, 15*time.Second, 250*time.Millisecond, "web wrote to cache's file")
	require.Equal(t, "cache\nweb-was-here\n", index)
	require.Equal(t, "web\n", testutil.MustHTTPGet(t, "http://"+svc+":80/", 30*time.Second), "the Service's port 80 reaches web")
	require.Equal(t, "from-web\n", testutil.MustHTTPGet(t, "http://"+svc+":90/web.txt", 30*time.Second), "the Service's port 90 reaches cache")

	port, pfOut := portForward(t, "duo", 9090)
	require.Equal(t, "from-web\n", testutil.MustHTTPGet(t, fmt.Sprintf("http://127.0.0.1:%d/web.txt", port), 30*time.Second), pfOut.String())

	// web crashes (exit 3) when a file appears in the emptyDir; kubelet
	// restarts it; cache runs on in the same QEMU.
	cacheQEMU := qemuOfContainer(t, "duo", "cache")
	uid := must(t, "get", "pod", "duo", "-o", "jsonpath={.metadata.uid}")
	emptyDir := filepath.Join(clusterDir, "kubelet", "root", "pods", uid, "volumes", "kubernetes.io~empty-dir", "shared")
	require.DirExists(t, emptyDir)
	require.NoError(t, os.WriteFile(filepath.Join(emptyDir, "crash-web"), nil, 0o644))
	waitPod(t, "duo", `{.status.containerStatuses[?(@.name=="web")].lastState.terminated.exitCode}`, "3", 60*time.Second)
	waitPod(t, "duo", `{.status.conditions[?(@.type=="Ready")].status}`, "True", 120*time.Second)
	require.Equal(t, "0", must(t, "get", "pod", "duo", "-o", `jsonpath={.status.containerStatuses[?(@.name=="cache")].restartCount}`))
	require.Equal(t, cacheQEMU, qemuOfContainer(t, "duo", "cache"), "cache's VM was not restarted")
	require.Equal(t, "web\n", testutil.MustHTTPGet(t, "http://"+ip+":8080/", 30*time.Second), "the restarted web answers")
	require.Contains(t, must(t, "logs", "duo", "-c", "web", "--previous"), "crashing")

	// Deleting the pod leaves nothing of either VM.
	rt := criClient(t)
	sandbox := sandboxOf(t, rt, uid)
	var vs []victim
	for _, name := range []string{"web", "cache"} {
		id := must(t, "get", "pod", "duo", "-o", fmt.Sprintf(`jsonpath={.status.containerStatuses[?(@.name=="%s")].containerID}`, name))
		_, id, _ = strings.Cut(id, "://")
		vs = append(vs, victim{name: "duo/" + name, uid: uid, id: id, sandbox: sandbox, ip: ip})
	}
	for _, v := range vs {
		require.Contains(t, strings.Join(v.leftovers(t, rt), "\n"), "QEMU ", "%s runs", v.name)
	}
	must(t, "delete", "service", "duo")
	must(t, "delete", "pod", "duo", "--wait=true", "--timeout=60s")
	waitNothingLeft(t, rt, vs)
}

// qemuOfContainer is the "PID ARGS" of the QEMU of one container of a pod.
func qemuOfContainer(t *testing.T, pod, container string) string {
	t.Helper()
	var found []string
	for _, l := range qemuFor(t) {
		if strings.Contains(l, "guest=default_"+pod+"_"+container+",") || strings.Contains(l, "guest=default_"+pod+"_"+container+" ") {
			found = append(found, l)
		}
	}
	require.Len(t, found, 1, "the QEMU of %s/%s", pod, container)
	return found[0]
}
