#!/bin/sh
# Rebuilds probe.elf (committed, embedded by package vmm) from probe.S.
set -eu
dir=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
${CC:-gcc} -m32 -nostdlib -ffreestanding -fno-pic -c "$dir/probe.S" -o "$tmp/probe.o"
${LD:-ld} -m elf_i386 -nostdlib -T "$dir/link.ld" --build-id=none -s -o "$dir/probe.elf" "$tmp/probe.o"
