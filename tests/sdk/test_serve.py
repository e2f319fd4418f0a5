"""The official e2b SDK against a live `firkin serve`: control plane, proxy, lifecycle, crash.

Each server runs on a free port with its own temporary state directory and the shared cache
directory (templates built once are reused). The backend is FIRKIN_TEST_BACKEND: `qemu` (real
VMs, the default) or `process` (host processes, for developing firkin without VMs).
tests/sdk/run-serve.sh builds everything and runs this file.
"""

import asyncio
import concurrent.futures
import itertools
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from e2b import (
    AsyncSandbox,
    AuthenticationException,
    CommandExitException,
    FileType,
    FilesystemEventType,
    NotFoundException,
    Sandbox,
    SandboxException,
    SandboxQuery,
    SandboxState,
)
from e2b.sandbox.commands.command_handle import PtySize

REPO = Path(__file__).resolve().parents[2]
FIRKIN = os.environ.get("FIRKIN_BIN", str(REPO / "target" / "debug" / "firkin"))
BACKEND = os.environ.get("FIRKIN_TEST_BACKEND", "qemu")
CACHE = os.environ.get("FIRKIN_CACHE_DIR", str(Path.home() / ".firkin" / "cache"))
# The first start may build the default template (minutes under TCG).
READY_TIMEOUT = float(os.environ.get("FIRKIN_TEST_READY_TIMEOUT", "1800"))
# The sandboxes' network (`firkin serve --network`): a network of their own where the tests
# run as root (as CI does), else QEMU's user-mode network.
NETWORK = os.environ.get("FIRKIN_TEST_NETWORK", "tap" if os.geteuid() == 0 else "user")
# FIRKIN_TEST_SERVER_BASE starts the count elsewhere, for a run beside another one (a
# developer's run while CI runs): the numbers name each server's network slots.
SERVERS = itertools.count(int(os.environ.get("FIRKIN_TEST_SERVER_BASE", "0")))
# Restored sandboxes each server keeps ready: the suite counts VMs against records.
WARM = 1
# The process each sandbox is: a VM, or a host agent.
SANDBOX_PROCESS = b"qemu-system" if BACKEND == "qemu" else b"firkin-envd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_mentioning(path: str) -> list[int]:
    """Pids whose command line mentions `path` (VMMs keep their run files in the state dir)."""
    me = os.getpid()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if path.encode() in cmd and b"firkin\x00serve" not in cmd:
            out.append(int(entry))
    return out


# Short-lived helpers the server runs on a sandbox's run directory while it prepares one (the
# warm pool's refill creates overlays at any moment); they are not sandboxes.
HELPER_PROCESSES = (b"qemu-img\x00create\x00",)


