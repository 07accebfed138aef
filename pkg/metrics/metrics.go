// Package metrics owns unilet's Prometheus metrics: the collectors the
// daemon's parts record into (start phases, VM exits, shim reconnects, image
// pulls, CRI calls) and the /metrics endpoint (--metrics-address) that
// serves them with the collectors of live state (VMs by state, per-VM CPU
// and memory) the daemon registers.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
)

// Namespace prefixes every metric name.
const Namespace = "unilet"

// Start phases (label phase of StartPhase).
const (
	PhaseNetNS        = "netns"              // the pod's network namespace made
	PhaseCNI          = "cni"                // CNI ADD
	PhaseTap          = "tap"                // the guest's tap and routes
	PhaseSandbox      = "sandbox"            // RunPodSandbox in all
	PhaseCgroup       = "cgroup"             // the VM's cgroup made
	PhaseShim         = "shim"               // a unilet-shim ready (pool or exec)
	PhaseQEMUToQMP    = "qemu_to_qmp"        // QEMU started until its QMP answered (or a warm clone ran)
	PhaseContainer    = "container_start"    // StartContainer in all
	PhaseFirstConsole = "first_console_line" // StartContainer called until the console's first bytes
)

var (
	// StartPhase is how long each step of starting a pod and its VMs took.
	StartPhase = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: Namespace, Name: "start_phase_seconds",
		Help:    "Time taken by each phase of starting a unikernel pod and its VMs.",
		Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
	}, []string{"phase"})
	// VMExits counts ended VMs by the reason CRI reports.
	VMExits = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: Namespace, Name: "vm_exits_total",
		Help: "VMs that ended, by reason (Completed, Error, OOMKilled, GuestPanicked, Killed, StartError, VMInternalError).",
	}, []string{"reason"})
	// ShimReconnects counts the daemon's reconnections to the shims of VMs
	// that ran on while it restarted (a shim lives as long as its VM: it is
	// never restarted itself).
	ShimReconnects = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: Namespace, Name: "shim_reconnects_total",
		Help: "Reconnections to running VMs' unilet-shims after a daemon restart, by result (adopted, not_answering).",
	}, []string{"result"})
	// ImagePulls counts unikernel image pulls by result.
	ImagePulls = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: Namespace, Name: "image_pulls_total",
		Help: "Unikernel image pulls, by result (success, failure).",
	}, []string{"result"})
	// ImagePullBytes counts the bytes of pulled images (their stored size).
	ImagePullBytes = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: Namespace, Name: "image_pull_bytes_total",
		Help: "Bytes of unikernel images pulled (kernel, initrd and configuration as stored).",
	})
	// ImagePullDuration is how long pulls took, failed ones included.
	ImagePullDuration = prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: Namespace, Name: "image_pull_duration_seconds",
		Help:    "Time taken by unikernel image pulls.",
		Buckets: []float64{.01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120},
	})
	// CRIRequests counts calls to the daemon's socket by service, method
	// and gRPC code.
	CRIRequests = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: Namespace, Name: "cri_requests_total",
		Help: "Calls to unilet's socket (CRI and the operator API), by service, method and gRPC status code.",
	}, []string{"service", "method", "code"})
	// CRIRequestDuration is how long the calls took (streams: their life).
	CRIRequestDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: Namespace, Name: "cri_request_duration_seconds",
		Help:    "Time taken by calls to unilet's socket, by service and method.",
		Buckets: prometheus.ExponentialBuckets(0.0005, 4, 10),
	}, []string{"service", "method"})
)

// ObservePhase records one start phase.
func ObservePhase(phase string, d time.Duration) {
	StartPhase.WithLabelValues(phase).Observe(d.Seconds())
}

// ObservePull records one image pull.
func ObservePull(d time.Duration, bytes int64, err error) {
	ImagePullDuration.Observe(d.Seconds())
	if err != nil {
		ImagePulls.WithLabelValues("failure").Inc()
		return
	}
	ImagePulls.WithLabelValues("success").Inc()
	ImagePullBytes.Add(float64(bytes))
}

// splitMethod turns "/runtime.v1.RuntimeService/Version" into its service
// and method.
func splitMethod(full string) (string, string) {
	svc, m, ok := strings.Cut(strings.TrimPrefix(full, "/"), "/")
	if !ok {
		return "unknown", full
	}
	return svc, m
}

func observeCall(full string, t0 time.Time, err error) {
	svc, m := splitMethod(full)
	CRIRequests.WithLabelValues(svc, m, status.Code(err).String()).Inc()
	CRIRequestDuration.WithLabelValues(svc, m).Observe(time.Since(t0).Seconds())
}

// UnaryInterceptor counts unary calls; chain it first so it sees the
// status code the client gets.
func UnaryInterceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	t0 := time.Now()
	resp, err := h(ctx, req)
	observeCall(info.FullMethod, t0, err)
	return resp, err
}

// StreamInterceptor counts streaming calls (CRI's event stream, the
// operator API's console and log streams).
func StreamInterceptor(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	t0 := time.Now()
	err := h(srv, ss)
	observeCall(info.FullMethod, t0, err)
	return err
}

// Registry returns a registry of unilet's metrics, the Go runtime's and
// the process's, and extra (live-state collectors of the daemon).
func Registry(extra ...prometheus.Collector) *prometheus.Registry {
	r := prometheus.NewRegistry()
	r.MustRegister(StartPhase, VMExits, ShimReconnects, ImagePulls, ImagePullBytes, ImagePullDuration, CRIRequests, CRIRequestDuration,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	for _, c := range extra {
		r.MustRegister(c)
	}
	return r
}

// Serve serves /metrics of reg on addr (HOST:PORT) until stop is called.
func Serve(addr string, reg *prometheus.Registry) (stop func(), err error) {
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--metrics-address: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorLog: logrusErrors{}, Timeout: 30 * time.Second}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	logrus.WithField("address", lis.Addr().String()).Info("serving Prometheus metrics at /metrics")
	go func() {
		if err := srv.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
			logrus.WithError(err).Error("metrics server stopped")
		}
	}()
	return func() { srv.Close() }, nil
}

type logrusErrors struct{}

func (logrusErrors) Println(v ...any) { logrus.Warn(append([]any{"metrics: "}, v...)...) }
