"""Drives a host-mode firkin-envd through the official e2b SDK's own Sandbox objects.

The Sandbox is built without a control plane (see the SDK's SandboxOpts): the envd URL is given
as `sandbox_url`, and the access token the fixture set through /init as `envd_access_token`.
Start envd with FIRKIN_ENVD_BIN (default target/debug/firkin-envd); tests/sdk/run-envd.sh does
all of it.
"""

import asyncio
import gzip
import io
import os
import pwd
import secrets
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from packaging.version import Version

from e2b import (
    AsyncSandbox,
    AuthenticationException,
    CommandExitException,
    ConnectionConfig,
    FileNotFoundException,
    FileType,
    FilesystemEventType,
    InvalidArgumentException,
    NotFoundException,
    Sandbox,
    SandboxException,
    TimeoutException,
)
from e2b.sandbox.commands.command_handle import PtySize

REPO = Path(__file__).resolve().parents[2]
ENVD_BIN = os.environ.get("FIRKIN_ENVD_BIN", str(REPO / "target" / "debug" / "firkin-envd"))
IS_ROOT = os.geteuid() == 0


def ensure_user() -> None:
    """CI runs as root on a throwaway machine: create the unprivileged `user` if missing."""
    try:
        pwd.getpwnam("user")
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", "user"], check=True)


