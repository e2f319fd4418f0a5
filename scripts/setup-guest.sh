#!/usr/bin/env bash
# Installs the host programs firkin runs and builds the guest-side assets. Idempotent; run as
# root on Debian 12 (CI and developer machines). Called by the top-level set-up scripts.
#
#   scripts/setup-guest.sh            # packages, static guest binaries, the code interpreter's
#                                     # kernels (pinned bash_kernel wheel, Deno), guest kernel,
#                                     # final check
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
    # The SDK test suites' virtualenv (Debian's python3 lacks ensurepip without it); curl and
    # CA certificates fetch the code interpreter's pinned kernels (fetch_interpreter_kernels).
    wanted+=(python3-venv curl ca-certificates)

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

# The code interpreter's kernels that Debian does not package, fetched here on the host (pinned,
# verified) and uploaded into the code-interpreter template's build, so the guest never
# installs from the network. IRkernel, ipykernel and bash_kernel's dependencies come from
# Debian in the template's package list (crates/guest/src/rootfs.rs).
#
# bash_kernel exists only on PyPI: the wheel and its sha256 from
# https://pypi.org/pypi/bash_kernel/json. Deno ships on npm as @deno/linux-x64-glibc: the
# tarball and its `dist.integrity` from https://registry.npmjs.org/@deno/linux-x64-glibc.
# Changing a pin rebuilds code-interpreter-v1 (its fingerprint covers both files), nothing else.
bash_kernel_wheel="bash_kernel-0.10.0-py2.py3-none-any.whl"
bash_kernel_url="https://files.pythonhosted.org/packages/50/10/3753926476ac077d1f4548369c0ff2a5600e2c8fa5aef3cfcc5b10cf6155/$bash_kernel_wheel"
bash_kernel_sha256="da28513230f5307c7a49e87352366304dc52b66faa207d6caed1b2bdec03c1fa"
deno_version="2.9.6"
deno_url="https://registry.npmjs.org/@deno/linux-x64-glibc/-/linux-x64-glibc-$deno_version.tgz"
deno_integrity="sha512-3md4TKLCuzsLDmfOoC5KN7NAZaxSVkMgm64vg6foD00JBADCpYS2/5QqXfzgnP5ZQz3iLP9vBQJtEgc116OAoQ=="

# npm's integrity string (`sha512-<base64 of the raw digest>`) of a file.
npm_integrity() {
    printf 'sha512-%s' "$(sha512sum "$1" | cut -d' ' -f1 | tr a-f A-F | basenc --base16 -d | base64 -w0)"
}

fetch_interpreter_kernels() {
    local bin="$cache/guest/bin" tmp
    mkdir -p "$bin"
    # A fetch that failed half-way (curl, a refused digest) leaves its directory; the next run
    # clears it.
    rm -rf "$bin"/.fetch.*
    tmp=$(mktemp -d "$bin/.fetch.XXXXXX")

    if [ -f "$bin/$bash_kernel_wheel" ] &&
        [ "$(sha256sum "$bin/$bash_kernel_wheel" | cut -d' ' -f1)" = "$bash_kernel_sha256" ]; then
        log "bash_kernel wheel present ($bash_kernel_wheel)"
    else
        log "fetching $bash_kernel_wheel"
        curl -fsSL --retry 3 -o "$tmp/$bash_kernel_wheel" "$bash_kernel_url"
        local got
        got=$(sha256sum "$tmp/$bash_kernel_wheel" | cut -d' ' -f1)
        if [ "$got" != "$bash_kernel_sha256" ]; then
            log "$bash_kernel_wheel: sha256 $got, pinned $bash_kernel_sha256; refusing it"
            exit 1
        fi
        # One wheel only: firkin uploads whichever bash_kernel wheel the directory holds and
        # refuses two.
        rm -f "$bin"/bash_kernel-*.whl
        mv -f "$tmp/$bash_kernel_wheel" "$bin/$bash_kernel_wheel"
    fi

    # The version a present `deno` reports is what decides: the tarball is not kept.
    if [ -x "$bin/deno" ] && "$bin/deno" --version 2>/dev/null | head -1 | grep -qx "deno $deno_version .*"; then
        log "deno $deno_version present"
    else
        log "fetching deno $deno_version"
        curl -fsSL --retry 3 -o "$tmp/deno.tgz" "$deno_url"
        local integrity
        integrity=$(npm_integrity "$tmp/deno.tgz")
        if [ "$integrity" != "$deno_integrity" ]; then
            log "deno $deno_version: integrity $integrity, pinned $deno_integrity; refusing it"
            exit 1
        fi
        tar -xzf "$tmp/deno.tgz" -C "$tmp" package/deno
        install -m 0755 "$tmp/package/deno" "$bin/deno.tmp"
        mv -f "$bin/deno.tmp" "$bin/deno"
    fi
    rm -rf "$tmp"
    log "code interpreter kernels in $bin"
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
fetch_interpreter_kernels
fetch_kernel
verify_tools
log "done"
