#!/usr/bin/env bash
# Build the lab's tiny Linux: Debian's kernel (vmlinuz) and an initrd made of
# busybox-static, the e1000 NIC driver and deploy/lab/init.
#
#   deploy/lab/build-linux.sh OUTDIR
#
# Writes OUTDIR/vmlinuz and OUTDIR/initrd.gz. The kernel package is fetched
# once with `apt-get download` (no install, no scripts) into
# ${LAB_CACHE:-/var/tmp/pxemesh-lab-cache} and reused. Needs: apt-get,
# dpkg-deb, cpio, gzip, /bin/busybox from busybox-static.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${1:?usage: build-linux.sh OUTDIR}
CACHE=${LAB_CACHE:-/var/tmp/pxemesh-lab-cache}
mkdir -p "$OUT" "$CACHE"

if ! file -L /bin/busybox 2>/dev/null | grep -q "statically linked" &&
    ! ldd /bin/busybox 2>&1 | grep -q "not a dynamic executable"; then
    echo "build-linux: /bin/busybox is not static; install busybox-static" >&2
    exit 1
fi

kernel_pkg() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'; }
pkg=$(kernel_pkg)
if [ -z "$pkg" ]; then
    # Fresh machine without package lists: fetch them once.
    apt-get update -qq >/dev/null 2>&1 || true
    pkg=$(kernel_pkg)
fi
[ -n "$pkg" ] || { echo "build-linux: cannot resolve linux-image-amd64 (no Debian package lists?)" >&2; exit 1; }
deb=$(ls "$CACHE"/"$pkg"_*.deb 2>/dev/null | head -n1 || true)
if [ -z "$deb" ]; then
    (cd "$CACHE" && apt-get download -q "$pkg" >/dev/null 2>&1) ||
        { echo "build-linux: apt-get download $pkg failed" >&2; exit 1; }
    deb=$(ls "$CACHE"/"$pkg"_*.deb | head -n1)
fi
x=$CACHE/${pkg}-x
if [ ! -d "$x/boot" ]; then
    rm -rf "$x.tmp"
    dpkg-deb -x "$deb" "$x.tmp"
    mv "$x.tmp" "$x"
fi
cp "$x"/boot/vmlinuz-* "$OUT/vmlinuz"
e1000=$(find "$x/lib/modules" -name e1000.ko | head -n1)
[ -n "$e1000" ] || { echo "build-linux: e1000.ko not in $pkg" >&2; exit 1; }

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,lib,proc,sys,dev,tmp}
cp /bin/busybox "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
cp "$e1000" "$root/lib/e1000.ko"
install -m 0755 "$HERE/init" "$root/init"
install -m 0755 "$HERE/udhcpc.script" "$root/lib/udhcpc.script"
(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) | gzip -9 >"$OUT/initrd.gz"
echo "build-linux: $OUT/vmlinuz ($(stat -c %s "$OUT/vmlinuz") bytes), $OUT/initrd.gz ($(stat -c %s "$OUT/initrd.gz") bytes)"
