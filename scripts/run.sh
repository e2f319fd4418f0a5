#!/usr/bin/env bash
# The run command: set up a fresh Debian 12 machine (as root) and start `firkin serve` on
# 127.0.0.1:3000. The first start builds the default template `base` (a couple of minutes),
# then prints the environment variables that point the E2B SDK at this server.
#
#   ./scripts/run.sh                       # defaults
#   ./scripts/run.sh --listen 0.0.0.0:3000 # any `firkin serve` flag (see --help)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release --locked -p firkin
exec ./target/release/firkin serve "$@"
