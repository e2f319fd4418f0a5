#!/usr/bin/env bash
# Per-sandbox networks (issue 12) through the official e2b Python SDK, with real VMs and a test
# internet in network namespaces, so that nothing leaves the machine (tests/sdk/test_network.py).
# Root only. Extra arguments go to pytest.
#
#   fkt-inet  the test internet: allowed.test 203.0.113.10, denied.test 203.0.113.20, other.test
#             203.0.113.30 (HTTP on :80 answering with its name; HTTPS on :443 for the first
#             two, self-signed), DNS 203.0.113.53:53, 169.254.169.254:80 (a metadata stand-in).
#             No route out of it, no forwarding in it.
#   fkt-host  where `firkin serve` and pytest run: 198.51.100.2/24, default route via
#             fkt-inet's 198.51.100.1. Its only link is that veth (and the slots firkin makes).
#
#   FIRKIN_BIN             a built firkin to test (default: build it with cargo)
#   FIRKIN_TESTNET_PREFIX  the tap server's --net-prefix (default fkt; no other server may use it)
#   FIRKIN_CACHE_DIR       shared cache (templates built once are reused)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
[ "$(id -u)" = 0 ] || { echo "run-network.sh needs root (network namespaces)" >&2; exit 1; }
# Host tools of the harness (a minimal Debian 12 may lack them).
need=()
command -v ip >/dev/null || need+=(iproute2)
command -v curl >/dev/null || need+=(curl)
command -v openssl >/dev/null || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
. tests/sdk/venv.sh
# FIRKIN_SDK_NEWEST installs only e2b and pytest: the DNS server's library at its pin.
"$VENV/bin/python" -c 'import dnslib' 2>/dev/null ||
  "$VENV/bin/pip" install --disable-pip-version-check -q "$(grep '^dnslib==' tests/sdk/requirements.txt)"

if [ -z "${FIRKIN_BIN:-}" ]; then
  cargo build -p firkin -p firkin-envd
  export FIRKIN_BIN="${CARGO_TARGET_DIR:-$REPO/target}/debug/firkin"
fi

# The server under test runs where nothing leaves the machine, so it cannot build a template
# (that downloads Debian packages). A server on the host's own network makes sure the TAP
# `base` template is in the shared cache first (a no-op when an earlier step built it) and
# stops once it is ready.
prep=$(mktemp -d /tmp/firkin-net-prep-XXXXXX)
"$FIRKIN_BIN" serve --listen 127.0.0.1:0 --state-dir "$prep/state" --network tap \
  --net-prefix fktp --net-range 198.19.254.0/24 --warm-pool base=0 >"$prep/out.log" 2>"$prep/err.log" &
prep_pid=$!
for _ in $(seq 1 1800); do
  grep -q "firkin is ready" "$prep/out.log" 2>/dev/null && break
  kill -0 "$prep_pid" 2>/dev/null || { tail -20 "$prep/err.log" >&2; exit 1; }
  sleep 1
done
kill -TERM "$prep_pid" 2>/dev/null || true
wait "$prep_pid" 2>/dev/null || true
grep -q "firkin is ready" "$prep/out.log" || { echo "the TAP base template was not ready within 30 min" >&2; tail -20 "$prep/err.log" >&2; exit 1; }
rm -rf "$prep"

HOST_NS=fkt-host INET_NS=fkt-inet
HOST_IP=198.51.100.2 INET_IP=198.51.100.1
ALLOWED=203.0.113.10 DENIED=203.0.113.20 OTHER=203.0.113.30 DNS=203.0.113.53 META=169.254.169.254
PREFIX="${FIRKIN_TESTNET_PREFIX:-fkt}"

work=$(mktemp -d /tmp/firkin-net-XXXXXX)
inet_pid=
remove_namespaces() {
  for ns in "$HOST_NS" "$INET_NS"; do
    if [ -e "/run/netns/$ns" ]; then
      # A server or VM pytest could not stop goes with its namespace.
      for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
      ip netns del "$ns" 2>/dev/null || true
    fi
  done
  # Slot namespaces are mounted inside fkt-host's `ip netns exec` mount namespace and vanish
  # with it; a crashed server can leave their (unmounted) files behind.
  for f in /run/netns/"$PREFIX"-[0-9]*; do
    [ -e "$f" ] || continue
    umount -l "$f" 2>/dev/null || true
    rm -f "$f"
  done
}
cleanup() {
  set +e
  if [ -n "$inet_pid" ]; then kill "$inet_pid" 2>/dev/null; wait "$inet_pid" 2>/dev/null; fi
  remove_namespaces
  rm -rf "$work"
}
trap cleanup EXIT
trap "exit 130" INT TERM HUP
remove_namespaces # leftovers of an interrupted run

