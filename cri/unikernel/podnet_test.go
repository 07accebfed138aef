package unikernel

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/cri/store"
	"github.com/unilet-dev/unilet/pkg/vmnet"
	"github.com/unilet-dev/unilet/vmm"
)

func TestContainerPorts(t *testing.T) {
	for raw, want := range map[string][]vmnet.Port{
		"": nil,
		`[{"name":"http","containerPort":8080,"protocol":"TCP"}]`:                      {{Proto: "tcp", Port: 8080}},
		`[{"containerPort":53,"protocol":"UDP"},{"containerPort":53}]`:                 {{Proto: "udp", Port: 53}, {Proto: "tcp", Port: 53}},
		`[{"containerPort":80},{"containerPort":80,"protocol":"TCP","hostPort":8080}]`: {{Proto: "tcp", Port: 80}},
		`[{"containerPort":9,"protocol":"SCTP"}]`:                                      {{Proto: "sctp", Port: 9}},
	} {
		got, err := ContainerPorts(map[string]string{AnnotationContainerPorts: raw})
		require.NoError(t, err, raw)
		require.Equal(t, want, got, raw)
	}
	for _, bad := range []string{`{}`, `[{"containerPort":0}]`, `[{"containerPort":65536}]`, `[{"containerPort":80,"protocol":"ICMP"}]`, `[`} {
		_, err := ContainerPorts(map[string]string{AnnotationContainerPorts: bad})
		require.ErrorContains(t, err, AnnotationContainerPorts, bad)
	}
	got, err := ContainerPorts(nil)
	require.NoError(t, err)
	require.Nil(t, got)
}

// FuzzContainerPorts: whatever the annotation holds, what parses is a list
// of distinct TCP/UDP/SCTP ports the namespace can route.
func FuzzContainerPorts(f *testing.F) {
	for _, s := range []string{`[{"containerPort":8080,"protocol":"TCP"}]`, `[{"containerPort":53,"protocol":"udp"},{"containerPort":53}]`, `[]`, `null`, `[{}]`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		ports, err := ContainerPorts(map[string]string{AnnotationContainerPorts: raw})
		if err != nil {
			return
		}
		r := vmnet.Routes{Default: -1, Members: []vmnet.Member{{Index: 0, Ports: ports}}}
		if err := r.Validate(); err != nil {
			t.Fatalf("%q parsed to ports the namespace refuses: %v", raw, err)
		}
		seen := map[vmnet.Port]bool{}
		for _, p := range ports {
			if seen[p] {
				t.Fatalf("%q: port %s twice", raw, p)
			}
			seen[p] = true
		}
	})
}

// podWith is a routed pod whose containers are given as name, tap, state
// and ports annotation (records only: no VM, no namespace).
func podWith(t *testing.T, s *Service, ctrs ...[4]string) (*sandbox, []*container) {
	t.Helper()
	g, err := vmnet.ParseGuestNetwork(vmnet.DefaultGuestNetwork)
	require.NoError(t, err)
	sb := s.sandboxes.Restore(newID(), sandboxMeta{Config: &runtimeapi.PodSandboxConfig{}, NetNS: "/nonexistent", rt: &sandboxRuntime{}},
		sandboxStatus{State: store.SandboxReady, Guest: &g})
	var out []*container
	for i, c := range ctrs {
		ann := map[string]string{}
		if c[3] != "" {
			ann[AnnotationContainerPorts] = c[3]
		}
		meta := containerMeta{SandboxID: sb.ID(), CreatedAt: time.Unix(int64(i), 0),
			Config:  &runtimeapi.ContainerConfig{Metadata: &runtimeapi.ContainerMetadata{Name: c[0]}, Annotations: ann},
			Machine: vmm.MachineConfig{NICs: []vmm.NIC{{Tap: c[1]}}}}
		out = append(out, s.containers.Restore(newID(), meta, containerStatus{State: store.ContainerState(c[2])}))
	}
	return sb, out
}

