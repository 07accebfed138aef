# unilet — see README.md. `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
GO ?= go
OUT := _output
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X github.com/unilet-dev/unilet/pkg/version.Version=$(VERSION)

.PHONY: all deps proto build test test-unit test-e2e vet demo guest clean

all: build

deps:
	@./hack/install-deps.sh

build:
	mkdir -p bin
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/ ./cmd/...

guest: $(OUT)/guest/testkernel.elf
$(OUT)/guest/testkernel.elf: $(wildcard e2e/guest/testkernel/*)
	./e2e/guest/testkernel/build.sh $@

# Regenerate the shim's ttrpc API from runtime/shim/api/shim.proto.
proto:
	./hack/gen-proto.sh

vet:
	$(GO) vet ./...

# Fast tests: pure builders (golden), stores, routing with a fake upstream,
# and the VM runtime booting the test kernel under real QEMU (~10 s).
test-unit: deps
	$(GO) test -count=1 $$($(GO) list ./... | grep -v /e2e/)

# End-to-end: the real daemon driven by a real crictl (built from cri-tools),
# real QEMU, a loopback registry, and a real containerd for passthrough pods.
test-e2e: deps
	$(GO) test -count=1 ./e2e/...

test: deps vet test-unit test-e2e

demo: deps
	$(GO) run ./e2e/demo

clean:
	rm -rf bin $(OUT)
