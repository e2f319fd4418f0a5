#!/usr/bin/env bash
# Drives a host-mode firkin-envd through the official e2b Python SDK (tests/sdk/test_envd_host.py).
# Works on a fresh Debian 12 machine as root: creates or reuses the venv (tests/sdk/venv.sh:
# FIRKIN_SDK_VENV, FIRKIN_SDK_NEWEST), builds firkin-envd, runs pytest. Extra arguments go
# to pytest.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
. tests/sdk/venv.sh

cargo build -p firkin-envd
export FIRKIN_ENVD_BIN="${FIRKIN_ENVD_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/debug/firkin-envd}"
exec "$VENV/bin/python" -m pytest -q --durations=10 tests/sdk/test_envd_host.py "$@"