def sandbox_processes(state_dir: str) -> list[int]:
    """A server's sandbox processes (their run directories are on their command lines), each
    checked to be what the backend runs, so that a VM test cannot pass on something else."""
    pids = []
    for pid in processes_mentioning(os.path.join(state_dir, "sandboxes")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue  # exited meanwhile
        if any(h in cmd for h in HELPER_PROCESSES):
            continue
        assert SANDBOX_PROCESS in cmd, (pid, cmd)
        pids.append(pid)
    return pids


def assert_nothing_outlives(state_dir: str, timeout: float = 20) -> None:
    """After its server exits, no process mentions the state directory for long (PDEATHSIG
    is delivered asynchronously, so a VM the server was starting may take a moment)."""
    deadline = time.monotonic() + timeout
    while processes_mentioning(state_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_mentioning(state_dir) == [], "processes outlived the server"


def wait_for_sandbox_processes(state_dir: str, want: int, timeout: float = 60) -> None:
    """Waits until exactly `want` sandbox processes run (the warm pool refills in the
    background, stopped VMs take a moment to exit)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = sandbox_processes(state_dir)
        if len(pids) == want:
            return
        assert time.monotonic() < deadline, f"expected {want} sandbox processes, found {pids}"
        time.sleep(0.2)


def assert_every_process_has_a_record(server: "Serve") -> None:
    """Every sandbox process is a running sandbox the API lists or the warm pool; every
    running sandbox listed has its process."""
    running = [
        x for x in Sandbox.list(**server.opts()).next_items() if x.state == SandboxState.RUNNING
    ]
    wait_for_sandbox_processes(server.state_dir, len(running) + WARM)


class Serve:
    """One `firkin serve` process."""

    def __init__(self, state_dir: str, key: str, port: int | None = None, extra_args: list[str] = ()):
        self.state_dir = state_dir
        self.key = key
        self.extra_args = list(extra_args)
        # Servers of the suite run side by side: each has its own slot names and addresses,
        # kept across its restarts (a restarted server removes what its crashed run left).
        n = next(SERVERS)
        # The same names from run to run: a run removes what a killed earlier one left.
        self.net_env = dict(FIRKIN_NET_PREFIX=f"sdk{n % 100}", FIRKIN_NET_RANGE=f"198.19.{n % 128}.0/24")
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(os.path.dirname(state_dir), f"serve-{self.port}.log")
        self.start()

    def start(self):
        env = dict(os.environ)
        env.update(
            FIRKIN_STATE_DIR=self.state_dir,
            FIRKIN_CACHE_DIR=CACHE,
            FIRKIN_API_KEY=self.key,
            FIRKIN_LOG=os.environ.get("FIRKIN_LOG", "info"),
            FIRKIN_NETWORK=NETWORK,
            **self.net_env,
        )
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                FIRKIN,
                "serve",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--backend",
                BACKEND,
                "--warm-pool",
                f"base={WARM}",
                *self.extra_args,
            ],
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
            text=True,
        )
        ready = threading.Event()
        self.banner = []

        def pump():
            for line in self.proc.stdout:
                self.banner.append(line)
                if "firkin is ready" in line:
                    ready.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + READY_TIMEOUT
        while not ready.wait(0.2):
            if self.proc.poll() is not None:
                raise RuntimeError(f"firkin serve exited with {self.proc.returncode}; log: {self.log_path}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"firkin serve not ready after {READY_TIMEOUT}s; log: {self.log_path}")

    def opts(self, key=None) -> dict:
        return dict(api_key=key or self.key, api_url=self.url, sandbox_url=self.url)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def crash(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def workdir(request):
    d = tempfile.mkdtemp(prefix="firkin-sdk-")
    yield d
    # Kept when something failed: the servers' logs are in it.
    if request.session.testsfailed:
        print(f"\nfirkin serve logs and state: {d}")
    else:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def server(workdir):
    s = Serve(os.path.join(workdir, "state"), "e2b_" + secrets.token_hex(20))
    # The SDK reads these for everything that does not pass options explicitly.
    os.environ["E2B_API_URL"] = s.url
    os.environ["E2B_SANDBOX_URL"] = s.url
    os.environ["E2B_API_KEY"] = s.key
    yield s
    s.stop()
    # A clean stop stops every VM.
    wait_for_sandbox_processes(s.state_dir, 0, timeout=20)


@pytest.fixture
def sbx(server):
    s = Sandbox.create(timeout=300, metadata={"suite": "serve"})
    yield s
    s.kill()


def uniq(prefix: str) -> str:
    return f"/tmp/{prefix}-{secrets.token_hex(6)}"


# ---------------------------------------------------------------- create, info, list


def test_create_with_metadata_envs_timeout(server):
    tag = secrets.token_hex(4)
    s = Sandbox.create(timeout=120, metadata={"tag": tag, "who": "a b&c"}, envs={"GREETING": "hi there"})
    try:
        info = s.get_info()
        assert info.sandbox_id == s.sandbox_id
        assert info.metadata == {"tag": tag, "who": "a b&c"}
        assert info.state == SandboxState.RUNNING
        assert abs((info.end_at - info.started_at).total_seconds() - 120) <= 2
        assert s.commands.run('echo "$GREETING"').stdout == "hi there\n"
        assert s.is_running()
        m = s.get_metrics()
        assert m and m[0].mem_total > 0
    finally:
        assert s.kill() is True


def test_list_with_metadata_filter(server):
    tag = secrets.token_hex(4)
    mine = [Sandbox.create(timeout=120, metadata={"tag": tag, "n": str(i)}) for i in range(2)]
    other = Sandbox.create(timeout=120, metadata={"tag": "other"})
    try:
        found = Sandbox.list(query=SandboxQuery(metadata={"tag": tag})).next_items()
        assert sorted(x.sandbox_id for x in found) == sorted(s.sandbox_id for s in mine)
        assert all(x.state == SandboxState.RUNNING for x in found)
        page = Sandbox.list(query=SandboxQuery(metadata={"tag": tag}), limit=1)
        first = page.next_items()
        assert len(first) == 1 and page.has_next
        second = page.next_items()
        assert len(second) == 1 and first[0].sandbox_id != second[0].sandbox_id
    finally:
        for s in mine + [other]:
            s.kill()


def test_set_timeout_moves_the_end(sbx):
    before = sbx.get_info().end_at
    sbx.set_timeout(3000)
    after = sbx.get_info().end_at
    assert (after - before).total_seconds() > 2000


def wait_until_gone(sid: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while sid in [x.sandbox_id for x in Sandbox.list().next_items()]:
        assert time.monotonic() < deadline, f"sandbox {sid} outlived its timeout"
        time.sleep(0.5)


def test_set_timeout_zero_expires_now(server):
    # E2B accepts 0: the sandbox's time is up now (E2B's own lifecycle tests use it).
    s = Sandbox.create(timeout=300)
    s.set_timeout(0)
    wait_until_gone(s.sandbox_id)
    assert not s.is_running()
    assert Sandbox.kill(s.sandbox_id) is False
    assert_every_process_has_a_record(server)


def test_set_timeout_zero_pauses_an_auto_pause_sandbox(server):
    s = Sandbox.create(timeout=300, lifecycle={"on_timeout": "pause"})
    sid = s.sandbox_id
    try:
        s.files.write("/tmp/expired.txt", "kept")
        s.set_timeout(0)
        deadline = time.monotonic() + 60
        while Sandbox.get_info(sid).state != SandboxState.PAUSED:
            assert time.monotonic() < deadline, "set_timeout(0) did not pause the sandbox"
            time.sleep(0.5)
        back = Sandbox.connect(sid)
        assert back.files.read("/tmp/expired.txt") == "kept"
    finally:
        Sandbox.kill(sid)


def test_set_timeout_zero_expires_now_async(server):
    async def main():
        s = await AsyncSandbox.create(timeout=300)
        await s.set_timeout(0)
        deadline = time.monotonic() + 30
        while await s.is_running():
            assert time.monotonic() < deadline, "set_timeout(0) left the sandbox running"
            await asyncio.sleep(0.5)
        assert await AsyncSandbox.kill(s.sandbox_id) is False

    asyncio.run(main())


def test_a_sandbox_that_times_out_is_gone(server):
    s = Sandbox.create(timeout=3)
    sid = s.sandbox_id
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if sid not in [x.sandbox_id for x in Sandbox.list().next_items()]:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the sandbox outlived its timeout")
    assert not s.is_running()
    assert Sandbox.kill(sid) is False
    with pytest.raises(NotFoundException):
        Sandbox.get_info(sid)
    # Its VM is gone too, not just its record.
    assert_every_process_has_a_record(server)


def test_kill_then_404(server):
    s = Sandbox.create(timeout=60)
    assert s.kill() is True
    assert Sandbox.kill(s.sandbox_id) is False
    with pytest.raises(NotFoundException):
        Sandbox.get_info(s.sandbox_id)
    with pytest.raises(Exception):
        Sandbox.connect(s.sandbox_id)
    assert not s.is_running()
    assert_every_process_has_a_record(server)


def test_wrong_api_key_is_an_authentication_error(server):
    with pytest.raises(AuthenticationException):
        Sandbox.create(**server.opts(key="e2b_" + "0" * 40))
    with pytest.raises(AuthenticationException):
        Sandbox.list(**server.opts(key="nope")).next_items()


def test_ten_concurrent_creates_all_succeed(server):
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        sandboxes = list(pool.map(lambda _: Sandbox.create(timeout=120), range(10)))
    try:
        assert len({s.sandbox_id for s in sandboxes}) == 10
        outs = list(
            concurrent.futures.ThreadPoolExecutor(10).map(
                lambda s: s.commands.run(f"echo {s.sandbox_id}").stdout, sandboxes
            )
        )
        assert outs == [f"{s.sandbox_id}\n" for s in sandboxes]
        if BACKEND == "qemu":
            # Ten sandboxes, ten separate VMs (each named after its sandbox by /init).
            hosts = [s.commands.run("hostname").stdout.strip() for s in sandboxes]
            assert hosts == [s.sandbox_id for s in sandboxes]
            # The name resolves (sudo needs it) and a warm-pool name did not linger.
            for s in sandboxes:
                r = s.commands.run("getent hosts $(hostname); grep -c firkin-warm /etc/hosts || true")
                assert r.stdout == f"127.0.1.1       {s.sandbox_id}\n0\n", r.stdout
            # Each clone has its own MAC address, and traffic still reaches it after the change.
            macs = [s.commands.run("cat /sys/class/net/eth0/address").stdout for s in sandboxes]
            assert len(set(macs)) == 10, macs
        assert len(sandbox_processes(server.state_dir)) >= 10
    finally:
        for s in sandboxes:
            s.kill()
    assert_every_process_has_a_record(server)


def test_metrics_honour_start_and_end(server):
    before = datetime.now(timezone.utc)
    s = Sandbox.create(timeout=300)
    try:
        # E2B samples every 5 s: wait for a history of at least two samples.
        deadline = time.monotonic() + 60
        while len(history := s.get_metrics()) < 2:
            assert time.monotonic() < deadline, f"no metrics history: {history}"
            time.sleep(1)
        stamps = [m.timestamp for m in history]
        assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps), stamps
        assert all(m.mem_total > 0 and m.cpu_count > 0 for m in history)
        # A range before the sandbox existed has no samples.
        assert s.get_metrics(start=before - timedelta(hours=2), end=before - timedelta(hours=1)) == []
        # A range holding only the first sample returns only that one.
        first = history[0].timestamp
        only = s.get_metrics(start=first, end=first)
        assert [m.timestamp for m in only] == [first], only
        # From the second sample on, the first is left out.
        later = s.get_metrics(start=history[1].timestamp)
        assert later and all(m.timestamp >= history[1].timestamp for m in later), later
        assert first not in [m.timestamp for m in later]
    finally:
        s.kill()


def test_metrics_honour_start_and_end_async(server):
    async def main():
        before = datetime.now(timezone.utc)
        s = await AsyncSandbox.create(timeout=300)
        try:
            assert await s.get_metrics()
            old = await s.get_metrics(start=before - timedelta(days=1), end=before - timedelta(hours=1))
            assert old == []
        finally:
            await s.kill()

    asyncio.run(main())


def test_signed_urls_work_without_headers(server, sbx):
    # E2B_SANDBOX_URL points at firkin, so the SDK's signed URLs carry no sandbox id at all:
    # the signature alone must find the sandbox (a browser or curl sends nothing else).
    path = uniq("signed") + ".txt"
    sbx.files.write(path, "downloaded")
    url = sbx.download_url(path)
    assert url.startswith(server.url + "/files?") and "signature=" in url
    r = httpx.get(url, timeout=60)
    assert (r.status_code, r.text) == (200, "downloaded"), (r.status_code, r.text)
    r = httpx.get(sbx.download_url(path, user="root", use_signature_expiration=60), timeout=60)
    assert (r.status_code, r.text) == (200, "downloaded"), (r.status_code, r.text)

    up = uniq("uploaded") + ".txt"
    r = httpx.post(sbx.upload_url(up), files={"file": ("x", b"uploaded")}, timeout=60)
    assert r.status_code == 200, (r.status_code, r.text)
    assert sbx.files.read(up) == "uploaded"

    # A signature no sandbox made: E2B's JSON error, not a route miss.
    bad = url.replace("signature=v1_", "signature=v1_x")
    r = httpx.get(bad, timeout=60)
    assert r.status_code == 401 and r.json()["code"] == 401 and r.json()["message"], r.text
    # A signed read URL does not authorise a write.
    r = httpx.post(url, files={"file": ("x", b"nope")}, timeout=60)
    assert r.status_code == 401, (r.status_code, r.text)
    assert sbx.files.read(path) == "downloaded"


def test_signed_urls_work_without_headers_async(server):
    async def main():
        s = await AsyncSandbox.create(timeout=120)
        try:
            path = uniq("signed-async") + ".txt"
            await s.files.write(path, "async")
            async with httpx.AsyncClient(timeout=60) as c:
                r = await c.get(s.download_url(path))
                assert (r.status_code, r.text) == (200, "async"), (r.status_code, r.text)
                up = uniq("uploaded-async") + ".txt"
                r = await c.post(s.upload_url(up), files={"file": ("x", b"up")})
                assert r.status_code == 200, (r.status_code, r.text)
            assert await s.files.read(up) == "up"
        finally:
            await s.kill()

    asyncio.run(main())


# ---------------------------------------------------------------- commands through the proxy


def test_run_env_cwd_exit_code(sbx):
    r = sbx.commands.run("echo out; echo err >&2")
    assert (r.stdout, r.stderr, r.exit_code) == ("out\n", "err\n", 0)
    assert sbx.commands.run("echo $A-$B", envs={"A": "1", "B": "2"}).stdout == "1-2\n"
    assert sbx.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    with pytest.raises(CommandExitException) as e:
        sbx.commands.run("echo partial; exit 3")
    assert e.value.exit_code == 3 and e.value.stdout == "partial\n"


def test_run_as_users(sbx):
    assert sbx.commands.run("id -un", user="root").stdout == "root\n"
    # The process backend's default workdir lives in the (private) state directory.
    assert sbx.commands.run("id -un", user="user", cwd="/tmp").stdout == "user\n"
    if BACKEND == "qemu":
        assert sbx.commands.run("pwd", user="user").stdout == "/home/user\n"


@pytest.mark.skipif(BACKEND != "qemu", reason="the `base` template's tools, not the host's")
def test_base_has_the_tools_agents_call_by_name(sbx):
    """E2B's base image has these on `user`'s PATH, and agents call them by name (issue 18)."""

    def run(cmd: str) -> str:
        return sbx.commands.run(cmd, user="user", cwd="/tmp").stdout

    assert run("python -c 'import sys; print(sys.version_info[0] * 14)'") == "42\n"
    assert run("pip --version").startswith("pip ")
    assert run("node -e 'console.log(6 * 7)'") == "42\n"
    assert run("npm --version").strip().split(".")[0].isdigit()
    assert run("git --version").startswith("git version ")
    assert run("wget --version").startswith("GNU Wget")
    assert "unzip" in run("command -v unzip")
    # Debian's Python is "externally managed" (PEP 668); E2B's base lets `pip install x` work.
    # Offline, a package that does not exist must fail for that reason, not for the policy.
    with pytest.raises(CommandExitException) as e:
        run("pip install --no-index firkin-no-such-package")
    assert "externally-managed-environment" not in e.value.stderr, e.value.stderr
    assert "No matching distribution" in e.value.stderr, e.value.stderr
    # And an install as `user` goes through (offline: a local package, into ~/.local).
    pkg = uniq("pkg")
    sbx.files.write(f"{pkg}/setup.py", "from setuptools import setup\nsetup(name='firkinpkg', version='1.0', py_modules=['firkinmod'])\n")
    sbx.files.write(f"{pkg}/firkinmod.py", "X = 42\n")
    run(f"pip install --no-index --no-build-isolation {pkg}")
    assert run("python -c 'import firkinmod; print(firkinmod.X)'") == "42\n"
    assert "/home/user/.local/" in run("python -c 'import firkinmod; print(firkinmod.__file__)'")


def test_background_and_connect(sbx):
    h = sbx.commands.run("echo early; sleep 1; echo late", background=True)
    assert h.pid in [p.pid for p in sbx.commands.list()]
    h.disconnect()
    r = sbx.commands.connect(h.pid).wait()
    assert r.stdout == "early\nlate\n"


def test_stdin_and_kill(sbx):
    h = sbx.commands.run("cat", background=True, stdin=True, timeout=0)
    sbx.commands.send_stdin(h.pid, "hello\n")
    got, seen = [], threading.Event()

    def reader():
        try:
            h.wait(on_stdout=lambda s: (got.append(s), seen.set()))
        except CommandExitException:
            pass

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    assert seen.wait(20)
    assert "".join(got) == "hello\n"
    assert sbx.commands.kill(h.pid) is True
    t.join(20)
    assert not t.is_alive()
    assert h.pid not in [p.pid for p in sbx.commands.list()]


def test_pty(sbx):
    h = sbx.pty.create(PtySize(rows=24, cols=80), timeout=0)
    out, lock = bytearray(), threading.Lock()

    def reader():
        try:
            h.wait(on_pty=lambda d: (lock.acquire(), out.extend(d), lock.release()))
        except CommandExitException:
            pass

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    sbx.pty.send_stdin(h.pid, b"echo $((6*7))x\n")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with lock:
            if b"42x" in out:
                break
        time.sleep(0.05)
    with lock:
        assert b"42x" in out, bytes(out)
    assert sbx.pty.kill(h.pid) is True
    t.join(20)
    assert not t.is_alive()
    assert h.pid not in [p.pid for p in sbx.commands.list()]


# ---------------------------------------------------------------- files through the proxy


def test_files_text_bytes_and_50_mib(sbx):
    d = uniq("files")
    sbx.files.write(f"{d}/a.txt", "hello")
    assert sbx.files.read(f"{d}/a.txt") == "hello"
    data = bytes(range(256)) * 4
    sbx.files.write(f"{d}/b.bin", data)
    assert bytes(sbx.files.read(f"{d}/b.bin", format="bytes")) == data
    big = os.urandom(50 * 1024 * 1024)
    sbx.files.write(f"{d}/big.bin", big)
    assert sbx.files.get_info(f"{d}/big.bin").size == len(big)
    assert bytes(sbx.files.read(f"{d}/big.bin", format="bytes")) == big
    sbx.files.remove(d)


def test_files_list_exists_rename_remove(sbx):
    d = uniq("ops")
    sbx.files.write(f"{d}/f.txt", "12345")
    sbx.files.make_dir(f"{d}/sub")
    entries = {e.name: e for e in sbx.files.list(d)}
    assert set(entries) == {"f.txt", "sub"}
    assert entries["f.txt"].type == FileType.FILE and entries["sub"].type == FileType.DIR
    assert sbx.files.exists(f"{d}/f.txt") and not sbx.files.exists(f"{d}/nope")
    moved = sbx.files.rename(f"{d}/f.txt", f"{d}/g.txt")
    assert moved.path == f"{d}/g.txt"
    assert sbx.files.read(f"{d}/g.txt") == "12345"
    sbx.files.remove(d)
    assert not sbx.files.exists(d)


def test_watch_dir(sbx):
    d = uniq("watch")
    sbx.files.make_dir(d)
    handle = sbx.files.watch_dir(d)
    sbx.files.write(f"{d}/w.txt", "1")
    events = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        events += handle.get_new_events()
        if any(e.name == "w.txt" and e.type == FilesystemEventType.CREATE for e in events):
            break
        time.sleep(0.1)
    assert any(e.name == "w.txt" and e.type == FilesystemEventType.CREATE for e in events), events
    handle.stop()
    sbx.files.remove(d)


# ---------------------------------------------------------------- pause / resume


def test_pause_list_connect_resumes_with_files_intact(server):
    s = Sandbox.create(timeout=300, metadata={"case": "pause"})
    sid = s.sandbox_id
    try:
        s.files.write("/tmp/paused.txt", "survives")
        s.files.write("pause-home.txt", "home too")
        if BACKEND == "qemu":
            # A VM's pause keeps its memory: a running process and a tmpfs file survive it.
            sleeper = s.commands.run("sleep 600", background=True)
            s.commands.run("echo in-ram > /dev/shm/pause-marker")
        assert s.pause() is True
        assert Sandbox.pause(sid) is False  # already paused (409)
        paused = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()
        assert sid in [x.sandbox_id for x in paused]
        assert Sandbox.get_info(sid).state == SandboxState.PAUSED
        # Paused is not running: its VM is gone, only the snapshot remains.
        assert_every_process_has_a_record(server)
        r = Sandbox.connect(sid)
        assert r.sandbox_id == sid
        assert r.files.read("/tmp/paused.txt") == "survives"
        assert r.files.read("pause-home.txt") == "home too"
        assert r.commands.run("echo alive").stdout == "alive\n"
        if BACKEND == "qemu":
            assert sleeper.pid in [p.pid for p in r.commands.list()]
            assert r.commands.run("cat /dev/shm/pause-marker").stdout == "in-ram\n"
        assert Sandbox.get_info(sid).state == SandboxState.RUNNING
        assert_every_process_has_a_record(server)
    finally:
        Sandbox.kill(sid)


# ---------------------------------------------------------------- any guest port


def serve_http(sbx, port: int) -> str:
    """Starts `python3 -m http.server` on `port` in the sandbox; returns a file name its
    directory listing shows. The server is stopped with the sandbox (on the process backend
    it is a host process: `stop_http` it)."""
    marker = f"firkin-port-{secrets.token_hex(4)}.txt"
    www = uniq("www")
    sbx.commands.run(f"mkdir -p {www} && echo hi > {www}/{marker}")
    sbx.commands.run(f"cd {www} && exec python3 -m http.server {port}", background=True, timeout=0)
    # Listening (checked from inside: the proxy must not be what waits).
    sbx.commands.run(
        f"for i in $(seq 300); do (echo > /dev/tcp/127.0.0.1/{port}) 2>/dev/null && exit 0; "
        "sleep 0.1; done; exit 1",
        timeout=60,
    )
    return marker


def stop_http(sbx, port: int) -> None:
    # The bracket keeps pkill from matching the shell that runs it.
    sbx.commands.run(f"pkill -f 'http[.]server {port}' || true")


def port_headers(sbx, port: int, **extra) -> dict:
    return {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": str(port), **extra}


def test_any_guest_port_by_header_host_and_get_host(server, sbx):
    marker = serve_http(sbx, 8000)
    r = httpx.get(server.url + "/", headers=port_headers(sbx, 8000), timeout=60)
    assert r.status_code == 200 and marker in r.text, (r.status_code, r.text[:300])

    host = sbx.get_host(8000)
    assert host.startswith(f"8000-{sbx.sandbox_id}."), host
    r = httpx.get(server.url + "/", headers={"Host": host}, timeout=60)
    assert r.status_code == 200 and marker in r.text, (r.status_code, r.text[:300])

    # Several first requests for one port at once: one forward, every request answered. Four,
    # within http.server's listen backlog of 5: SYNs beyond it are dropped by the guest, and
    # slirp retries them with a backoff that outlasts the timeout under TCG.
    marker2 = serve_http(sbx, 8001)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        rs = list(pool.map(
            lambda _: httpx.get(server.url + "/", headers=port_headers(sbx, 8001), timeout=60),
            range(4),
        ))
    assert all(r.status_code == 200 and marker2 in r.text for r in rs), [r.status_code for r in rs]

    # Nothing listens: E2B's 502, quickly.
    started = time.monotonic()
    r = httpx.get(server.url + "/", headers=port_headers(sbx, 8999), timeout=60)
    assert r.status_code == 502, (r.status_code, r.text)
    body = r.json()
    assert body["code"] == 502 and "port is not open" in body["message"], body
    assert body["sandboxId"] == sbx.sandbox_id and body["port"] == 8999, body
    assert time.monotonic() - started < 10
    # The SDK's own check of a port agrees.
    assert sbx.commands.run("echo still-fine").stdout == "still-fine\n"

    if BACKEND == "qemu":
        # A resumed sandbox is a new QEMU: its forwards come back on demand, and the server
        # (kept in RAM across the pause) answers again.
        assert sbx.pause() is True
        r = httpx.get(server.url + "/", headers=port_headers(sbx, 8000), timeout=120)
        assert r.status_code == 502, (r.status_code, r.text)  # paused, not auto-resumed
        Sandbox.connect(sbx.sandbox_id)
        r = httpx.get(server.url + "/", headers=port_headers(sbx, 8000), timeout=60)
        assert r.status_code == 200 and marker in r.text, (r.status_code, r.text[:300])
    stop_http(sbx, 8000)
    stop_http(sbx, 8001)


@pytest.mark.skipif(BACKEND != "qemu", reason="the process backend's ports are host ports")
def test_any_guest_port_is_reachable_in_a_network_slot(sbx):
    # In its own network every port of a sandbox is reachable; nothing is forwarded, so there
    # is no bound (user-mode networking has one: 64 forwards, a socket each in QEMU).
    if NETWORK != "tap":
        pytest.skip("per-sandbox networks only (FIRKIN_TEST_NETWORK=tap)")
    with httpx.Client(timeout=60) as c:
        for port in [*range(9000, 9070), 40000, 65535]:
            r = c.get(sbx_url(sbx), headers=port_headers(sbx, port))
            assert r.status_code == 502 and "port is not open" in r.json()["message"], r.text
    marker = serve_http(sbx, 9069)
    r = httpx.get(sbx_url(sbx), headers=port_headers(sbx, 9069), timeout=60)
    assert r.status_code == 200 and marker in r.text, (r.status_code, r.text[:300])
    stop_http(sbx, 9069)


def test_forwards_per_sandbox_are_bounded(sbx):
    # Each forward is a listening socket in the sandbox's QEMU: 64 of them, then a clear error.
    if NETWORK != "user":
        pytest.skip("user-mode networking only (FIRKIN_TEST_NETWORK=user)")
    with httpx.Client(timeout=60) as c:
        for port in range(9000, 9064):
            r = c.get(sbx_url(sbx), headers=port_headers(sbx, port))
            assert r.status_code == 502 and "port is not open" in r.json()["message"], r.text
        r = c.get(sbx_url(sbx), headers=port_headers(sbx, 9064))
    assert r.status_code == 502 and "already forwards 64 ports" in r.json()["message"], r.text
    # Ports forwarded already keep working.
    marker = serve_http(sbx, 9001)
    r = httpx.get(sbx_url(sbx), headers=port_headers(sbx, 9001), timeout=60)
    assert r.status_code == 200 and marker in r.text, (r.status_code, r.text[:300])
    stop_http(sbx, 9001)


def sbx_url(sbx) -> str:
    return os.environ["E2B_SANDBOX_URL"] + "/"


def test_private_traffic_needs_the_traffic_token(server):
    s = Sandbox.create(timeout=300, network={"allow_public_traffic": False})
    try:
        token = s.traffic_access_token
        assert isinstance(token, str) and len(token) >= 20, token
        marker = serve_http(s, 8000)
        r = httpx.get(server.url + "/", headers=port_headers(s, 8000), timeout=60)
        assert r.status_code == 403, (r.status_code, r.text)
        assert r.json()["code"] == 403 and r.json()["message"], r.text
        r = httpx.get(server.url + "/", headers=port_headers(s, 8000, **{"e2b-traffic-access-token": "x" + token}), timeout=60)
        assert r.status_code == 403, (r.status_code, r.text)
        r = httpx.get(server.url + "/", headers={"Host": s.get_host(8000)}, timeout=60)
        assert r.status_code == 403, (r.status_code, r.text)
        r = httpx.get(server.url + "/", headers=port_headers(s, 8000, **{"e2b-traffic-access-token": token}), timeout=60)
        assert r.status_code == 200 and marker in r.text, (r.status_code, r.text[:300])
        # envd keeps its own token rule: the SDK needs no traffic token.
        assert s.commands.run("echo envd").stdout == "envd\n"
        # Connect returns the same token, as E2B does.
        assert Sandbox.connect(s.sandbox_id).traffic_access_token == token
        stop_http(s, 8000)
    finally:
        s.kill()


# ---------------------------------------------------------------- bad input


def test_bad_input_gets_4xx_json_and_the_server_stays_up(server, sbx):
    h = {"X-API-KEY": server.key}
    c = httpx.Client(base_url=server.url, timeout=60)

    def err(r, status):
        assert r.status_code == status, (r.status_code, r.text)
        body = r.json()
        assert body["code"] == status and body["message"]

    err(c.post("/v2/sandboxes", headers=h, content=b"{not json"), 400)
    err(c.post("/v2/sandboxes", headers=h, json={"templateID": "no-such-template"}), 404)
    err(c.post("/v2/sandboxes", headers=h, json={"templateID": "base", "timeout": -1}), 400)
    err(c.post("/v2/sandboxes", headers=h, content=b"x" * (2 * 1024 * 1024)), 413)
    err(c.get("/sandboxes/..%2F..%2Fetc%2Fpasswd", headers=h), 404)
    err(c.get("/v2/sandboxes"), 401)
    # /files path traversal: the agent resolves the path as the sandbox user and refuses what
    # that user may not read.
    sh = {
        "E2b-Sandbox-Id": sbx.sandbox_id,
        "E2b-Sandbox-Port": "49983",
        "X-Access-Token": sbx._envd_access_token,
    }
    r = c.get("/files", params={"path": "../../../../../etc/shadow", "username": "user"}, headers=sh)
    assert 400 <= r.status_code < 500 and r.json()["message"], (r.status_code, r.text)
    # A dot-dot URL path on the sandbox plane reaches the agent, never the control plane.
    r = c.get("/../../v2/sandboxes", headers={**sh, **h})
    assert not (r.status_code == 200 and isinstance(r.json(), list))
    # Unknown sandbox on the sandbox plane: the SDK's "not found" shape.
    r = c.get("/health", headers={"E2b-Sandbox-Id": "nosuchsandbox", "E2b-Sandbox-Port": "49983"})
    assert r.status_code == 502 and "was not found" in r.json()["message"]
    # Still up and serving.
    assert sbx.commands.run("echo up").stdout == "up\n"
    assert c.get("/health").status_code == 200


# ---------------------------------------------------------------- crash


def test_kill_9_with_three_running_then_restart(workdir):
    state = os.path.join(workdir, "crash-state")
    s = Serve(state, "e2b_" + secrets.token_hex(20))
    try:
        sandboxes = [Sandbox.create(timeout=600, **s.opts()) for _ in range(3)]
        for x in sandboxes:
            assert x.commands.run("echo up").stdout == "up\n"
        paused = Sandbox.create(timeout=600, **s.opts())
        paused.files.write("/tmp/crash-paused.txt", "kept")
        assert paused.pause() is True
        # Three running sandboxes and the warm pool are live VMs; the paused one is not.
        wait_for_sandbox_processes(state, 3 + WARM)
        s.crash()
        # The VMs die with the server (PDEATHSIG): nothing runs without a server that knows it.
        assert_nothing_outlives(state)

        s.start()
        # Nothing runs that the new server did not start itself (its warm pool).
        wait_for_sandbox_processes(state, WARM)
        listed = {x.sandbox_id: x.state for x in Sandbox.list(**s.opts()).next_items()}
        # Running ones could not be re-adopted: cleaned up, not listed. The paused one stays.
        assert listed == {paused.sandbox_id: SandboxState.PAUSED}, listed
        for x in sandboxes:
            assert Sandbox.kill(x.sandbox_id, **s.opts()) is False
        back = Sandbox.connect(paused.sandbox_id, **s.opts())
        assert back.files.read("/tmp/crash-paused.txt") == "kept"
        fresh = Sandbox.create(timeout=60, **s.opts())
        assert fresh.commands.run("echo fresh").stdout == "fresh\n"
        listed = {x.sandbox_id: x.state for x in Sandbox.list(**s.opts()).next_items()}
        assert listed == {
            paused.sandbox_id: SandboxState.RUNNING,
            fresh.sandbox_id: SandboxState.RUNNING,
        }, listed
        # Every VM process has a record, and every record its VM.
        assert_every_process_has_a_record(s)
    finally:
        s.stop()
    assert_nothing_outlives(state)