ip netns add "$INET_NS"
ip netns add "$HOST_NS"
ip -n "$HOST_NS" link add veth0 type veth peer name veth0 netns "$INET_NS"
ip -n "$INET_NS" link set lo up
for a in $ALLOWED $DENIED $OTHER $DNS $META; do ip -n "$INET_NS" addr add "$a/32" dev lo; done
ip -n "$INET_NS" addr add "$INET_IP/24" dev veth0
ip -n "$INET_NS" link set veth0 up
ip netns exec "$INET_NS" sh -c 'echo 0 > /proc/sys/net/ipv4/ip_forward'
ip -n "$HOST_NS" link set lo up
ip -n "$HOST_NS" addr add "$HOST_IP/24" dev veth0
ip -n "$HOST_NS" link set veth0 up
ip -n "$HOST_NS" route add default via "$INET_IP"
if ip -n "$INET_NS" route show default | grep -q .; then
  echo "fkt-inet has a default route: refusing to run" >&2
  exit 1
fi

openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=allowed.test \
  -addext "subjectAltName=DNS:allowed.test,DNS:denied.test,IP:$ALLOWED,IP:$DENIED" \
  -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
ip netns exec "$INET_NS" "$VENV/bin/python" tests/sdk/netlab.py serve \
  --http "$ALLOWED:80=allowed" --http "$DENIED:80=denied" --http "$OTHER:80=other" \
  --http "$META:80=metadata" --https "$ALLOWED:443=allowed" --https "$DENIED:443=denied" \
  --cert "$work/cert.pem" --key "$work/key.pem" --dns "$DNS:53" \
  --record "allowed.test=$ALLOWED" --record "sub.allowed.test=$ALLOWED" \
  --record "denied.test=$DENIED" --record "other.test=$OTHER" >"$work/netlab.log" 2>&1 &
inet_pid=$!

inhost() { ip netns exec "$HOST_NS" "$@"; }
for _ in $(seq 100); do
  inhost curl -sf -m 1 -o /dev/null "http://$ALLOWED/" && break
  kill -0 "$inet_pid" 2>/dev/null || { cat "$work/netlab.log" >&2; exit 1; }
  sleep 0.2
done
# The test internet answers from fkt-host, so every "unreachable from the sandbox" can fail.
expect() {
  local want=$1 got
  shift
  got=$("$@" 2>&1) || true
  if [ "$got" != "$want" ]; then
    echo "test internet: \`$*\` gave '$got', expected '$want'" >&2
    exit 1
  fi
}
expect allowed inhost curl -sS -m 5 "http://$ALLOWED/"
expect denied inhost curl -sS -m 5 "http://$DENIED/"
expect other inhost curl -sS -m 5 "http://$OTHER/"
expect metadata inhost curl -sS -m 5 "http://$META/"
expect allowed inhost curl -sSk -m 5 "https://$ALLOWED/"
expect denied inhost curl -sSk -m 5 "https://$DENIED/"
q() { inhost "$VENV/bin/python" tests/sdk/netlab.py query "$DNS:53" "$1"; }
expect "$ALLOWED" q allowed.test
expect "$ALLOWED" q sub.allowed.test
expect "$DENIED" q denied.test
expect "" q no-such.test
if q no-such.test >/dev/null 2>&1; then echo "test internet: no-such.test resolved" >&2; exit 1; fi
echo "test internet up: $INET_NS answers $HOST_NS (HTTP, HTTPS, DNS)" >&2

export FIRKIN_TESTNET_HOST_IP=$HOST_IP FIRKIN_TESTNET_ALLOWED_IP=$ALLOWED FIRKIN_TESTNET_DENIED_IP=$DENIED
export FIRKIN_TESTNET_OTHER_IP=$OTHER FIRKIN_TESTNET_METADATA_IP=$META FIRKIN_TESTNET_DNS="$DNS:53"
export FIRKIN_TESTNET_PREFIX=$PREFIX
set +e
inhost "$VENV/bin/python" -m pytest -q -rfEs --durations=10 tests/sdk/test_network.py "$@"
rc=$?
set -e
exit $rc
