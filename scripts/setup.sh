#!/usr/bin/env bash
# One-time (idempotent) set-up of a fresh Debian 12 machine, as root:
#   - system packages: QEMU, qemu-img, mmdebstrap, e2fsprogs, cpio, busybox-static, protoc,
#     python3-venv (for the SDK tests);
#   - the static guest binaries (firkin-init, firkin-envd) into $FIRKIN_CACHE_DIR/guest/bin;
#   - Debian's cloud kernel and its virtio modules into $FIRKIN_CACHE_DIR/kernel.
# Templates are not built here: `firkin serve` builds `base` on first start, and the tests
# build what they need.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian's python3 lacks ensurepip until python3-venv is installed; try the real thing.
if [ "$(id -u)" = 0 ] && [ "${FIRKIN_SKIP_APT:-0}" != 1 ]; then
  probe=$(mktemp -d)
  if ! python3 -m venv "$probe/v" >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv
  fi
  rm -rf "$probe"
fi

./scripts/setup-guest.sh
