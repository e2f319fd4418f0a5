#!/usr/bin/env bash
# Installs the host programs firkin runs and builds the guest-side assets. Idempotent; run as
# root on Debian 12 (CI and developer machines). Called by the top-level set-up scripts.
#
#   scripts/setup-guest.sh            # packages, static guest binaries, guest kernel, final check
#   scripts/setup-guest.sh --verify   # only the final check: every host tool is there and runs
#
# The packages come from the one list in the code (`firkin-guest host-tools packages`, from
# crates/types/src/host_tools.rs), which `firkin doctor` and `firkin serve` check too.
#
# Environment:
#   FIRKIN_CACHE_DIR   cache directory (default ~/.firkin/cache); the kernel goes to
#                      $FIRKIN_CACHE_DIR/kernel
#   FIRKIN_SKIP_APT=1  skip apt-get (packages already installed); the final check still runs
set -Eeuo pipefail
# A step that fails says which one: `set -e` alone ends the script without a word.
trap 'printf "setup-guest: failed (exit %s) at line %s: %s\n" "$?" "$LINENO" "$BASH_COMMAND" >&2' ERR

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${FIRKIN_CACHE_DIR:-$HOME/.firkin/cache}"
target_dir="${CARGO_TARGET_DIR:-$repo/target}"
guest_bin="$target_dir/x86_64-unknown-linux-gnu/guest"

log() { printf 'setup-guest: %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# FIRKIN_GUEST_TOOL: a built firkin-guest to use instead of `cargo run` (the tests use it).
firkin_guest() {
    if [ -n "${FIRKIN_GUEST_TOOL:-}" ]; then
        "$FIRKIN_GUEST_TOOL" "$@"
    else
        (cd "$repo" && cargo run --locked -q -p firkin-guest --bin firkin-guest -- "$@")
    fi
}

# Prints the installed version of a package, or nothing. dpkg-query exits 1 for a package this
# machine has never seen (a fresh machine has never seen qemu-system-x86): under `pipefail` that
# status would end the whole set-up, silently, so it is read as "not installed".
installed_version() {
    { dpkg-query -W -f='${Status} ${Version}' "$1" 2>/dev/null || true; } |
        awk '$1 == "install" && $2 == "ok" && $3 == "installed" { print $4 }'
}

install_packages() {
    local wanted=() p
    mapfile -t wanted < <(firkin_guest host-tools packages)
    # The SDK test suites' virtualenv (Debian's python3 lacks ensurepip without it).
    wanted+=(python3-venv)

    # QEMU's packages must be one version: an image may carry a backported qemu-utils, and apt
    # resolves qemu-system-x86's conflict with it by *removing* qemu-utils (qemu-img gone), or
    # refuses both at once as "held broken packages". So every qemu-* package is pinned to the
    # version qemu-system-x86 installs at, in one transaction, downgrading a mismatched one.
    local qemu_now utils_now missing=()
    qemu_now=$(installed_version qemu-system-x86)
    utils_now=$(installed_version qemu-utils)
    for p in "${wanted[@]}"; do
        [ -n "$(installed_version "$p")" ] || missing+=("$p")
    done
    if [ "${#missing[@]}" -eq 0 ] && [ "$qemu_now" = "$utils_now" ]; then
        log "packages present (QEMU $qemu_now)"
    else
        as_root apt-get update -q
        local qemu_version args=()
        qemu_version=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ { print $2 }')
        if [ -z "$qemu_version" ] || [ "$qemu_version" = "(none)" ]; then
            log "apt has no candidate for qemu-system-x86; is this Debian 12 with main enabled?"
            exit 1
        fi
        for p in "${wanted[@]}"; do
            case "$p" in
                qemu-*) args+=("$p=$qemu_version") ;;
                *) args+=("$p") ;;
            esac
        done
        log "installing ${args[*]}"
        # --no-install-recommends: qemu-system-x86's recommends pull in a GUI stack.
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
            --no-install-recommends --allow-downgrades "${args[@]}"
    fi
    # `apt-get download` (the guest kernel) needs package lists even when nothing was installed.
    if ! apt-cache policy linux-image-cloud-amd64 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        as_root apt-get update -q
    fi
}

build_guest_binaries() {
    local pkgs=(-p firkin-init)
    if [ -f "$repo/crates/envd/Cargo.toml" ]; then pkgs+=(-p firkin-envd); fi
    # The code interpreter (port 49999): only templates whose recipe asks for it get it.
    if [ -f "$repo/crates/interpreter/Cargo.toml" ]; then pkgs+=(-p firkin-interpreter); fi
    log "building static ${pkgs[*]}"
    # Static glibc binaries; the explicit --target keeps these RUSTFLAGS from invalidating the
    # host build.
    (cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --locked --profile guest --target x86_64-unknown-linux-gnu "${pkgs[@]}")
    # Installed into the cache, where firkin looks for them (FIRKIN_GUEST_BIN_DIR overrides),
    # so a running firkin does not depend on this checkout's target directory.
    mkdir -p "$cache/guest/bin"
    for b in firkin-init firkin-envd firkin-interpreter; do
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
    firkin_guest kernel --dir "$cache/kernel"
}

# After the install, never before it: an install can remove a tool that was there.
verify_tools() {
    log "checking every host program firkin runs"
    if ! firkin_guest host-tools check; then
        log "a host tool is missing or broken (above); the set-up is incomplete"
        exit 1
    fi
}

if [ "${1:-}" = --verify ]; then
    verify_tools
    exit 0
fi
[ "${FIRKIN_SKIP_APT:-0}" = 1 ] || install_packages
build_guest_binaries
fetch_kernel
verify_tools
log "done"
