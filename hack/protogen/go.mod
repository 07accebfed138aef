module github.com/unilet-dev/unilet/hack/protogen

go 1.26

require (
	github.com/containerd/ttrpc v1.2.10
	google.golang.org/protobuf v1.36.12
)

require google.golang.org/grpc/cmd/protoc-gen-go-grpc v1.5.1
