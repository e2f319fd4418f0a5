#!/usr/bin/env bash
# One-time (idempotent) set-up of a fresh Debian 12 machine, as root:
#   - system packages, in one apt transaction: QEMU and qemu-img at one version, mmdebstrap,
#     e2fsprogs, busybox-static, python3-venv (for the SDK tests); the list is the code's
#     (`firkin-guest host-tools packages`);
#   - the static guest binaries (firkin-init, firkin-envd) into $FIRKIN_CACHE_DIR/guest/bin;
#   - Debian's cloud kernel and its virtio modules into $FIRKIN_CACHE_DIR/kernel;
#   - a final check that every host program firkin runs is there and runs.
# Templates are not built here: `firkin serve` builds `base` on first start, and the tests
# build what they need.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-guest.sh
