package kube_test

import (
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// Virtlet's example shape (deploy/examples/statefulset.yaml): a StatefulSet of three unikernel pods behind a
// headless Service, with a TCP readiness probe. Each member's DNS name
// resolves (from a plain pod) to that member's pod IP; scaling 3 → 1 → 3 and
// deleting a member bring the same names back, resolving to the new pods.
func TestStatefulSetMembersByName(t *testing.T) {
	t.Parallel() // its own objects only: runs beside the other waiting specs
	apply(t, example(t, "statefulset.yaml"))
	plainClient(t, "dns-client")
	// resolves checks that each member's name resolves to its pod IP and
	// that the member answers there with its own hostname.
	resolves := func(members ...string) {
		t.Helper()
		for _, m := range members {
			waitPod(t, m, `{.status.conditions[?(@.type=="Ready")].status}`, "True", 180*time.Second)
			ip := must(t, "get", "pod", m, "-o", "jsonpath={.status.podIP}")
			name := m + ".k8s.default.svc.cluster.local"
			var out string
			require.Eventually(t, func() bool {
				out, _ = kubectl("exec", "dns-client", "--", "busybox", "nslookup", name)
				return regexp.MustCompile(`Address: ` + regexp.QuoteMeta(ip) + `\b`).MatchString(out)
			}, 30*time.Second, 500*time.Millisecond, "%s should resolve to %s: %s", name, ip, out)
			page, err := kubectl("exec", "dns-client", "--", "sh", "-c", "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc "+ip+" 8080")
			require.NoError(t, err, page)
			require.True(t, strings.HasSuffix(strings.TrimSpace(page), m), "%s answers as itself: %q", m, page)
		}
	}
	resolves("k8s-0", "k8s-1", "k8s-2")

	must(t, "scale", "statefulset/k8s", "--replicas=1")
	require.Eventually(t, func() bool {
		out, _ := kubectl("get", "pods", "-l", "app=k8s", "-o", "jsonpath={.items[*].metadata.name}")
		return out == "k8s-0"
	}, 120*time.Second, 500*time.Millisecond, "scaled to k8s-0 alone")
	require.Eventually(t, func() bool { // CoreDNS caches answers for 5 s
		out, _ := kubectl("exec", "dns-client", "--", "busybox", "nslookup", "k8s-2.k8s.default.svc.cluster.local")
		return !strings.Contains(out, "Address: 198.19.0.")
	}, 30*time.Second, time.Second, "a removed member's name no longer resolves")
	must(t, "scale", "statefulset/k8s", "--replicas=3")
	resolves("k8s-1", "k8s-2")

	before := must(t, "get", "pod", "k8s-1", "-o", "jsonpath={.metadata.uid}")
	must(t, "delete", "pod", "k8s-1", "--wait=true", "--timeout=60s")
	require.Eventually(t, func() bool {
		uid, err := kubectl("get", "pod", "k8s-1", "-o", "jsonpath={.metadata.uid}")
		return err == nil && uid != "" && uid != before
	}, 60*time.Second, 500*time.Millisecond, "k8s-1 comes back under its name")
	resolves("k8s-1")
}
