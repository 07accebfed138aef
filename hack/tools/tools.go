//go:build tools

// Package tools pins the external CLI tools the tests drive (crictl, critest).
package tools

import (
	_ "sigs.k8s.io/cri-tools/cmd/crictl"
)
