//go:build tools

// Package tools pins the Kubernetes binaries the cluster harness builds from
// Go modules: kubelet, kube-apiserver, kube-controller-manager,
// kube-scheduler, kube-proxy and kubectl (k8s.io/kubernetes v1.37.2); and
// CoreDNS (./coredns).
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
