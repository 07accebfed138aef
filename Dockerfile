# Builds the unilet binaries (static) into a small image; the DaemonSet that
# installs them on KVM nodes arrives with the deployment work (issue 5).
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X github.com/unilet-dev/unilet/pkg/version.Version=${VERSION}" \
    -o /out/ ./cmd/unilet ./cmd/uniletctl

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends qemu-system-x86 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/unilet"]
