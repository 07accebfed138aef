package kube_test

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// Kraftlet's example shape, deploy/examples/service-deployment.yaml as
// written: a Deployment of three unikernel replicas (the network guest
// answering HTTP with its pod name) behind a Service, port 443 → 8080. kube-proxy balances across all three at the
// ClusterIP from the node and from a plain pod, which finds the Service by
// its cluster DNS name (CoreDNS behind kube-system/kube-dns); the NodePort
// on the node's address reaches them too.
func TestServiceBalancesAcrossUnikernelReplicas(t *testing.T) {
	t.Parallel() // its own objects only: runs beside the other waiting specs
	apply(t, example(t, "service-deployment.yaml"))
	apply(t, fmt.Sprintf(`# Selected by the Service, never ready: its guest runs no server.
apiVersion: v1
kind: Pod
metadata:
  name: web-unready
  labels: {app: web}
  annotations: {kubernetes.io/target-runtime: unikraft}
spec:
  automountServiceAccountToken: false
  enableServiceLinks: false
  containers:
  - name: web
    image: %[1]s/unikraft/netguest:latest
    command: ["/bin/sh", "-c", "echo NOT-SERVING; exec sleep 3600"]
    readinessProbe:
      tcpSocket: {port: 8080}
      periodSeconds: 1
`, registry))
	must(t, "rollout", "status", "deployment/web", "--timeout=300s")
	waitLogs(t, "web-unready", "NOT-SERVING")
	require.Equal(t, "False", must(t, "get", "pod", "web-unready", "-o", `jsonpath={.status.conditions[?(@.type=="Ready")].status}`))
	names := strings.Fields(must(t, "get", "pods", "-l", "app=web,tier=replica", "-o", "jsonpath={.items[*].metadata.name}"))
	require.Len(t, names, 3)
	sort.Strings(names)
	ip := must(t, "get", "service", "web", "-o", "jsonpath={.spec.clusterIP}")
	nodePort := must(t, "get", "service", "web", "-o", "jsonpath={.spec.ports[0].nodePort}")

	// From the node: the ClusterIP, then the NodePort on the node's bridge
	// address; every replica answers in turn, and the VM that is not ready
	// gets no request (none fails).
	for _, url := range []string{"http://" + ip + ":443/", "http://198.19.0.1:" + nodePort + "/"} {
		require.Equal(t, names, answering(t, func() (string, error) { return get(url) }), url)
		for i := 0; i < 20; i++ {
			body, err := get(url)
			require.NoError(t, err, "request %d to %s", i, url)
			require.Contains(t, names, strings.TrimSpace(body))
		}
	}

	// From a plain pod, by the Service's DNS name (CoreDNS through the
	// kube-dns Service).
	plainClient(t, "client")
	// busybox's own resolver (the image's glibc-static wget cannot resolve
	// without NSS modules): the name is the Service's ClusterIP.
	out := must(t, "exec", "client", "--", "busybox", "nslookup", "web.default.svc.cluster.local")
	require.Contains(t, out, "Server:\t\t198.19.255.10", out)
	require.Regexp(t, `Name:\s+web\.default\.svc\.cluster\.local\s+Address:\s+`+regexp.QuoteMeta(ip)+`\b`, out)
	require.Equal(t, names, answering(t, func() (string, error) {
		out, err := kubectl("exec", "client", "--", "sh", "-c", "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc "+ip+" 443")
		if err != nil || !strings.HasPrefix(out, "HTTP/1.1 200") {
			return "", fmt.Errorf("%v: %s", err, out)
		}
		lines := strings.Split(strings.TrimSpace(out), "\n")
		return lines[len(lines)-1], nil
	}), "from a plain pod")

	// From inside a unikernel guest: the cluster DNS (the pod's DNS config
	// reaches the guest as the netdev library parameter; our guest's init
	// writes it to /etc/resolv.conf) and the ClusterIP.
	apply(t, fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata:
  name: vm-client
  annotations: {kubernetes.io/target-runtime: unikraft}
spec:
  automountServiceAccountToken: false
  enableServiceLinks: false
  containers:
  - name: c
    image: %s/unikraft/netguest:latest
    command: ["/bin/sh", "-c", "cat /etc/resolv.conf; nslookup web.default.svc.cluster.local; a=$(nslookup web.default.svc.cluster.local | sed -n 's/^Address: //p' | tail -1); wget -q -O - http://$a:443/ && echo FETCHED-$((6*7)); exec sleep 3600"]
`, registry))
	logs := waitLogs(t, "vm-client", "FETCHED-42") // not in the command line the guest echoes
	require.Contains(t, logs, "nameserver 198.19.255.10")
	require.Contains(t, logs, "search default.svc.cluster.local")
	require.Regexp(t, `Address: `+regexp.QuoteMeta(ip)+`\b`, logs)
	require.Regexp(t, `(?m)^web-[0-9a-z]+-[0-9a-z]+\s*$`, logs, "a replica answered the guest")
}

// example is a manifest of deploy/examples, which name this cluster's
// registry.
func example(t *testing.T, name string) string {
	b, err := os.ReadFile(filepath.Join(repoRoot, "deploy", "examples", name))
	require.NoError(t, err)
	require.Contains(t, string(b), "image: "+registry+"/")
	return string(b)
}

// plainClient runs a plain (runc) busybox pod that sleeps, to run
// clients in with kubectl exec; on the node named, if one is.
func plainClient(t *testing.T, name string, node ...string) {
	t.Helper()
	spec := ""
	if len(node) > 0 {
		spec = "\n  nodeName: " + node[0]
	}
	apply(t, fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata: {name: %s}
spec:%s
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1 # sleep as PID 1 ignores SIGTERM
  containers:
  - name: sh
    image: unilet.test/busybox:1
    imagePullPolicy: Never
    command: ["sleep", "3600"]
`, name, spec))
	waitRunning(t, name)
}

// answering calls get until every distinct answer has come at least twice
// or 60 calls were made, and returns the distinct answers, sorted.
func answering(t *testing.T, get func() (string, error)) []string {
	t.Helper()
	seen := map[string]int{}
	var lastErr error
	for i := 0; i < 60; i++ {
		body, err := get()
		if err != nil {
			lastErr = err
			time.Sleep(200 * time.Millisecond)
			continue
		}
		seen[strings.TrimSpace(body)]++
		if len(seen) == 3 {
			break
		}
	}
	var out []string
	for k := range seen {
		out = append(out, k)
	}
	sort.Strings(out)
	if len(out) < 3 {
		t.Logf("answers %v, last error %v", seen, lastErr)
	}
	return out
}

func get(url string) (string, error) {
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	r, err := c.Get(url)
	if err != nil {
		return "", err
	}
	defer r.Body.Close()
	b, err := io.ReadAll(r.Body)
	return string(b), err
}
