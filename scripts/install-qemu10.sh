#!/usr/bin/env bash
# Unpacks QEMU 10.x from Debian's bookworm-backports into target/qemu10/, next to the system's
# QEMU 7.2, for the tests that migrate with a current QEMU (its stream format, its multifd).
# Nothing is installed system-wide: apt reads the backports index into a private directory
# (signatures checked with Debian's archive keyring, as apt always does), downloads the four
# packages and dpkg unpacks them. The libraries QEMU 10 needs are those of the system's
# qemu-system-x86, which scripts/test.sh installs first.
#
# Usage: scripts/install-qemu10.sh   (idempotent; prints the binary's path)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
dest=target/qemu10
binary=$dest/root/usr/bin/qemu-system-x86_64

fail() { printf 'install-qemu10: %s\n' "$*" >&2; exit 1; }

works() {
    local version
    version=$("$binary" --version 2>/dev/null | head -n 1) || return 1
    [[ $version == "QEMU emulator version 10."* ]]
}

if [ -x "$binary" ] && works; then
    echo "$binary"
    exit 0
fi

mirror=${PAGESTREAM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -r "$keyring" ] || fail "Debian's archive keyring $keyring is missing (package debian-archive-keyring)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/archives/partial"
echo "deb [signed-by=$keyring] $mirror bookworm-backports main" >"$work/sources.list"
apt_opts=(
    -o "Dir::Etc::SourceList=$work/sources.list"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$work/lists"
    -o "Dir::Cache::Archives=$work/archives"
    -o "APT::Sandbox::User=root"
)
apt-get "${apt_opts[@]}" -q update >/dev/null || fail "cannot read bookworm-backports from $mirror"
packages=(qemu-system-x86 qemu-system-common qemu-system-data seabios)
(cd "$work" && apt-get "${apt_opts[@]}" -q download "${packages[@]/%//bookworm-backports}") \
    >/dev/null || fail "cannot download ${packages[*]} from bookworm-backports"
rm -rf "$dest"
mkdir -p "$dest/root"
for deb in "$work"/*.deb; do
    dpkg -x "$deb" "$dest/root" || fail "cannot unpack $deb"
done
missing=$(ldd "$binary" | grep 'not found' || true)
[ -z "$missing" ] || fail "QEMU 10 needs libraries this system lacks (install qemu-system-x86 first): $missing"
works || fail "the unpacked QEMU does not run: $("$binary" --version 2>&1 | head -n 3)"
echo "$binary"
