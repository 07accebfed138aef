//go:build tools

// Package protogen pins the protoc plugins that generate the shim API.
package protogen

import (
	_ "github.com/containerd/ttrpc/cmd/protoc-gen-go-ttrpc"
	_ "google.golang.org/protobuf/cmd/protoc-gen-go"
)
