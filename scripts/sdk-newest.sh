#!/usr/bin/env bash
# The second column of the SDK compatibility matrix (scripts/test.sh runs it last): the serve
# suite (tests/sdk/test_serve.py, real VMs) against the newest `e2b` on PyPI at the time of the
# run, in its own venv ($REPO/.venv-latest), so an upstream change shows up as a named failure
# here, not as a user's bug report. It is allowed to fail: it always exits 0 and prints
#
#   SDK matrix: e2b 2.63.0 (pinned) passed | e2b 2.x.y (newest) passed
#   SDK matrix: e2b 2.63.0 (pinned) passed | e2b 2.x.y (newest) failed: test_a test_b
#
# (the pinned column says passed because test.sh only gets here when the pinned suites did).
# Extra arguments go to pytest (e.g. -k to run a subset). Costs one serve-suite run (1-2 min)
# plus a `pip install -U e2b pytest`.
#   FIRKIN_TEST_SKIP_NEWEST_SDK=1   skip it (machines without PyPI); the line says "not run"
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
pinned=$(sed -n 's/^e2b==//p' tests/sdk/requirements.txt)
venv="$REPO/.venv-latest"

if [ "${FIRKIN_TEST_SKIP_NEWEST_SDK:-0}" = 1 ]; then
  echo "SDK matrix: e2b $pinned (pinned) passed | newest e2b not run (FIRKIN_TEST_SKIP_NEWEST_SDK=1)"
  exit 0
fi

# The tests whose outcome the Python SDK's version cannot change stay with the pinned run: the
# JS SDK's (npm, pinned), those of the guest's kernels and clones, where the SDK only passes a
# language name, and the base image's tools, which are plain `commands.run` calls (together
# ~6 minutes of CI under TCG). The SDK's own surface (commands, files, pty, lifecycle;
# run_code, contexts, streaming, timeouts, results and charts) runs here too.
pinned_only="not test_js_sdk and not test_clones and not keep_state and not keeps_state"
pinned_only="$pinned_only and not test_base_has_the_tools or test_run_code_keeps_state"

log=$(mktemp -t firkin-sdk-newest.XXXXXX.log)
if FIRKIN_SDK_VENV="$venv" FIRKIN_SDK_NEWEST=1 ./tests/sdk/run-serve.sh -rfE -k "$pinned_only" "$@" 2>&1 | tee "$log"; then
  result=passed
else
  # pytest's summary lines: "FAILED tests/sdk/test_serve.py::test_x - why" (ERROR: in a fixture).
  failed=$(sed -nE 's/^(FAILED|ERROR) [^ ]*::([^ ]+).*/\2/p' "$log" | sort -u | paste -sd ' ' -)
  result="failed: ${failed:-no test ran, see $log}"
fi
newest=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("e2b"))' 2>/dev/null ||
  echo "?")
echo "SDK matrix: e2b $pinned (pinned) passed | e2b $newest (newest) $result"
