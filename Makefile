# unilet — see README.md. `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
GO ?= go
OUT := _output
# Under make, a test whose prerequisite (root, QEMU) is missing fails instead
# of skipping (internal/testutil/lanes.go): CI never skips silently.
export UNILET_TEST_STRICT := 1
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X github.com/unilet-dev/unilet/pkg/version.Version=$(VERSION)

.PHONY: all deps proto build prebuild test test-pure test-unit test-fuzz test-e2e test-kube test-critest vet demo demo-down demo-cri guest clean kube-bins bench bench-quick cluster-up cluster-down

all: build

deps:
	@./hack/install-deps.sh

build:
	mkdir -p bin
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/ ./cmd/...

guest: $(OUT)/guest/testkernel.elf
$(OUT)/guest/testkernel.elf: $(wildcard e2e/guest/testkernel/*)
	./e2e/guest/testkernel/build.sh $@

# Regenerate the shim's ttrpc API from vmm/shim/api/shim.proto.
proto:
	./hack/gen-proto.sh

vet:
	$(GO) vet ./...

# Fast tests: pure builders (golden), stores, routing with a fake upstream,
# and the VM runtime booting the test kernel under real QEMU; with the race
# detector.
test-unit: deps
	$(GO) test -race -count=1 $$($(GO) list ./... | grep -v /e2e/)

# The contributor's lane: plain `go test ./...` as a user without root and
# without QEMU (hack/test-pure.sh): pure tests run, the rest skip naming
# their lane.
test-pure:
	./hack/test-pure.sh

# Every native fuzz target (image manifests, configs and layer tars; the
# pod annotations; the CRI log writer; the Unikraft command-line builder
# against a model of Unikraft's parser) for FUZZTIME each (default 10s).
test-fuzz: deps
	./hack/fuzz.sh

# End-to-end: the real daemon driven by a real crictl (built from cri-tools),
# real QEMU, real CNI plugins, a loopback registry, and a real containerd for
# passthrough pods; the crash-consistency churn (TestCrashConsistency, its
# seed printed). With the race detector: the daemon and shims under test are
# race builds too, and a race they report fails the test.
test-e2e: deps
	$(GO) test -race -count=1 -timeout 30m ./e2e/cri/...

# Kubernetes end-to-end: a real kubelet, kube-apiserver, controller-manager,
# scheduler and etcd (built from Go modules; cold ~10 min, then cached) with
# unilet as the kubelet's runtime in front of Debian's containerd 1.6 (and a
# second node without unilet), driven with kubectl; then a plain and unikernel
# pod subset in front of containerd 2.x.
test-kube: deps kube-bins
	$(GO) test -count=1 -timeout 40m ./e2e/kube/...
	@echo ">> again with containerd 2.x (built from Go modules) behind unilet: plain and unikernel pods"
	./hack/containerd2/build.sh $(OUT)/containerd2/bin
	UNILET_KUBE_CONTAINERD_BIN=$(CURDIR)/$(OUT)/containerd2/bin $(GO) test -count=1 -timeout 20m \
		-run 'TestPlainPodPassesThrough|TestAnnotatedPodLogsAndFollow|TestRuntimeClassPodAndExecUnsupported' ./e2e/kube/

# The CRI validation suite (critest from cri-tools v1.34.0, offline stand-in
# images) inside a network namespace of its own: Debian's containerd 1.6 and a
# containerd 2.x alone and through unilet (nothing that passes alone may fail
# through unilet), then unikernel pods (--runtime-handler unikraft) against
# e2e/critest/expected/unikraft.txt. Counts: docs/cri-validation.md.
test-critest: deps
	$(GO) test -count=1 -timeout 45m ./e2e/critest/...

# All lanes, in order; the builds the last two need run in the background
# meanwhile (hack/test-all.sh).
test: deps
	./hack/test-all.sh

# What the Kubernetes and CRI-validation lanes build: Kubernetes, etcd,
# CoreDNS, containerd 2.x and their test binaries (into the build cache).
prebuild: kube-bins
	./hack/containerd2/build.sh $(OUT)/containerd2/bin
	$(GO) test -c -o /dev/null ./e2e/kube/
	$(GO) test -c -o /dev/null ./e2e/critest/
	@echo ">> prebuild done"

KUBE_BIN := $(OUT)/kube/bin
kube-bins:
	./e2e/kube/build.sh $(KUBE_BIN)

# Benchmarks: unilet vs a bare QEMU of the same VM and vs containerd + runc,
# interleaved A/B; writes bench/results.json and docs/benchmarks.md.
bench: deps
	$(GO) run ./bench

bench-quick: deps
	$(GO) run ./bench --quick

# A single-node cluster on 127.0.0.1 with unilet in front of containerd.
# Extra unilet flags: UNILET_ARGS="--log-level debug ...". Its ports are free ones:
# `$(OUT)/bin/cluster port registry|apiserver|...` prints them.
cluster-up: deps build kube-bins
	$(GO) build -o $(OUT)/bin/cluster ./e2e/kube/cluster
	$(OUT)/bin/cluster up --kube-bin $(KUBE_BIN) --unilet-bin bin
	@echo "kubectl: $(KUBE_BIN)/kubectl --kubeconfig $(OUT)/cluster/kubeconfig"

cluster-down:
	$(GO) build -o $(OUT)/bin/cluster ./e2e/kube/cluster
	$(OUT)/bin/cluster down

# The main job: a single-node Kubernetes cluster with unilet, a unikernel pod
# and a plain pod (hack/demo.sh). `make demo-down` tears it down.
demo: deps
	./hack/demo.sh

demo-down: cluster-down

# The CRI-level demo: one unikernel pod through the daemon with a CRI client (~5 s).
demo-cri: deps
	$(GO) run ./e2e/demo

clean:
	rm -rf bin $(OUT)
