#!/bin/sh
# Builds the unilet test kernel (ELF32 multiboot) with the host gcc.
# Usage: build.sh OUTPUT
set -eu
out=${1:?usage: build.sh OUTPUT}
dir=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
CFLAGS="-m32 -ffreestanding -fno-pic -fno-pie -fno-stack-protector -fno-asynchronous-unwind-tables -nostdlib -O2 -Wall -Wextra -Werror"
${CC:-gcc} $CFLAGS -c "$dir/boot.S" -o "$tmp/boot.o"
${CC:-gcc} $CFLAGS -c "$dir/kernel.c" -o "$tmp/kernel.o"
${LD:-ld} -m elf_i386 -nostdlib -T "$dir/link.ld" -o "$tmp/kernel.elf" "$tmp/boot.o" "$tmp/kernel.o"
mkdir -p "$(dirname "$out")"
mv "$tmp/kernel.elf" "$out"
