#!/usr/bin/env bash
# Installs what firkin's guests need and builds the guest-side assets. Idempotent; run as root
# on Debian 12 (CI and developer machines). Called by the top-level set-up scripts.
#
#   scripts/setup-guest.sh            # packages, static guest binaries, guest kernel
#
# Environment:
#   FIRKIN_CACHE_DIR   cache directory (default ~/.firkin/cache); the kernel goes to
#                      $FIRKIN_CACHE_DIR/kernel
#   FIRKIN_SKIP_APT=1  skip apt-get (packages already installed)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${FIRKIN_CACHE_DIR:-$HOME/.firkin/cache}"
target_dir="${CARGO_TARGET_DIR:-$repo/target}"
guest_bin="$target_dir/x86_64-unknown-linux-gnu/guest"

log() { printf 'setup-guest: %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

install_packages() {
    local want=(mmdebstrap e2fsprogs cpio busybox-static protobuf-compiler)
    local missing=()
    command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
    # qemu-img only when absent: some machines carry a backported qemu-utils that a fresh
    # request for Debian's would conflict with.
    command -v qemu-img >/dev/null || missing+=(qemu-utils)
    for p in "${want[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        log "packages present"
    else
        log "installing ${missing[*]}"
        as_root apt-get update -q
        # --no-install-recommends: qemu-system-x86's recommends pull in a GUI stack.
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
    # `apt-get download` (the guest kernel) needs package lists even when nothing was installed.
    if ! apt-cache policy linux-image-cloud-amd64 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        as_root apt-get update -q
    fi
}

build_guest_binaries() {
    local pkgs=(-p firkin-init)
    if [ -f "$repo/crates/envd/Cargo.toml" ]; then pkgs+=(-p firkin-envd); fi
    log "building static ${pkgs[*]}"
    # Static glibc binaries; the explicit --target keeps these RUSTFLAGS from invalidating the
    # host build.
    (cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --locked --profile guest --target x86_64-unknown-linux-gnu "${pkgs[@]}")
    # Installed into the cache, where firkin looks for them (FIRKIN_GUEST_BIN_DIR overrides),
    # so a running firkin does not depend on this checkout's target directory.
    mkdir -p "$cache/guest/bin"
    for b in firkin-init firkin-envd; do
        if [ -f "$guest_bin/$b" ]; then
            install -m 0755 "$guest_bin/$b" "$cache/guest/bin/$b.tmp"
            mv -f "$cache/guest/bin/$b.tmp" "$cache/guest/bin/$b"
        fi
    done
    log "guest binaries in $guest_bin and $cache/guest/bin"
}

fetch_kernel() {
    log "guest kernel into $cache/kernel"
    mkdir -p "$cache"
    (cd "$repo" && cargo run --locked -q -p firkin-guest --bin firkin-guest -- kernel --dir "$cache/kernel")
}

[ "${FIRKIN_SKIP_APT:-0}" = 1 ] || install_packages
build_guest_binaries
fetch_kernel
log "done"
