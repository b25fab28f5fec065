#!/usr/bin/env bash
# Installs whatever the test suite needs, then runs all of it:
#   formatting, lints, the whole workspace's tests, documentation, benchmarks (compiled),
#   the fuzz target (built and run over its corpus).
#
# Needs Debian (or Ubuntu) with Rust (rustup). Missing system packages are installed with
# apt-get, which needs root. A prerequisite that cannot be had is a failure, never a skip.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
fail() { printf '\n\033[1;31mFAILED: %s\033[0m\n' "$*" >&2; exit 1; }

# --- prerequisites --------------------------------------------------------------------------

# Debian packages the suite needs: a C/C++ toolchain for zstd, libFuzzer and the test guest's
# workload; iproute2 (ip, tc) for the emulated links between network namespaces; QEMU, busybox
# and cpio for the test guest that real migrations move; libvirt (daemon, QEMU driver, virsh)
# for the `virsh migrate` tests; openssl for the certificates of the QEMU TLS tests.
APT_PACKAGES=(build-essential pkg-config iproute2 qemu-system-x86 busybox-static cpio
    libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients openssl)

install_packages() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    step "installing Debian packages: ${missing[*]}"
    if [ "$(id -u)" -ne 0 ]; then
        fail "missing packages ${missing[*]}: run this script as root, or apt-get install them"
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q || fail "apt-get update failed"
    apt-get install -y -q --no-install-recommends "${missing[@]}" \
        || fail "apt-get install ${missing[*]} failed"
}

install_cargo_tool() {
    local tool=$1 crate=$2
    if ! cargo "$tool" --version >/dev/null 2>&1; then
        step "installing $crate"
        cargo install --locked "$crate" || fail "cargo install $crate failed"
    fi
}

command -v dpkg-query >/dev/null || fail "this script needs a Debian-based system (dpkg)"
command -v cargo >/dev/null || fail "cargo not found: install Rust with rustup (https://rustup.rs)"
install_packages "${APT_PACKAGES[@]}"
# libvirt's QEMU driver looks up its default account (user and group libvirt-qemu) when it
# starts, even when configured to run QEMU as root, as the tests do. libvirt-daemon-system
# creates it, but it would also replace the machine's init with systemd; the account alone is
# enough.
if ! getent group libvirt-qemu >/dev/null; then
    groupadd --system libvirt-qemu || fail "cannot create the group libvirt-qemu"
fi
if ! getent passwd libvirt-qemu >/dev/null; then
    useradd --system --no-create-home --home-dir /var/lib/libvirt --shell /usr/sbin/nologin \
        -g libvirt-qemu libvirt-qemu || fail "cannot create the user libvirt-qemu"
fi
if command -v rustup >/dev/null; then
    rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
    rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
fi
cargo fmt --version >/dev/null 2>&1 || fail "rustfmt is missing (rustup component add rustfmt)"
# The transport tests emulate links between network namespaces, which needs root.
[ "$(id -u)" -eq 0 ] || fail "the test suite creates network namespaces and must run as root"
ip netns list >/dev/null 2>&1 || fail "network namespaces are not available (ip netns list failed)"
cargo clippy --version >/dev/null 2>&1 || fail "clippy is missing (rustup component add clippy)"
install_cargo_tool nextest cargo-nextest
install_cargo_tool fuzz cargo-fuzz

step "building the test guest (Debian kernel, busybox initramfs, workload)"
./scripts/build-guest.sh || fail "cannot build the test guest"

step "unpacking QEMU 10 from bookworm-backports beside the system's QEMU 7.2"
./scripts/install-qemu10.sh || fail "cannot unpack QEMU 10 (the tests that migrate with it need it)"

# --- checks ---------------------------------------------------------------------------------

step "formatting"
cargo fmt --all -- --check || fail "code is not formatted: run cargo fmt --all"
(cd fuzz && cargo fmt -- --check) || fail "fuzz/ is not formatted: run cargo fmt in fuzz/"

step "lints"
cargo clippy --workspace --all-targets --locked -- -D warnings || fail "clippy found problems"

step "tests"
cargo nextest run --workspace --locked --no-fail-fast || fail "tests failed"
cargo test --workspace --doc --locked || fail "documentation tests failed"

step "documentation"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked || fail "cargo doc found problems"

step "benchmarks compile"
cargo bench --workspace --no-run --locked || fail "benchmarks do not build"

step "fuzz targets: build, then run each over its corpus and beyond for a while"
(
    cd fuzz
    # cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP lets the stable toolchain accept them.
    export RUSTC_BOOTSTRAP=1
    for target in frame_decoder qemu_stream; do
        cargo fuzz build "$target" || fail "fuzz target $target does not build"
        mkdir -p "target/corpus-run/$target"
        cargo fuzz run "$target" "target/corpus-run/$target" "corpus/$target" -- \
            -max_total_time="${FUZZ_SECONDS:-20}" -rss_limit_mb=2048 \
            || fail "the fuzzer found a crash in $target (see fuzz/artifacts)"
    done
)

step "all checks passed"
