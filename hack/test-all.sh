#!/usr/bin/env bash
# `make test`: every lane in order — vet, pure (no root), unit, fuzz, CRI e2e, Kubernetes
# e2e, CRI validation. The Kubernetes, etcd, CoreDNS and containerd 2.x
# builds and the test binaries of the two last lanes (~13 min of compiling
# on a cold cache) run meanwhile in the background at the lowest CPU
# priority (nice 19): they use the CPU the first lanes leave idle — those
# mostly wait on TCG guests and daemons — and never slow them down much.
# The Kubernetes lane starts once they are done; a failed build fails the
# run with its log. A failing lane ends the background builds too.
set -euo pipefail
cd "$(dirname "$0")/.."
MAKE=${MAKE:-make}
mkdir -p _output
log=_output/prebuild.log
# setsid: the builds get a process group of their own, ended as one.
setsid -w nice -n 19 "$MAKE" --no-print-directory prebuild >"$log" 2>&1 &
pre=$!
trap 'kill -- -"$pre" 2>/dev/null || true' EXIT
"$MAKE" --no-print-directory vet test-pure test-unit test-fuzz test-e2e
echo ">> waiting for the background builds (log: $log)"
if ! wait "$pre"; then
	cat "$log"
	echo ">> the background builds failed" >&2
	exit 1
fi
trap - EXIT
grep '^>>' "$log" || true
"$MAKE" --no-print-directory test-kube test-critest
