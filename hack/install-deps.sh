#!/bin/sh
# Installs the Debian packages unilet's build, tests and demo need. Idempotent:
# runs apt-get only when something is missing. Needs root (or sudo).
set -eu
need=""
have() { command -v "$1" >/dev/null 2>&1; }
have qemu-system-x86_64 || need="$need qemu-system-x86"
have gcc || need="$need gcc"
# static libc: the network test guest's init is a static binary
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || need="$need libc6-dev"
have ld || need="$need binutils"
have ip || need="$need iproute2"
have pgrep || need="$need procps"
have script || need="$need bsdutils"
have containerd || need="$need containerd"
have openssl || need="$need openssl"
# kube-proxy's nftables mode (the e2e cluster) drives nft
have nft || need="$need nftables"
have runc || need="$need runc"
# make demo asks the Service with curl
have curl || need="$need curl"
dpkg -s busybox-static >/dev/null 2>&1 || need="$need busybox-static"
[ -x /usr/lib/cni/bridge ] || [ -x /opt/cni/bin/bridge ] || need="$need containernetworking-plugins"
if [ -z "$need" ]; then
	exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
echo ">> installing Debian packages:$need"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $need >/dev/null
