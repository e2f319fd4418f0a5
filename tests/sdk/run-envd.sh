#!/usr/bin/env bash
# Drives a host-mode firkin-envd through the official e2b Python SDK (tests/sdk/test_envd_host.py).
# Works on a fresh Debian 12 machine as root: installs python3-venv when needed, creates or
# reuses $REPO/.venv, builds firkin-envd, runs pytest. Extra arguments go to pytest.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$REPO/.venv"
cd "$REPO"

if [ ! -x "$VENV/bin/python" ]; then
  if ! python3 -m venv "$VENV" 2>/dev/null; then
    rm -rf "$VENV"
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      DEBIAN_FRONTEND=noninteractive apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    fi
    python3 -m venv "$VENV"
  fi
fi
# pip skips what is already installed at the pinned versions, so reruns are quick.
"$VENV/bin/pip" install --disable-pip-version-check -q -r tests/sdk/requirements.txt

cargo build -p firkin-envd
export FIRKIN_ENVD_BIN="${FIRKIN_ENVD_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/debug/firkin-envd}"
exec "$VENV/bin/python" -m pytest -q tests/sdk/test_envd_host.py "$@"
