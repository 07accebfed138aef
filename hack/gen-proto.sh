#!/bin/sh
# Regenerates the shim API (vmm/shim/api, ttrpc) and the operator API
# (api/admin, gRPC) from their .proto files. Installs protoc (Debian
# protobuf-compiler) and builds the Go plugins pinned in hack/protogen.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
command -v protoc >/dev/null 2>&1 || { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler >/dev/null; }
bin="$root/_output/bin"
mkdir -p "$bin"
(cd "$root/hack/protogen" && go build -o "$bin/" github.com/containerd/ttrpc/cmd/protoc-gen-go-ttrpc google.golang.org/protobuf/cmd/protoc-gen-go \
	google.golang.org/grpc/cmd/protoc-gen-go-grpc)
cd "$root/vmm/shim/api"
PATH="$bin:$PATH" protoc -I. --go_out=paths=source_relative:. --go-ttrpc_out=paths=source_relative:. shim.proto
cd "$root/api/admin"
PATH="$bin:$PATH" protoc -I. --go_out=paths=source_relative:. --go-grpc_out=paths=source_relative:. admin.proto
