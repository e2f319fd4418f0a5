"""Per-sandbox networks (issue 12) through the official e2b SDK, with real VMs.

tests/sdk/run-network.sh builds a test internet in network namespaces and runs this file in
`fkt-host`, whose only way out is `fkt-inet` (see the script for the addresses). The servers
are test_serve.py's, started with the network flags below and listening on every address of
fkt-host, so that a guest reaching the API is a real possibility the tests rule out.

Every check that something is unreachable from a sandbox is paired with the same connection
succeeding from fkt-host, so that it can fail.
"""

import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from unittest import mock

import httpx
import pytest
from dnslib import DNSRecord

from e2b import CommandExitException, Sandbox, SandboxException

import test_serve as ts
from test_serve import port_headers, serve_http, workdir  # noqa: F401 (fixture)

HOST_IP = os.environ.get("FIRKIN_TESTNET_HOST_IP", "")
ALLOWED_IP = os.environ.get("FIRKIN_TESTNET_ALLOWED_IP", "")
DENIED_IP = os.environ.get("FIRKIN_TESTNET_DENIED_IP", "")
OTHER_IP = os.environ.get("FIRKIN_TESTNET_OTHER_IP", "")
METADATA_IP = os.environ.get("FIRKIN_TESTNET_METADATA_IP", "")
DNS_UPSTREAM = os.environ.get("FIRKIN_TESTNET_DNS", "")
NET_PREFIX = os.environ.get("FIRKIN_TESTNET_PREFIX", "fkt")
# The guest's side of every slot: its gateway, and firkin's DNS server for it.
GUEST_GATEWAY = "10.0.2.2"
GUEST_DNS = "10.0.2.3"
# The slot range the server under test numbers its slots from (its first /30s are probed).
SLOT_RANGE = "198.18.0.0/16"
SLOT_RANGE_FIRST = (198, 18, 0, 0)
ENVD_PORT = 49983


def serve_flags(network: str = "tap", prefix: str = NET_PREFIX) -> list[str]:
    """The issue-12 flags of `firkin serve` this suite relies on, in one place."""
    if network == "user":
        return ["--network", "user"]
    return [
        "--network", network, "--net-prefix", prefix, "--net-range", SLOT_RANGE,
        "--dns-upstream", DNS_UPSTREAM,
    ]


