#!/bin/sh
# Builds the network test guest from Debian packages: the kernel of Debian's
# linux-image-amd64 and an initramfs holding busybox (busybox-static), the
# virtio-net / 9p / ACPI-button modules of that kernel, and our init (init.c).
# Usage: build.sh OUTDIR  → OUTDIR/vmlinuz, OUTDIR/initrd.gz (cached: a rebuild
# happens only when init.c, ../testkernel/ukcmdline.c, this script or the kernel package changes).
set -eu
out=${1:?usage: build.sh OUTDIR}
dir=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out/cache"
out=$(cd "$out" && pwd)
cache=$out/cache

kpkg() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'; }
pkg=$(kpkg)
if [ -z "$pkg" ]; then
	apt-get update -qq
	pkg=$(kpkg)
fi
[ -n "$pkg" ] || { echo "build.sh: cannot resolve Debian's linux-image-amd64 package" >&2; exit 1; }

stamp="$pkg $(cat "$dir/init.c" "$dir/../testkernel/ukcmdline.c" "$0" | sha256sum | cut -c1-16)"
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] && [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.gz" ]; then
	exit 0
fi

deb=$(ls "$cache/${pkg}"_*.deb 2>/dev/null | head -n1 || true)
if [ -z "$deb" ]; then
	(cd "$cache" && { apt-get download -qq "$pkg" 2>/dev/null || { apt-get update -qq && apt-get download -qq "$pkg"; }; })
	deb=$(ls "$cache/${pkg}"_*.deb | head -n1)
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp" --wildcards './boot/vmlinuz-*' './lib/modules/*.ko'
moddir=$(echo "$tmp"/lib/modules/*)
# Resolve the modules we need, dependencies first, from each module's .modinfo.
deps() {
	f=$(find "$moddir" -name "$1.ko" | head -n1)
	[ -n "$f" ] || { echo "build.sh: module $1 not in $pkg" >&2; exit 1; }
	objcopy -O binary --only-section=.modinfo "$f" /dev/stdout | tr '\0' '\n' | sed -n 's/^depends=//p' | tr ',' ' '
}
visit() {
	grep -qx "$1" "$tmp/seen" 2>/dev/null && return 0
	echo "$1" >> "$tmp/seen"
	for d in $(deps "$1"); do visit "$d"; done
	find "$moddir" -name "$1.ko" | head -n1 >> "$tmp/modules.list"
}
: > "$tmp/modules.list"
for m in virtio_pci virtio_net 9pnet_virtio 9p button evdev; do visit "$m"; done

root=$tmp/root
mkdir -p "$root/bin" "$root/lib/modules" "$root/proc" "$root/sys" "$root/dev" "$root/etc" "$root/tmp" "$root/www"
${CC:-gcc} -static -O2 -Wall -Wextra -Werror -o "$root/init" "$dir/init.c"
cp /bin/busybox "$root/bin/busybox"
for a in $(/bin/busybox --list); do
	[ "$a" = busybox ] || ln -sf busybox "$root/bin/$a"
done
while read -r m; do
	cp "$m" "$root/lib/modules/"
	basename "$m" >> "$root/lib/modules/order"
done < "$tmp/modules.list"
echo "hello from unilet-netguest" > "$root/www/index.html"
(cd "$root" && find . | sort | /bin/busybox cpio -o -H newc 2>/dev/null) | gzip -9 > "$tmp/initrd.gz"
cp "$tmp"/boot/vmlinuz-* "$out/vmlinuz"
mv "$tmp/initrd.gz" "$out/initrd.gz"
echo "$stamp" > "$out/stamp"
