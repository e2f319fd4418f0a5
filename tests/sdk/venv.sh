# Sourced by run-envd.sh and run-serve.sh: the Python venv the SDK suites run in, with the
# SDK they test. Expects REPO; sets VENV.
#
#   FIRKIN_SDK_VENV     the venv (default $REPO/.venv)
#   FIRKIN_SDK_NEWEST=1 install the newest e2b, e2b-code-interpreter and pytest on PyPI instead
#                       of the pins in requirements.txt (scripts/test.sh's compatibility matrix;
#                       use another venv, e.g. $REPO/.venv-latest, so that the pinned one stays
#                       pinned)
#
# Works on a fresh Debian 12 machine as root: installs python3-venv when needed.
VENV="${FIRKIN_SDK_VENV:-$REPO/.venv}"

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
if [ "${FIRKIN_SDK_NEWEST:-0}" = 1 ]; then
  "$VENV/bin/pip" install --disable-pip-version-check -q -U e2b e2b-code-interpreter pytest
else
  # pip skips what is already installed at the pinned versions, so reruns are quick.
  "$VENV/bin/pip" install --disable-pip-version-check -q -r "$REPO/tests/sdk/requirements.txt"
fi
echo "SDK: e2b $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("e2b"))') in $VENV" >&2