def _serve_help() -> str:
    try:
        return subprocess.run(
            [ts.FIRKIN, "serve", "--help"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


_HELP = _serve_help()
_MISSING = [f for f in ("--network", "--net-prefix", "--dns-upstream") if not re.search(rf"{f}(?![\w-])", _HELP)]

pytestmark = [
    pytest.mark.skipif(
        not (HOST_IP and ALLOWED_IP and DNS_UPSTREAM),
        reason="needs the test internet: run tests/sdk/run-network.sh",
    ),
    pytest.mark.skipif(ts.BACKEND != "qemu", reason="per-sandbox networks are the VM backend's"),
]
needs_wiring = pytest.mark.skipif(
    bool(_MISSING),
    reason=f"`{ts.FIRKIN} serve --help` lacks {', '.join(_MISSING)}: issue 12's network wiring is not in this build",
)


class NetServe(ts.Serve):
    """test_serve's `Serve`, listening on every address of its namespace, with `flags` added
    (a flag given here replaces the same flag of the base command line)."""

    def __init__(self, state_dir: str, flags: list[str]):
        self.flags = flags
        super().__init__(state_dir, "e2b_" + secrets.token_hex(20))

    def start(self):
        real = subprocess.Popen
        names = {f for f in self.flags if f.startswith("--")}

        def popen(argv, *args, **kwargs):
            base, i = [], 0
            while i < len(argv):
                if argv[i] in names:
                    i += 2
                    continue
                base.append(f"0.0.0.0:{self.port}" if argv[i] == f"127.0.0.1:{self.port}" else argv[i])
                i += 1
            return real(base + self.flags, *args, **kwargs)

        with mock.patch.object(subprocess, "Popen", popen):
            super().start()


@pytest.fixture(scope="session")
def server(workdir):  # noqa: F811
    s = NetServe(os.path.join(workdir, "state"), serve_flags())
    yield s
    s.stop()
    ts.wait_for_sandbox_processes(s.state_dir, 0, timeout=30)


def create(server, **kwargs) -> Sandbox:
    return Sandbox.create(timeout=600, **server.opts(), **kwargs)


@pytest.fixture
def sbx(server):
    s = create(server)
    yield s
    s.kill()


@pytest.fixture(scope="session")
def host_listener():
    """A TCP listener on every address of fkt-host (also the host ends of the slots' veths,
    which appear later), answering `host-listener`. Returns its port."""
    srv = socket.create_server(("0.0.0.0", 0), backlog=64)
    srv.settimeout(0.5)
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except (socket.timeout, OSError):
                continue
            with c:
                c.sendall(b"host-listener\n")

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join(5)
    srv.close()


# ---------------------------------------------------------------- helpers

# Connects to every IP:PORT given at once; prints those that accepted. The same source runs in
# the guest (python3 of the template) and in fkt-host, so both sides probe alike.
PROBE = r"""
import socket, sys, threading
ok = []
def one(t):
    host, port = t.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        ok.append(t)
    except OSError:
        pass
ts = [threading.Thread(target=one, args=(t,)) for t in sys.argv[1:]]
[t.start() for t in ts]
[t.join() for t in ts]
print("\n".join(sorted(ok)))
"""


def probe_from_guest(sbx, targets: list[str]) -> list[str]:
    path = f"/tmp/probe-{secrets.token_hex(4)}.py"
    sbx.files.write(path, PROBE)
    started = time.monotonic()
    out = sbx.commands.run(f"python3 {path} {' '.join(targets)}", timeout=60).stdout.split()
    assert time.monotonic() - started < 30, "probes from the guest were not bounded"
    return out


def probe_from_host(targets: list[str]) -> list[str]:
    r = subprocess.run([sys.executable, "-c", PROBE, *targets], capture_output=True, text=True, timeout=60)
    return r.stdout.split()


def fetch(sbx, url: str, timeout: int = 5) -> str | None:
    """GET `url` with curl in the guest: the body, or None when it could not connect."""
    try:
        return sbx.commands.run(f"curl -sSk -m {timeout} {url}", timeout=timeout + 30).stdout
    except CommandExitException:
        return None


def fetch_until(sbx, url: str, want: str | None, timeout: float = 30) -> str | None:
    """Fetches until the answer is `want` (a policy change may take a moment to apply)."""
    deadline = time.monotonic() + timeout
    while True:
        got = fetch(sbx, url)
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(1)


def slot_addresses() -> list[str]:
    """Both ends of every slot /30 visible from fkt-host (the host ends are its addresses; the
    slot ends are one above), and those of the first 16 /30s of the range."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, timeout=10).stdout
    found = set()
    for m in re.finditer(r"inet (\d+)\.(\d+)\.(\d+)\.(\d+)/30", out):
        a, b, c, d = map(int, m.groups())
        found |= {f"{a}.{b}.{c}.{d}", f"{a}.{b}.{c}.{d + 1}"}
    a, b, c, _ = SLOT_RANGE_FIRST
    for i in range(16):
        found |= {f"{a}.{b}.{c}.{4 * i + 1}", f"{a}.{b}.{c}.{4 * i + 2}"}
    return sorted(found)


# ---------------------------------------------------------------- the harness itself


def test_the_test_internet_answers_fkt_host(host_listener):
    """Runs without the wiring: the namespaces, servers and listeners the other tests need."""
    for ip, name in [(ALLOWED_IP, "allowed"), (DENIED_IP, "denied"), (OTHER_IP, "other"), (METADATA_IP, "metadata")]:
        assert httpx.get(f"http://{ip}/", timeout=5).text == f"{name}\n"
    assert httpx.get(f"https://{ALLOWED_IP}/", verify=False, timeout=5).text == "allowed\n"
    host, port = DNS_UPSTREAM.rsplit(":", 1)
    reply = DNSRecord.parse(DNSRecord.question("sub.allowed.test").send(host, int(port), timeout=3))
    assert [str(r.rdata) for r in reply.rr] == [ALLOWED_IP]
    assert probe_from_host([f"127.0.0.1:{host_listener}", f"{HOST_IP}:{host_listener}"]) == sorted(
        [f"127.0.0.1:{host_listener}", f"{HOST_IP}:{host_listener}"]
    )


# ---------------------------------------------------------------- 1. any guest port


@needs_wiring
def test_a_closed_guest_port_answers_502_at_once(server, sbx):
    # Reaching an open port by header and by Host is test_serve.py's
    # test_any_guest_port_by_header_host_and_get_host, which runs on TAP networks as root too.
    started = time.monotonic()
    r = httpx.get(server.url + "/", headers=port_headers(sbx, 8999), timeout=60)
    assert r.status_code == 502, (r.status_code, r.text)
    body = r.json()
    assert body["code"] == 502 and "port is not open" in body["message"], body
    assert body["sandboxId"] == sbx.sandbox_id and body["port"] == 8999, body
    assert time.monotonic() - started < 10


# ---------------------------------------------------------------- 2. isolation


@needs_wiring
def test_a_guest_reaches_no_host_address_no_other_sandbox_no_link_local(server, host_listener):
    a, b = create(server), create(server)
    try:
        serve_http(b, 8000)
        serve_http(a, 8000)
        api = server.port
        targets = [
            f"{HOST_IP}:{api}",
            f"{GUEST_GATEWAY}:{api}",
            f"{HOST_IP}:{host_listener}",
            f"{GUEST_GATEWAY}:{host_listener}",
            f"{METADATA_IP}:80",
        ]
        for addr in slot_addresses():
            targets += [f"{addr}:{p}" for p in (ENVD_PORT, 8000, api, host_listener)]

        # From fkt-host: the API, the listeners, the metadata stand-in and the sandboxes' ports
        # answer (the proxy reaches guests through their slots), so each probe below can fail.
        on_host = [t for t in targets if not t.startswith(GUEST_GATEWAY + ":")]
        from_host = set(probe_from_host(on_host + [f"127.0.0.1:{host_listener}"]))
        for t in [f"{HOST_IP}:{api}", f"{HOST_IP}:{host_listener}", f"127.0.0.1:{host_listener}", f"{METADATA_IP}:80"]:
            assert t in from_host, (t, sorted(from_host))
        assert len([t for t in from_host if t.endswith(f":{ENVD_PORT}")]) >= 2, sorted(from_host)
        assert any(t.endswith(":8000") and t.startswith("198.18.") for t in from_host), sorted(from_host)

        # From a guest: nothing, and quickly.
        assert probe_from_guest(a, targets) == []
        assert fetch(a, f"http://{METADATA_IP}/", timeout=3) is None
        # While the test internet is still reachable from it (the guest's network works).
        assert fetch(a, f"http://{ALLOWED_IP}/") == "allowed\n"
    finally:
        a.kill()
        b.kill()


# ---------------------------------------------------------------- 3. egress


@needs_wiring
def test_default_sandbox_reaches_the_internet_by_address(sbx):
    assert fetch(sbx, f"http://{ALLOWED_IP}/") == "allowed\n"
    assert fetch(sbx, f"https://{DENIED_IP}/") == "denied\n"


@needs_wiring
def test_default_sandbox_resolves_names_through_firkins_dns(sbx):
    resolv = sbx.commands.run("cat /etc/resolv.conf").stdout
    assert f"nameserver {GUEST_DNS}" in resolv, resolv
    try:
        got = sbx.commands.run("getent hosts sub.allowed.test", timeout=30).stdout
    except CommandExitException as e:
        pytest.fail(f"sub.allowed.test did not resolve through {GUEST_DNS} (--dns-upstream {DNS_UPSTREAM}): {e}")
    assert got.split()[0] == ALLOWED_IP, got
    assert fetch(sbx, "http://allowed.test/") == "allowed\n"
    assert fetch(sbx, "https://allowed.test/") == "allowed\n"


@needs_wiring
def test_no_internet_access_reaches_nothing(server):
    s = create(server, allow_internet_access=False)
    try:
        started = time.monotonic()
        assert fetch(s, f"http://{ALLOWED_IP}/", timeout=3) is None
        assert fetch(s, f"http://{DENIED_IP}/", timeout=3) is None
        assert time.monotonic() - started < 30
        assert s.commands.run("echo still-here").stdout == "still-here\n"
    finally:
        s.kill()


@needs_wiring
def test_allow_out_by_domain_update_network_and_pause_keep_the_policy(server):
    s = create(server, network={"allow_out": ["allowed.test"], "deny_out": ["0.0.0.0/0"]})
    sid = s.sandbox_id
    try:
        assert fetch(s, "http://allowed.test/") == "allowed\n"
        assert fetch(s, "https://allowed.test/") == "allowed\n"
        assert fetch(s, "http://denied.test/", timeout=3) is None
        assert fetch(s, f"http://{DENIED_IP}/", timeout=3) is None
        assert fetch(s, f"http://{OTHER_IP}/", timeout=3) is None
        # A connection that names an allowed domain (TLS SNI, HTTP Host) passes whatever the
        # address, as with E2B's egress proxy; one that names another does not.
        assert fetch(s, f"--resolve allowed.test:443:{DENIED_IP} https://allowed.test/") == "denied\n"
        assert fetch(s, f"-H 'Host: allowed.test' http://{OTHER_IP}/") == "other\n"
        assert fetch(s, f"--resolve denied.test:443:{DENIED_IP} https://denied.test/", timeout=3) is None
        assert fetch(s, f"-H 'Host: denied.test' http://{OTHER_IP}/", timeout=3) is None

        s.update_network({"allow_out": ["allowed.test", f"{DENIED_IP}/32"], "deny_out": ["0.0.0.0/0"]})
        assert fetch_until(s, f"http://{DENIED_IP}/", "denied\n") == "denied\n"
        assert fetch(s, "http://allowed.test/") == "allowed\n"
        assert fetch(s, f"http://{OTHER_IP}/", timeout=3) is None

        assert s.pause() is True
        back = Sandbox.connect(sid, **server.opts())
        assert fetch(back, f"http://{DENIED_IP}/") == "denied\n"
        assert fetch(back, "http://allowed.test/") == "allowed\n"
        assert fetch(back, f"http://{OTHER_IP}/", timeout=3) is None
        assert fetch(back, f"http://{METADATA_IP}/", timeout=3) is None
    finally:
        Sandbox.kill(sid, **server.opts())


# ---------------------------------------------------------------- 4. traffic token


@needs_wiring
def test_private_traffic_needs_the_traffic_token(server):
    s = create(server, network={"allow_public_traffic": False})
    try:
        token = s.traffic_access_token
        assert isinstance(token, str) and token, token
        marker = serve_http(s, 8000)
        r = httpx.get(server.url + "/", headers=port_headers(s, 8000), timeout=60)
        assert r.status_code == 403, (r.status_code, r.text)
        r = httpx.get(server.url + "/", headers=port_headers(s, 8000, **{"e2b-traffic-access-token": token}), timeout=60)
        assert r.status_code == 200 and marker in r.text, (r.status_code, r.text[:300])
    finally:
        s.kill()


# ---------------------------------------------------------------- 5. nothing on host loopback


def _listening_inodes() -> set[str]:
    inodes = set()
    for f in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(f) as fh:
            for line in list(fh)[1:]:
                cols = line.split()
                if cols[3] == "0A":  # LISTEN
                    inodes.add(cols[9])
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
        if m:
            out.add(m.group(1))
    return out


@needs_wiring
def test_no_vm_listens_in_the_host_namespace(server):
    a, b = create(server), create(server)
    try:
        pids = ts.sandbox_processes(server.state_dir)
        assert len(pids) >= 2, pids
        listening = _listening_inodes()
        me = os.readlink("/proc/self/ns/net")
        for pid in pids:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            assert b"hostfwd" not in cmd, cmd
            assert not (_socket_inodes(pid) & listening), f"QEMU {pid} listens in fkt-host"
            # Each VM runs in its slot's namespace, not the server's.
            assert os.readlink(f"/proc/{pid}/ns/net") != me, pid
        ss = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=10).stdout
        assert "qemu" not in ss, ss
    finally:
        a.kill()
        b.kill()


# ---------------------------------------------------------------- --network user


@needs_wiring
def test_user_networking_refuses_an_egress_policy(workdir):  # noqa: F811
    # Its own state directory, no warm pool and no template: a second server beside the first.
    # The refusal comes before the template is looked up, so it needs no `base` built for
    # user-mode networking (which, in this namespace without a mirror, could not be built).
    s = NetServe(
        os.path.join(workdir, "user-state"),
        serve_flags("user") + ["--warm-pool", "base=0", "--no-default-template"],
    )
    try:
        r = httpx.post(
            s.url + "/v2/sandboxes",
            headers={"X-API-KEY": s.key},
            json={"templateID": "base", "timeout": 60, "allow_internet_access": False},
            timeout=120,
        )
        assert r.status_code == 400, (r.status_code, r.text)
        assert r.json()["code"] == 400 and r.json()["message"], r.text
        with pytest.raises(SandboxException):
            Sandbox.create(timeout=60, allow_internet_access=False, **s.opts())
    finally:
        s.stop()
    ts.assert_nothing_outlives(s.state_dir)
