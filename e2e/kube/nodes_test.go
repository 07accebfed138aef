package kube_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// The e2e cluster's second node (e2e/kube/cluster/node2.go): no KVM label,
// no unilet (kubelet → containerd), its own pod subnet, tainted NoSchedule
// so that single-node specs keep their pods on the first node.
const (
	node2      = "198.19.1.1"
	node2Taint = `{key: unilet.dev/e2e-second-node, operator: Exists, effect: NoSchedule}`
)

// TestSecondNodeWithoutKVM: unikernel pods (RuntimeClass unikraft) are
// scheduled only to nodes labelled unilet.dev/ready — never to the second
// node, even when they tolerate its taint, and not at all while no node is
// ready; a plain pod on the second node reaches unikernel pods on the first
// through a Service.
func TestSecondNodeWithoutKVM(t *testing.T) {
	require.Equal(t, "True", must(t, "get", "node", node2, "-o", `jsonpath={.status.conditions[?(@.type=="Ready")].status}`))
	require.Empty(t, must(t, "get", "node", node2, "-o", `jsonpath={.metadata.labels.unilet\.dev/kvm}`))
	require.Contains(t, must(t, "get", "runtimeclass", "unikraft", "-o", "jsonpath={.scheduling.nodeSelector}"), `"unilet.dev/ready":"true"`)
	node1 := must(t, "get", "node", "-l", "unilet.dev/ready=true", "-o", "jsonpath={.items[*].metadata.name}")
	require.Equal(t, "localhost", node1)

	// Four replicas that would fit either node (they tolerate the second
	// node's taint): the RuntimeClass keeps every one on the first.
	apply(t, fmt.Sprintf(`apiVersion: apps/v1
kind: Deployment
metadata: {name: mn-web}
spec:
  replicas: 4
  selector: {matchLabels: {app: mn-web}}
  template:
    metadata: {labels: {app: mn-web}}
    spec:
      runtimeClassName: unikraft
      tolerations: [%[2]s]
      automountServiceAccountToken: false
      enableServiceLinks: false
      containers:
      - name: web
        image: %[1]s/unikraft/netguest:latest
        command: ["/bin/sh", "-c", "mkdir -p /w && echo $POD_NAME > /w/index.html && exec httpd -f -p 8080 -h /w"]
        env: [{name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}]
        readinessProbe:
          tcpSocket: {port: 8080}
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {name: mn-web}
spec:
  selector: {app: mn-web}
  ports: [{port: 80, targetPort: 8080}]
`, registry, node2Taint))
	must(t, "rollout", "status", "deployment/mn-web", "--timeout=300s")
	nodes := strings.Fields(must(t, "get", "pods", "-l", "app=mn-web", "-o", "jsonpath={.items[*].spec.nodeName}"))
	require.Equal(t, []string{"localhost", "localhost", "localhost", "localhost"}, nodes)

	// From the second node's pod network, through the Service, to the VMs.
	plainClient(t, "node2-client", node2)
	require.True(t, strings.HasPrefix(must(t, "get", "pod", "node2-client", "-o", "jsonpath={.status.podIP}"), "198.19.1."))
	names := strings.Fields(must(t, "get", "pods", "-l", "app=mn-web", "-o", "jsonpath={.items[*].metadata.name}"))
	var out string
	require.Eventually(t, func() bool {
		var err error
		out, err = kubectl("exec", "node2-client", "--", "sh", "-c", "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc mn-web.default.svc.cluster.local 80")
		lines := strings.Split(strings.TrimSpace(out), "\n")
		return err == nil && contains(names, strings.TrimSpace(lines[len(lines)-1]))
	}, 60*time.Second, 500*time.Millisecond, "a replica answers the second node's pod: %q", out)

	// No node ready for unikernels: a new one waits, even though the second
	// node would take it; once the first is ready again it runs there.
	must(t, "label", "node", "localhost", "unilet.dev/ready-")
	t.Cleanup(func() { _, _ = kubectl("label", "node", "localhost", "unilet.dev/ready=true", "--overwrite") })
	must(t, "scale", "deployment/mn-web", "--replicas=5")
	var pending string
	require.Eventually(t, func() bool {
		pending, _ = kubectl("get", "pods", "-l", "app=mn-web", "--field-selector=status.phase=Pending", "-o", "jsonpath={.items[*].metadata.name}")
		return pending != ""
	}, 30*time.Second, 250*time.Millisecond)
	require.Eventually(t, func() bool {
		ev, _ := kubectl("get", "events", "--field-selector", "involvedObject.name="+pending+",reason=FailedScheduling", "-o", "jsonpath={.items[*].message}")
		return strings.Contains(ev, "didn't match Pod's node affinity/selector")
	}, 30*time.Second, 250*time.Millisecond, "the scheduler says why %s waits", pending)
	require.Empty(t, must(t, "get", "pod", pending, "-o", "jsonpath={.spec.nodeName}"))
	must(t, "label", "node", "localhost", "unilet.dev/ready=true")
	waitRunning(t, pending)
	require.Equal(t, "localhost", must(t, "get", "pod", pending, "-o", "jsonpath={.spec.nodeName}"))
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
