#!/bin/sh
# Builds the Kubernetes control plane, kubelet, kube-proxy, kubectl
# (k8s.io/kubernetes v1.37.2), CoreDNS (github.com/coredns/coredns, with the
# plugins the cluster's DNS uses: e2e/kube/tools/coredns) and etcd
# (go.etcd.io/etcd/server/v3) from Go modules into OUTDIR.
# The Go build cache keeps repeat builds to seconds; a cold build takes
# several minutes (progress is printed). No symbol tables or DWARF (-s -w):
# linking seven large binaries is a good part of a cold build.
# Usage: build.sh OUTDIR
set -eu
out=${1:?usage: build.sh OUTDIR}
dir=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
V=v1.37.2
ver="-X k8s.io/component-base/version.gitVersion=$V -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=37 -X k8s.io/component-base/version.gitTreeState=clean"
ver="$ver -X k8s.io/client-go/pkg/version.gitVersion=$V -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=37 -X k8s.io/client-go/pkg/version.gitTreeState=clean"
start=$(date +%s)
echo ">> building kubelet, kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy, kubectl $V and CoreDNS (cold: ~12 min; cached: seconds)"
(cd "$dir/tools" && GOFLAGS=-mod=mod go build -ldflags "-s -w $ver" -o "$out/" \
	k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
	k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kube-proxy k8s.io/kubernetes/cmd/kubectl ./coredns)
echo ">> building etcd"
(cd "$dir/etcd" && GOFLAGS=-mod=mod go build -ldflags "-s -w" -o "$out/etcd" .)
echo ">> Kubernetes binaries ready in $out ($(( $(date +%s) - start ))s)"
