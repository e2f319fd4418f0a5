#!/usr/bin/env bash
# The test command: everything CI runs, from a fresh Debian 12 machine (as root).
#
#   ./scripts/test.sh            # set-up, lint, unit + integration tests, VM tests, SDK tests
#   FIRKIN_TEST_SKIP_SETUP=1 …   # skip apt/kernel/template set-up (already done)
#
# It installs what it needs (apt packages, a Python venv with the pinned e2b SDK), builds the
# static guest binaries, fetches the guest kernel and builds the default template, then runs the
# suites. Assets land in $FIRKIN_CACHE_DIR (default ~/.firkin/cache) and are reused next time.
#
# SDK compatibility matrix: the SDK suites run against the pinned e2b (tests/sdk/requirements.txt;
# a failure fails the run), then scripts/sdk-newest.sh runs the serve suite once more against
# the newest e2b on PyPI. That second run may fail: the run stays green and its last line names
# the failed tests (FIRKIN_TEST_SKIP_NEWEST_SDK=1 skips it on machines without PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
started=$SECONDS
elapsed() { echo "($((SECONDS - started)) s so far)"; }

if [ "${FIRKIN_TEST_SKIP_SETUP:-0}" != 1 ]; then
  step "set-up: system packages, guest binaries, kernel, default template"
  ./scripts/setup.sh
  elapsed
fi

# A machine missing a host tool fails here, at the start, naming it (not minutes later in a
# test that happens to call it).
step "firkin doctor (the host can run firkin)"
cargo run --locked -q -p firkin -- doctor --listen 127.0.0.1:0
elapsed

step "format"
cargo fmt --all -- --check

step "clippy"
cargo clippy --workspace --all-targets --all-features -- -D warnings
elapsed

step "cargo test (unit, integration, real VMs under the detected accelerator)"
cargo test --workspace --all-features -- --test-threads="${FIRKIN_TEST_THREADS:-2}"
elapsed

step "envd through the official e2b SDK (host mode)"
./tests/sdk/run-envd.sh
elapsed

step "firkin serve through the official e2b SDK (real VMs)"
./tests/sdk/run-serve.sh
elapsed

step "per-sandbox networks through the official e2b SDK (real VMs, test internet in namespaces)"
./tests/sdk/run-network.sh
elapsed

step "firkin serve through the newest e2b on PyPI (allowed to fail)"
newest_out=$(mktemp)
./scripts/sdk-newest.sh | tee "$newest_out"
elapsed

step "all green in $((SECONDS - started)) s"
tail -n 1 "$newest_out"
