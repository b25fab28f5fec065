#!/usr/bin/env bash
# Builds the test guest for the QEMU tests and benchmarks:
#   target/guest/vmlinuz         Debian's kernel (from the linux-image-amd64 dependency)
#   target/guest/modules/        that kernel's virtio drivers (PCI, disk, NIC, RNG, console, balloon)
#   target/guest/initramfs.gz    busybox, an init script, the drivers and the static workload
# Needs: apt-get (download only), dpkg-deb, gcc, cpio, gzip, busybox-static. Idempotent.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=target/guest
mkdir -p "$out"
fail() { echo "build-guest: $*" >&2; exit 1; }

# The drivers the init script loads, in this order (each after the modules it depends on),
# as paths under the kernel's lib/modules/VERSION/kernel/.
modules="drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_modern_dev
drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci drivers/block/virtio_blk
net/core/failover drivers/net/net_failover drivers/net/virtio_net drivers/char/hw_random/virtio-rng
drivers/char/virtio_console drivers/virtio/virtio_balloon"

if [ ! -s "$out/vmlinuz" ] || [ ! -s "$out/modules/order" ]; then
    pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
    [ -n "$pkg" ] || fail "cannot resolve the kernel package behind linux-image-amd64"
    work=$(mktemp -d)
    (cd "$work" && apt-get download "$pkg" >/dev/null) || fail "apt-get download $pkg failed"
    dpkg-deb -x "$work"/"$pkg"_*.deb "$work/x" || fail "cannot unpack $pkg"
    rm -rf "$out/modules"
    mkdir -p "$out/modules"
    : > "$out/modules/order.tmp"
    for m in $modules; do
        ko=$(echo "$work"/x/lib/modules/*/kernel/"$m".ko)
        [ -f "$ko" ] || fail "$pkg has no $m.ko"
        cp "$ko" "$out/modules/"
        basename "$ko" >> "$out/modules/order.tmp"
    done
    mv "$out/modules/order.tmp" "$out/modules/order"
    cp "$work"/x/boot/vmlinuz-* "$out/vmlinuz"
    rm -rf "$work"
fi

src=qemu-shim/guest
if [ ! -s "$out/initramfs.gz" ] || [ "$src/workload.c" -nt "$out/initramfs.gz" ] \
    || [ "$src/init" -nt "$out/initramfs.gz" ] || [ "$out/modules/order" -nt "$out/initramfs.gz" ]; then
    [ -x /bin/busybox ] || fail "/bin/busybox missing (apt-get install busybox-static)"
    root=$(mktemp -d)
    mkdir -p "$root/bin" "$root/lib/modules"
    cp /bin/busybox "$root/bin/busybox"
    gcc -O2 -static -o "$root/workload" "$src/workload.c" || fail "cannot build the workload"
    cp "$src/init" "$root/init"
    cp "$out"/modules/*.ko "$out/modules/order" "$root/lib/modules/"
    chmod +x "$root/init" "$root/workload"
    (cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out/initramfs.gz.tmp"
    mv "$out/initramfs.gz.tmp" "$out/initramfs.gz"
    rm -rf "$root"
fi
echo "$out/vmlinuz $out/initramfs.gz"
