#!/bin/sh
# Builds a current containerd 2.x (github.com/containerd/containerd/v2, the
# version pinned in go.mod here) — containerd, containerd-shim-runc-v2 and ctr —
# from Go modules into OUTDIR, for the passthrough tests beside Debian's 1.6.
# runc comes from Debian. Cached builds take seconds; cold ones about a minute.
# Usage: build.sh OUTDIR
set -eu
out=${1:?usage: build.sh OUTDIR}
dir=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$dir"
GOFLAGS=-mod=mod go build -o "$out/" github.com/containerd/containerd/v2/cmd/containerd \
	github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2 github.com/containerd/containerd/v2/cmd/ctr
