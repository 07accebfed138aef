# unilet — see README.md. `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
GO ?= go
OUT := _output
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X github.com/unilet-dev/unilet/pkg/version.Version=$(VERSION)

.PHONY: all deps build test test-unit test-e2e vet demo guest clean

all: build

deps:
	@./hack/install-deps.sh

build:
	@if [ -z "$$(ls cmd 2>/dev/null)" ]; then echo "no binaries yet"; exit 0; fi; \
	mkdir -p bin && \
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/ ./cmd/...

guest: $(OUT)/guest/testkernel.elf
$(OUT)/guest/testkernel.elf: $(wildcard e2e/guest/testkernel/*)
	./e2e/guest/testkernel/build.sh $@

vet:
	$(GO) vet ./...

# Unit tests plus the tests that boot the test kernel under real QEMU.
test-unit: deps
	$(GO) test -count=1 ./...

test: deps vet test-unit

demo: deps
	$(GO) run ./e2e/demo

clean:
	rm -rf bin $(OUT)
