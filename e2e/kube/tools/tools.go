//go:build tools

// Package tools pins the Kubernetes binaries the cluster harness builds from
// Go modules: kubelet, kube-apiserver, kube-controller-manager,
// kube-scheduler and kubectl (k8s.io/kubernetes v1.37.2).
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
