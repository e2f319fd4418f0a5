#!/usr/bin/env bash
# Drives a live `firkin serve` through the official e2b Python SDK (tests/sdk/test_serve.py).
# Works on a fresh Debian 12 machine as root: creates or reuses the venv (tests/sdk/venv.sh:
# FIRKIN_SDK_VENV, FIRKIN_SDK_NEWEST), builds firkin and firkin-envd, runs pytest. Extra arguments go
# to pytest.
#
#   FIRKIN_TEST_BACKEND=qemu|process   sandbox backend (default qemu: real VMs)
#   FIRKIN_CACHE_DIR                   shared cache (templates built once are reused)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
. tests/sdk/venv.sh
# Node and E2B's JS SDK, for test_code_interpreter.py's JavaScript SDK test (sets NODE).
. tests/sdk/node.sh

# The suite runs commands as `user`; a VM template has it, a bare host may not.
if [ "${FIRKIN_TEST_BACKEND:-qemu}" = process ] && [ "$(id -u)" = 0 ] && ! id user >/dev/null 2>&1; then
  useradd -m -s /bin/bash user
fi

cargo build -p firkin -p firkin-envd
target="${CARGO_TARGET_DIR:-$REPO/target}/debug"
export FIRKIN_BIN="${FIRKIN_BIN:-$target/firkin}"
export FIRKIN_ENVD_BIN="${FIRKIN_ENVD_BIN:-$target/firkin-envd}"
# test_code_interpreter.py starts its own server with `--template code-interpreter-v1`: the
# template is built once per cache (minutes under TCG) and adopted by later runs.
exec "$VENV/bin/python" -m pytest -q --durations=25 tests/sdk/test_serve.py tests/sdk/test_code_interpreter.py "$@"
