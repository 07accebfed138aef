# The image of the DaemonSet in deploy/unilet.yaml (and the Helm chart): static
# unilet, unilet-shim, unilet-jail, uniletctl and unilet-install under /unilet/bin. The
# installer copies them onto the node and runs the daemon THERE (systemd unit,
# or supervised by the installer), never inside the pod. QEMU, containerd and
# the CNI plugins come from the node.
#   docker build --build-arg VERSION=$(git describe --always) -t unilet/unilet:0.1.0 .
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X github.com/unilet-dev/unilet/pkg/version.Version=${VERSION}" \
    -o /out/ ./cmd/unilet ./cmd/unilet-shim ./cmd/unilet-jail ./cmd/uniletctl ./cmd/unilet-install

# util-linux (nsenter) is part of the base: the installer uses it to start the
# daemon in the host's namespaces.
FROM debian:bookworm-slim
COPY --from=build /out/ /unilet/bin/
ENTRYPOINT ["/unilet/bin/unilet-install"]