// The routes of a pod follow its containers: one container routes as
// vmnet.Single; undeclared ports go to the lowest tap whose VM runs, and
// move when it ends; the default VM's own ports need no rule; a tap's
// ports are its newest container's.
func TestPodRoutes(t *testing.T) {
	s := newTestService(t, Config{}, nil)
	sb, _ := podWith(t, s, [4]string{"app", "tap0", "running", `[{"containerPort":8080}]`})
	require.True(t, s.podRoutes(sb).Equal(vmnet.Single), "%+v", s.podRoutes(sb))

	sb, cs := podWith(t, s,
		[4]string{"init", "tap0", "exited", ""},
		[4]string{"web", "tap1", "running", `[{"containerPort":8080}]`},
		[4]string{"cache", "tap2", "running", `[{"containerPort":9090},{"containerPort":53,"protocol":"UDP"}]`})
	r := s.podRoutes(sb)
	require.Equal(t, 1, r.Default, "the init container ended: web is the first that runs")
	require.Equal(t, []vmnet.Member{{Index: 0}, {Index: 1}, {Index: 2, Ports: []vmnet.Port{{Proto: "tcp", Port: 9090}, {Proto: "udp", Port: 53}}}}, r.Members)
	require.NoError(t, r.Validate())

	require.NoError(t, cs[1].Update(func(st containerStatus) (containerStatus, error) { st.State = store.ContainerExited; return st, nil }))
	r = s.podRoutes(sb)
	require.Equal(t, 2, r.Default, "web ended: cache takes undeclared ports")
	require.Equal(t, []vmnet.Port{{Proto: "tcp", Port: 8080}}, r.Members[1].Ports, "web's port still goes to web's tap")

	// web's next attempt on tap1 declares another port: the newest counts;
	// it cannot start while an earlier attempt runs there.
	next := s.containers.Restore(newID(), containerMeta{SandboxID: sb.ID(), CreatedAt: time.Unix(100, 0),
		Config:  &runtimeapi.ContainerConfig{Metadata: &runtimeapi.ContainerMetadata{Name: "web", Attempt: 1}, Annotations: map[string]string{AnnotationContainerPorts: `[{"containerPort":8081}]`}},
		Machine: vmm.MachineConfig{NICs: []vmm.NIC{{Tap: "tap1"}}}}, containerStatus{State: store.ContainerCreated})
	require.Equal(t, []vmnet.Port{{Proto: "tcp", Port: 8081}}, s.podRoutes(sb).Members[1].Ports)
	require.Nil(t, s.tapHolder(sb, next), "the earlier attempt has exited")
	require.NoError(t, cs[1].Update(func(st containerStatus) (containerStatus, error) { st.State = store.ContainerRunning; return st, nil }))
	require.Equal(t, cs[1], s.tapHolder(sb, next))
	require.Nil(t, s.tapHolder(sb, cs[2]), "cache's tap is its own")

	// A port another container declares is refused naming both; a name
	// seen before keeps its tap; a new one gets the lowest free tap (the
	// pod is bridged here, so no tap is made: see assignTap).
	_, err := s.assignTap(sb, "other", []vmnet.Port{{Proto: "tcp", Port: 9090}})
	require.ErrorContains(t, err, `container "other" declares port 9090/tcp, which container "cache"`)
	idx, err := s.assignTap(sb, "web", nil)
	require.NoError(t, err)
	require.Equal(t, 1, idx)
	require.NoError(t, sb.Update(func(st sandboxStatus) (sandboxStatus, error) { st.Guest = nil; return st, nil }))
	idx, err = s.assignTap(sb, "sidecar", nil)
	require.NoError(t, err)
	require.Equal(t, 0, idx, "a bridged pod has one tap")
	require.Equal(t, cs[1], s.tapHolder(sb, cs[2]), "a bridged pod runs one VM at a time")
}