class Envd:
    def __init__(self, token: str):
        self.token = token
        self.proc = subprocess.Popen(
            [ENVD_BIN, "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            stderr=open(os.environ.get("FIRKIN_ENVD_TEST_LOG", os.devnull), "a"),
            text=True,
        )
        line = self.proc.stdout.readline().strip()
        assert line.startswith("listening on "), f"unexpected envd output {line!r}"
        self.url = line.split()[-1]
        r = httpx.post(
            f"{self.url}/init",
            json={"accessToken": token, "envVars": {"SANDBOX_VAR": "from-init"}},
        )
        assert r.status_code == 204, r.text
        assert r.headers["x-envd-version"] == "0.6.4"

    def sandbox(self, token=None, cls=Sandbox):
        token = self.token if token is None else token
        headers = {"E2b-Sandbox-Id": "sbxtest", "E2b-Sandbox-Port": "49983"}
        if token:
            headers["X-Access-Token"] = token
        cfg = ConnectionConfig(
            sandbox_url=self.url, api_key="unused", extra_sandbox_headers=headers
        )
        return cls(
            sandbox_id="sbxtest",
            sandbox_domain=None,
            envd_version=Version("0.6.4"),
            envd_access_token=token or None,
            traffic_access_token=None,
            connection_config=cfg,
        )

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def envd():
    if IS_ROOT:
        ensure_user()
    e = Envd(secrets.token_hex(16))
    yield e
    e.stop()


@pytest.fixture
def sbx(envd):
    return envd.sandbox()


@pytest.fixture
def tmp(sbx):
    path = f"/tmp/firkin-sdk-{secrets.token_hex(6)}"
    sbx.files.make_dir(path)
    yield path
    sbx.files.remove(path)


# ---------------------------------------------------------------- commands


def test_run_collects_stdout_stderr_and_exit_code(sbx):
    r = sbx.commands.run("echo out; echo err >&2; printf 'x%.0s' $(seq 1 3)")
    assert r.stdout == "out\nxxx"
    assert r.stderr == "err\n"
    assert r.exit_code == 0


def test_run_nonzero_raises_command_exit_exception(sbx):
    with pytest.raises(CommandExitException) as e:
        sbx.commands.run("echo partial; echo bad >&2; exit 3")
    assert e.value.exit_code == 3
    assert e.value.stdout == "partial\n"
    assert e.value.stderr == "bad\n"


def test_run_env_vars_sandbox_and_request(sbx):
    r = sbx.commands.run("echo $SANDBOX_VAR $MINE", envs={"MINE": "per-call"})
    assert r.stdout == "from-init per-call\n"
    # Request envs win over sandbox ones.
    r = sbx.commands.run("echo $SANDBOX_VAR", envs={"SANDBOX_VAR": "override"})
    assert r.stdout == "override\n"
    r = sbx.commands.run("echo $PATH")
    assert "/usr/bin" in r.stdout


def test_run_cwd(sbx, tmp):
    assert sbx.commands.run("pwd", cwd=tmp).stdout == f"{tmp}\n"
    home = pwd.getpwuid(os.geteuid()).pw_dir
    assert sbx.commands.run("pwd").stdout == f"{home}\n"


@pytest.mark.skipif(not IS_ROOT, reason="switching users needs root")
def test_run_as_user(sbx):
    r = sbx.commands.run('echo "$(id -un) $HOME $USER"', user="user")
    assert r.stdout == "user /home/user user\n"
    assert sbx.commands.run("id -un", user="root").stdout == "root\n"
    # The user's default cwd is its own home.
    assert sbx.commands.run("pwd", user="user").stdout == "/home/user\n"


def test_unknown_user_is_rejected(sbx):
    with pytest.raises(AuthenticationException):
        sbx.commands.run("true", user="no-such-user-firkin")


def test_background_connect_send_stdin_kill(sbx):
    h = sbx.commands.run("cat", background=True, stdin=True, timeout=0)
    assert h.pid in [p.pid for p in sbx.commands.list()]
    sbx.commands.send_stdin(h.pid, "hello\n")
    h.disconnect()
    c = sbx.commands.connect(h.pid, timeout=0)
    got = []
    seen = threading.Event()

    def reader():
        try:
            c.wait(on_stdout=lambda s: (got.append(s), seen.set()))
        except CommandExitException:
            pass

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    # The output written before connect is replayed to the new stream.
    assert seen.wait(10)
    assert "".join(got) == "hello\n"
    assert sbx.commands.kill(h.pid) is True
    t.join(10)
    assert not t.is_alive()
    assert sbx.commands.kill(h.pid) is False
    assert h.pid not in [p.pid for p in sbx.commands.list()]


def test_connect_sees_output_of_finished_background_process(sbx):
    h = sbx.commands.run("echo early; sleep 0.5; echo late", background=True)
    h.disconnect()
    time.sleep(1.0)
    r = sbx.commands.connect(h.pid).wait()
    assert r.stdout == "early\nlate\n"
    assert r.exit_code == 0


def test_stdin_close_ends_input(sbx):
    h = sbx.commands.run("wc -c", background=True, stdin=True)
    sbx.commands.send_stdin(h.pid, "abcd")
    sbx.commands.close_stdin(h.pid)
    assert h.wait().stdout.strip() == "4"


def test_kill_unknown_pid_returns_false(sbx):
    assert sbx.commands.kill(4_000_000) is False
    with pytest.raises(NotFoundException):
        sbx.commands.send_stdin(4_000_000, "x")


def test_timeout_kills_process(sbx):
    started = time.monotonic()
    with pytest.raises(Exception):
        sbx.commands.run("sleep 30", timeout=1)
    assert time.monotonic() - started < 10
    time.sleep(0.5)
    assert all("sleep 30" not in " ".join(p.args) for p in sbx.commands.list())


# ---------------------------------------------------------------- pty


def test_pty_create_send_resize_kill(sbx):
    h = sbx.pty.create(PtySize(rows=24, cols=80), timeout=0)
    out = bytearray()
    lock = threading.Lock()

    def reader():
        try:
            h.wait(on_pty=lambda data: (lock.acquire(), out.extend(data), lock.release()))
        except CommandExitException:
            pass

    t = threading.Thread(target=reader, daemon=True)
    t.start()

    def wait_for(needle: bytes, timeout=10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with lock:
                if needle in out:
                    return True
            time.sleep(0.05)
        with lock:
            raise AssertionError(f"{needle!r} not in terminal output {bytes(out)!r}")

    sbx.pty.send_stdin(h.pid, b"echo $((6*7))x\n")
    wait_for(b"42x")
    sbx.pty.resize(h.pid, PtySize(rows=33, cols=101))
    sbx.pty.send_stdin(h.pid, b"stty size\n")
    wait_for(b"33 101")
    assert sbx.pty.kill(h.pid) is True
    t.join(10)
    assert not t.is_alive()


# ---------------------------------------------------------------- files


def test_write_and_read_text(sbx, tmp):
    info = sbx.files.write(f"{tmp}/deep/er/a.txt", "hello world")
    assert info.path == f"{tmp}/deep/er/a.txt"
    assert info.name == "a.txt"
    assert sbx.files.read(f"{tmp}/deep/er/a.txt") == "hello world"


def test_write_metadata_is_stored_as_xattrs(sbx, tmp):
    info = sbx.files.write(f"{tmp}/meta.txt", "m", metadata={"Team": "infra", "run-id": "42"})
    assert info.metadata == {"team": "infra", "run-id": "42"}
    assert sbx.files.get_info(f"{tmp}/meta.txt").metadata == {"team": "infra", "run-id": "42"}
    assert sbx.files.get_info(f"{tmp}/meta.txt").metadata == {
        e.name: e for e in sbx.files.list(tmp)
    }["meta.txt"].metadata


def test_write_and_read_bytes(sbx, tmp):
    data = bytes(range(256)) * 3
    sbx.files.write(f"{tmp}/b.bin", data)
    assert bytes(sbx.files.read(f"{tmp}/b.bin", format="bytes")) == data


def test_write_and_read_50_mib(sbx, tmp):
    data = os.urandom(50 * 1024 * 1024)
    sbx.files.write(f"{tmp}/big.bin", data)
    assert sbx.files.get_info(f"{tmp}/big.bin").size == len(data)
    got = sbx.files.read(f"{tmp}/big.bin", format="bytes")
    assert bytes(got) == data
    # Streamed both ways: a file-like upload goes as a chunked octet-stream body.
    sbx.files.write(f"{tmp}/big2.bin", io.BytesIO(data))
    chunks = sbx.files.read(f"{tmp}/big2.bin", format="stream")
    assert b"".join(chunks) == data


def test_gzip_and_octet_stream_uploads(sbx, tmp):
    sbx.files.write(f"{tmp}/g.txt", "zipped " * 1000, gzip=True)
    assert sbx.files.read(f"{tmp}/g.txt") == "zipped " * 1000
    sbx.files.write(f"{tmp}/o.txt", "raw body", use_octet_stream=True)
    assert sbx.files.read(f"{tmp}/o.txt") == "raw body"


def test_write_files_multipart_full_paths(sbx, tmp):
    infos = sbx.files.write_files(
        [
            {"path": f"{tmp}/m/one.txt", "data": "1"},
            {"path": f"{tmp}/m/sub/two.txt", "data": b"2"},
        ]
    )
    assert sorted(i.path for i in infos) == [f"{tmp}/m/one.txt", f"{tmp}/m/sub/two.txt"]
    assert sbx.files.read(f"{tmp}/m/sub/two.txt") == "2"


def test_read_missing_raises_file_not_found(sbx, tmp):
    with pytest.raises(FileNotFoundException):
        sbx.files.read(f"{tmp}/missing")
    with pytest.raises(FileNotFoundException):
        sbx.files.get_info(f"{tmp}/missing")


def test_list_exists_get_info(sbx, tmp):
    sbx.files.write(f"{tmp}/f.txt", "12345")
    sbx.files.make_dir(f"{tmp}/d/inner")
    names = {e.name: e for e in sbx.files.list(tmp)}
    assert set(names) == {"f.txt", "d"}
    assert names["f.txt"].type == FileType.FILE
    assert names["d"].type == FileType.DIR
    deep = {e.path for e in sbx.files.list(tmp, depth=2)}
    assert f"{tmp}/d/inner" in deep
    assert sbx.files.exists(f"{tmp}/f.txt") is True
    assert sbx.files.exists(f"{tmp}/nope") is False
    info = sbx.files.get_info(f"{tmp}/f.txt")
    assert info.size == 5
    assert info.type == FileType.FILE
    assert info.permissions.startswith("-rw")
    assert info.owner == pwd.getpwuid(os.geteuid()).pw_name


def test_symlink_info(sbx, tmp):
    sbx.files.write(f"{tmp}/target.txt", "t")
    sbx.commands.run(f"ln -s {tmp}/target.txt {tmp}/link")
    info = sbx.files.get_info(f"{tmp}/link")
    assert info.type == FileType.SYMLINK
    assert info.symlink_target == f"{tmp}/target.txt"


def test_make_dir_rename_remove(sbx, tmp):
    assert sbx.files.make_dir(f"{tmp}/x/y") is True
    assert sbx.files.make_dir(f"{tmp}/x/y") is False
    sbx.files.write(f"{tmp}/x/y/f", "data")
    moved = sbx.files.rename(f"{tmp}/x", f"{tmp}/z")
    assert moved.path == f"{tmp}/z"
    assert sbx.files.read(f"{tmp}/z/y/f") == "data"
    assert sbx.files.exists(f"{tmp}/x") is False
    with pytest.raises(FileNotFoundException):
        sbx.files.rename(f"{tmp}/x", f"{tmp}/w")
    sbx.files.remove(f"{tmp}/z")
    assert sbx.files.exists(f"{tmp}/z") is False
    # Removing what is not there is not an error.
    sbx.files.remove(f"{tmp}/z")


@pytest.mark.skipif(not IS_ROOT, reason="switching users needs root")
def test_files_as_user_owned_by_user_and_permissions_enforced(sbx):
    path = f"/home/user/firkin-{secrets.token_hex(4)}/f.txt"
    sbx.files.write(path, "mine", user="user")
    assert sbx.files.get_info(path).owner == "user"
    assert sbx.files.get_info(os.path.dirname(path)).owner == "user"
    assert sbx.commands.run(f"stat -c %U {path}").stdout == "user\n"
    # `user` may not write into /root; the agent answers and survives.
    with pytest.raises(SandboxException):
        sbx.files.write("/root/firkin-denied.txt", "no", user="user")
    with pytest.raises(SandboxException):
        sbx.files.make_dir("/root/firkin-denied-dir", user="user")
    assert sbx.files.exists("/root/firkin-denied.txt") is False
    sbx.files.remove(os.path.dirname(path))
    assert sbx.is_running()


def test_watch_dir_events(sbx, tmp):
    handle = sbx.files.watch_dir(tmp, recursive=True, include_entry=True)
    sbx.files.write(f"{tmp}/w.txt", "1")
    sbx.files.make_dir(f"{tmp}/sub")
    time.sleep(0.2)
    sbx.files.write(f"{tmp}/sub/s.txt", "2")
    sbx.files.remove(f"{tmp}/w.txt")
    events = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        events += handle.get_new_events()
        kinds = {(e.name, e.type) for e in events}
        if (("w.txt", FilesystemEventType.REMOVE) in kinds
                and ("sub/s.txt", FilesystemEventType.CREATE) in kinds):
            break
        time.sleep(0.1)
    kinds = {(e.name, e.type) for e in events}
    assert ("w.txt", FilesystemEventType.CREATE) in kinds
    assert ("w.txt", FilesystemEventType.WRITE) in kinds
    assert ("sub", FilesystemEventType.CREATE) in kinds
    assert ("sub/s.txt", FilesystemEventType.CREATE) in kinds
    assert ("w.txt", FilesystemEventType.REMOVE) in kinds
    created = [e for e in events if e.name == "sub/s.txt" and e.type == FilesystemEventType.CREATE]
    assert created[0].entry is not None and created[0].entry.path == f"{tmp}/sub/s.txt"
    handle.stop()
    with pytest.raises(SandboxException):
        handle.get_new_events()


def test_async_watch_dir_stream(envd, tmp):
    async def main():
        sbx = envd.sandbox(cls=AsyncSandbox)
        events = []
        got = asyncio.Event()

        def on_event(e):
            events.append(e)
            if e.name == "a.txt":
                got.set()

        handle = await sbx.files.watch_dir(tmp, on_event=on_event)
        await sbx.files.write(f"{tmp}/a.txt", "x")
        await asyncio.wait_for(got.wait(), 10)
        await handle.stop()
        return events

    events = asyncio.run(main())
    assert any(e.name == "a.txt" and e.type == FilesystemEventType.CREATE for e in events)


def test_watch_missing_dir_is_not_found(sbx, tmp):
    with pytest.raises(SandboxException):
        sbx.files.watch_dir(f"{tmp}/missing")


# ---------------------------------------------------------------- auth


def test_missing_or_wrong_token_is_rejected(envd):
    for token in ["", "wrong-token"]:
        bad = envd.sandbox(token=token)
        with pytest.raises(AuthenticationException):
            bad.commands.run("true")
        with pytest.raises(AuthenticationException):
            bad.files.read("/etc/hostname")
        with pytest.raises(AuthenticationException):
            bad.files.list("/")
    # /health stays open.
    assert httpx.get(f"{envd.url}/health").status_code == 204


def test_signed_urls(sbx, tmp):
    sbx.files.write(f"{tmp}/s.txt", "signed")
    url = sbx.download_url(f"{tmp}/s.txt")
    assert "signature=v1_" in url
    # No X-Access-Token: the signature alone authorizes the request.
    assert httpx.get(url).text == "signed"
    assert httpx.get(url.replace("signature=v1_", "signature=v1_x")).status_code == 401
    expired = sbx.download_url(f"{tmp}/s.txt", use_signature_expiration=-10)
    assert httpx.get(expired).status_code == 401
    up = sbx.upload_url(f"{tmp}/up.txt")
    r = httpx.post(up, files={"file": ("up.txt", b"uploaded")})
    assert r.status_code == 200, r.text
    assert sbx.files.read(f"{tmp}/up.txt") == "uploaded"
    # A read signature does not authorize a write.
    r = httpx.post(url, files={"file": ("x", b"x")})
    assert r.status_code == 401


# ---------------------------------------------------------------- parity with E2B's envd (issue 18)


def run_async(envd, fn):
    """Runs `fn(async_sandbox)` to completion and returns its result."""

    async def main():
        return await fn(envd.sandbox(cls=AsyncSandbox))

    return asyncio.run(main())


@pytest.mark.parametrize(
    "path",
    # procfs reports size 0 and sysfs 4096, whatever the content is.
    ["/proc/sys/kernel/random/boot_id", "/sys/devices/system/cpu/online"],
)
def test_read_pseudo_files_returns_their_content(sbx, envd, path):
    want = Path(path).read_text()
    assert want
    assert sbx.files.read(path) == want
    assert run_async(envd, lambda s: s.files.read(path)) == want


def test_overwrite_replaces_metadata(sbx, envd, tmp):
    path = f"{tmp}/meta.txt"
    sbx.files.write(path, "first", metadata={"author": "mish"})
    info = sbx.files.write(path, "second")
    assert info.metadata is None
    assert sbx.files.get_info(path).metadata is None
    # New metadata replaces the old set, it is not merged into it.
    sbx.files.write(path, "third", metadata={"a": "1"})
    sbx.files.write(path, "fourth", metadata={"b": "2"}, use_octet_stream=True)
    assert sbx.files.get_info(path).metadata == {"b": "2"}

    async def overwrite(s):
        await s.files.write(path, "fifth")
        return (await s.files.get_info(path)).metadata

    assert run_async(envd, overwrite) is None


def test_list_depth_is_depth_first(sbx, envd, tmp):
    for d in ["subdir1/subdir1_1", "subdir1/subdir1_2", "subdir2/subdir2_1", "subdir2/subdir2_2"]:
        sbx.files.make_dir(f"{tmp}/{d}")
    sbx.files.write(f"{tmp}/file1.txt", "x")
    want = [
        "file1.txt",
        "subdir1",
        "subdir1/subdir1_1",
        "subdir1/subdir1_2",
        "subdir2",
        "subdir2/subdir2_1",
        "subdir2/subdir2_2",
    ]
    for depth in [2, 3]:
        got = [e.path for e in sbx.files.list(tmp, depth=depth)]
        assert got == [f"{tmp}/{w}" for w in want]
    got = run_async(envd, lambda s: s.files.list(tmp, depth=2))
    assert [e.path for e in got] == [f"{tmp}/{w}" for w in want]


def poll_events(handle, want: int, settle: float = 0.3, timeout: float = 10):
    """Polls a sync watcher until `want` events came and no more arrive for `settle` s."""
    events = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = handle.get_new_events()
        events += new
        if len(events) >= want and not new:
            time.sleep(settle)
            more = handle.get_new_events()
            if not more:
                break
            events += more
        time.sleep(0.05)
    return [(e.name, e.type) for e in events]


def dedup(events):
    """Folds repeated identical events: inotify merges them only while they are unread."""
    out = []
    for e in events:
        if not out or out[-1] != e:
            out.append(e)
    return out


T = FilesystemEventType


def test_watch_events_match_e2b(sbx, tmp):
    """The event sequences E2B's envd (fsnotify) reports, from its SDK's watch tests."""
    sbx.files.make_dir(f"{tmp}/nested")
    handle = sbx.files.watch_dir(tmp, recursive=True)
    # A new file written: created, chowned to the user, written.
    sbx.files.write(f"{tmp}/f.txt", "content")
    assert poll_events(handle, 3) == [("f.txt", T.CREATE), ("f.txt", T.CHMOD), ("f.txt", T.WRITE)]
    sbx.files.write(f"{tmp}/nested/g.txt", "content")
    assert poll_events(handle, 3) == [
        ("nested/g.txt", T.CREATE),
        ("nested/g.txt", T.CHMOD),
        ("nested/g.txt", T.WRITE),
    ]
    # An existing file overwritten: chowned, truncated, written.
    sbx.files.write(f"{tmp}/f.txt", "more content")
    assert dedup(poll_events(handle, 2)) == [("f.txt", T.CHMOD), ("f.txt", T.WRITE)]
    sbx.commands.run(f"chmod 600 {tmp}/f.txt")
    assert poll_events(handle, 1) == [("f.txt", T.CHMOD)]
    sbx.files.rename(f"{tmp}/f.txt", f"{tmp}/h.txt")
    assert poll_events(handle, 2) == [("f.txt", T.RENAME), ("h.txt", T.CREATE)]
    sbx.files.remove(f"{tmp}/h.txt")
    assert poll_events(handle, 1) == [("h.txt", T.REMOVE)]
    # A directory tree made at once: every level is reported, as fsnotify's recursive watch does.
    # What mkdir makes before the new directory is watched is reported from a walk of it, what
    # it makes after from the watch, and what falls in between by both (so by fsnotify too).
    sbx.commands.run(f"mkdir -p {tmp}/a/b/c")
    events = poll_events(handle, 3)
    assert list(dict.fromkeys(events)) == [("a", T.CREATE), ("a/b", T.CREATE), ("a/b/c", T.CREATE)]
    sbx.files.write(f"{tmp}/a/b/c/d.txt", "deep")
    assert poll_events(handle, 3) == [
        ("a/b/c/d.txt", T.CREATE),
        ("a/b/c/d.txt", T.CHMOD),
        ("a/b/c/d.txt", T.WRITE),
    ]
    # A directory moved within the tree: what it holds is reported as created, and later
    # events inside it carry its new name.
    sbx.files.rename(f"{tmp}/nested", f"{tmp}/moved")
    assert poll_events(handle, 3) == [
        ("nested", T.RENAME),
        ("moved", T.CREATE),
        ("moved/g.txt", T.CREATE),
    ]
    sbx.files.write(f"{tmp}/moved/g.txt", "again")
    assert dedup(poll_events(handle, 2)) == [("moved/g.txt", T.CHMOD), ("moved/g.txt", T.WRITE)]
    sbx.files.remove(f"{tmp}/moved")
    assert poll_events(handle, 2) == [("moved/g.txt", T.REMOVE), ("moved", T.REMOVE)]
    handle.stop()


def test_async_watch_events_match_e2b(envd, tmp):
    async def main(sbx):
        events = []
        handle = await sbx.files.watch_dir(tmp, on_event=lambda e: events.append((e.name, e.type)))
        await sbx.files.write(f"{tmp}/a.txt", "x")
        for _ in range(100):
            if len(events) >= 3:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        await handle.stop()
        return events

    assert run_async(envd, main) == [("a.txt", T.CREATE), ("a.txt", T.CHMOD), ("a.txt", T.WRITE)]


def test_run_deadline_raises_timeout_not_exit(sbx, envd):
    """The deadline error must reach the client before the killed process's end event."""
    # Not as root: killing root's login shell during its profile's `pyenv rehash` (on CI
    # machines) leaves a lock behind that stalls every later login shell for a minute.
    user = "user" if IS_ROOT else None
    with pytest.raises(TimeoutException):
        sbx.commands.run("sleep 30", timeout=1, user=user)

    async def many(s):
        async def one():
            with pytest.raises(TimeoutException):
                await s.commands.run("sleep 30", timeout=1, user=user)

        await asyncio.gather(*(one() for _ in range(8)))

    run_async(envd, many)


@pytest.mark.skipif(not IS_ROOT, reason="switching users needs root")
def test_write_creates_missing_parents_owned_by_user(sbx, envd):
    """E2B creates missing parents for the user even where the user could not create them."""
    top = f"/firkin-{secrets.token_hex(4)}"
    try:
        info = sbx.files.write(f"{top}/sub/f.txt", "x", user="user")
        assert info.path == f"{top}/sub/f.txt"
        for p in [top, f"{top}/sub", f"{top}/sub/f.txt"]:
            assert sbx.files.get_info(p).owner == "user"
        infos = sbx.files.write_files(
            [{"path": f"{top}/multi/f{i}.txt", "data": str(i)} for i in range(50)], user="user"
        )
        assert len(infos) == 50
        assert sbx.files.read(f"{top}/multi/f49.txt") == "49"

        async def write(s):
            await s.files.write(f"{top}/async/f.txt", "y", user="user")
            return (await s.files.get_info(f"{top}/async")).owner

        assert run_async(envd, write) == "user"
    finally:
        subprocess.run(["rm", "-rf", top], check=True)
    # Where the user cannot even reach the parent, the write still fails, and creates nothing.
    with pytest.raises(SandboxException):
        sbx.files.write("/root/firkin-denied-dir/f.txt", "no", user="user")
    assert not os.path.exists("/root/firkin-denied-dir")


@pytest.mark.skipif(not IS_ROOT, reason="switching users needs root")
def test_failed_upload_answers_with_the_error(sbx, envd):
    """An error on the first part must reach the client, not a reset while it still sends."""
    files = [{"path": f"/root/firkin-denied-{i}.txt", "data": b"x" * 65536} for i in range(50)]
    for _ in range(10):
        with pytest.raises(SandboxException) as e:
            sbx.files.write_files(files, user="user")
        assert "denied" in str(e.value).lower()
        with pytest.raises(SandboxException) as e:
            sbx.files.write(files[0]["path"], files[0]["data"], user="user")
        assert "denied" in str(e.value).lower()

    async def write(s):
        for _ in range(10):
            with pytest.raises(SandboxException) as e:
                await s.files.write_files(files, user="user")
            assert "denied" in str(e.value).lower()

    run_async(envd, write)
    assert not os.path.exists("/root/firkin-denied-0.txt")
