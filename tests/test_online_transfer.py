"""The transfer core end to end: an agent in one network namespace, a receiver in another.

Both run as subprocesses (so they can be killed with -9), the agent syncing a generated
tree with every kind of entry and attribute into a plain directory on the receiver. The
oracle is `rsync -aHAXn -c --itemize-changes --numeric-ids`, which must list nothing, plus a
walk comparing what rsync does not (nanosecond times, directory times).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import logging
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgetree import make_edge_tree, urandom_file
from netns import NetnsPair, netns_pair
from rehost.online.protocol import (
    CHUNK_SIZE,
    DATA,
    DELTA_MIN_SIZE,
    END,
    ENTRY,
    FileDigest,
    ProtocolError,
    block_digests,
    block_hash,
    blocks_digest,
    decode_entry,
    delta_block_size,
    encode_entry,
    file_digest,
    new_hash,
    partial_name,
    zero_block_hash,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")

PY = str(Path(sys.executable))
TOKEN = "s3cret-token-for-tests"
EXCLUDES = ["/proc/*", "/tmp/*"]
MiB = 1024 * 1024

AGENT = r"""
import json, sys
from rehost.online.agent import client
from rehost.online.agent.client import ReceiverClient
from rehost.online.agent.transfer import sync_filesystem
from rehost.online.protocol import AgentError
a = json.loads(sys.argv[1])
if a.get("eio"):  # a failing disk, which this kernel cannot make (no device-mapper, so no
    import errno, os  # dm-error): reads of the named file fail past its first MiB
    real = os.pread
    def pread(fd, n, off):
        if os.readlink("/proc/self/fd/%d" % fd).endswith(a["eio"]) and off >= 1 << 20:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, n, off)
    os.pread = pread
client.STALL_SECONDS = a.get("stall", client.STALL_SECONDS)  # tests shorten it
c = ReceiverClient(a["addr"], a["token"], a["fp"], proxy=a.get("proxy"),
                   limit_kbps=a.get("limit", 0), retry_seconds=a.get("retry", 60),
                   timeout=a.get("timeout", 60))
try:
    s = sync_filesystem(c, "root", a["root"], a["excludes"], a.get("compression", "auto"),
                        log=lambda level, m: print(level, m, file=sys.stderr, flush=True))
except AgentError as e:
    print(json.dumps({"error": e.code, "hint": e.hint}))
    sys.exit(3)
s["payload"] = c.payload_bytes
s["wire"] = c.bytes_on_wire
print(json.dumps(s))
"""

RECEIVER = r"""
import json, logging, sys
from pathlib import Path
from rehost.online.receiver.server import _Server, serve
a = json.loads(sys.argv[1])
for name, value in a.get("limits", {}).items():  # tests shrink the connection limits
    setattr(_Server, name, value)
if a.get("keepalive"):  # and the keepalive timings
    from rehost.online import protocol
    protocol.KEEPALIVE = tuple(a["keepalive"])
logging.basicConfig(level=logging.INFO, filename=a["log"], format="%(asctime)s %(message)s")
serve(a["listen"], a["token"], Path(a["state"]), {}, roots={"root": Path(a["root"])},
      ready=lambda addr: open(a["ready"], "w").write(addr))
"""


def rsync_diff(src: Path, dst: Path) -> list[str]:
    out = subprocess.run(
        ["rsync", "-aHAXn", "-c", "--itemize-changes", "--numeric-ids",
         *[f"--exclude={e}" for e in EXCLUDES], f"{src}/", f"{dst}/"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return [line for line in out.stdout.splitlines() if line.strip()]


def meta_diff(src: Path, dst: Path) -> list[str]:
    """What rsync -n does not report: nanosecond mtimes (directories too), rdev, excluded dirs."""
    diffs = []
    for dirpath, dirs, files in os.walk(os.fsencode(src)):
        rel = os.path.relpath(dirpath, os.fsencode(src))
        for name in [b"", *dirs, *files]:
            s = os.path.normpath(os.path.join(dirpath, name))
            r = os.path.normpath(os.path.join(rel, name))
            d = os.path.normpath(os.path.join(os.fsencode(dst), r))
            a = os.lstat(s)
            excluded = any(r.startswith(e[1:-1].encode()) for e in EXCLUDES)
            if excluded and r.count(b"/") > 0:
                if os.path.lexists(d):
                    diffs.append(f"{r!r} is excluded but exists")
                continue
            try:
                b = os.lstat(d)
            except FileNotFoundError:
                diffs.append(f"{r!r} missing")
                continue
            keys = ["st_mode", "st_uid", "st_gid", "st_rdev"]
            if not excluded:
                keys.append("st_mtime_ns")
            for key in keys:
                if getattr(a, key) != getattr(b, key):
                    diffs.append(f"{r!r} {key} {getattr(a, key)} != {getattr(b, key)}")
        dirs[:] = [x for x in dirs if not any(
            os.path.join(rel, x).startswith(e[1:-1].encode()) for e in EXCLUDES)]  # fmt: skip
    return diffs


def left_to_send(src: Path, dst: Path) -> int:
    """Payload bytes a correct resume must still send: an independent estimate."""
    total = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirs, files in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        dirs[:] = [x for x in dirs if x not in ("proc", "tmp") or rel != "."]
        for name in files:
            s = Path(dirpath) / name
            st = os.lstat(s)
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            d = dst / rel / name
            if d.exists() and d.read_bytes() == s.read_bytes():
                continue
            partial = d.parent / os.fsdecode(partial_name(os.fsencode(name)))
            if st.st_size >= DELTA_MIN_SIZE and partial.exists():
                block = delta_block_size(st.st_size)
                have, want = partial.read_bytes(), s.read_bytes()
                for off in range(0, len(want), block):
                    if have[off : off + block] != want[off : off + block]:
                        total += len(want[off : off + block])
            else:
                total += st.st_size
    return total


# --- processes --------------------------------------------------------------------------------


@dataclass
class Receiver:
    pair: NetnsPair
    state: Path
    root: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    addr: str = ""
    port: int = 8443
    limits: dict[str, float] = field(default_factory=dict)
    keepalive: list[int] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        return (self.state / "fingerprint").read_text().strip()

    def start(self) -> None:
        ready = self.state.parent / "ready"
        ready.unlink(missing_ok=True)
        args = {"listen": f"{self.pair.dest_ip}:{self.port}", "token": TOKEN,
                "state": str(self.state), "root": str(self.root), "log": str(self.log),
                "ready": str(ready), "limits": self.limits,
                "keepalive": self.keepalive}  # fmt: skip
        self.proc = subprocess.Popen(
            self.pair.cmd(self.pair.dest, [PY, "-c", RECEIVER, json.dumps(args)]),
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not ready.exists() or not ready.read_text():
            assert self.proc.poll() is None, "the receiver died at start"
            assert time.monotonic() < deadline, "the receiver did not start"
            time.sleep(0.05)
        self.addr = ready.read_text()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        self.proc = None

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


@dataclass
class Env:
    pair: NetnsPair
    tmp: Path
    receiver: Receiver
    src: Path
    dst: Path
    runs: list[subprocess.Popen[str]] = field(default_factory=list)

    def agent_args(self, **kw: Any) -> str:
        args = {"addr": self.receiver.addr, "token": TOKEN, "fp": self.receiver.fingerprint,
                "root": str(self.src), "excludes": EXCLUDES, **kw}  # fmt: skip
        return json.dumps(args)

    def start_agent(self, **kw: Any) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            self.pair.cmd(self.pair.source, [PY, "-c", AGENT, self.agent_args(**kw)]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.runs.append(proc)
        return proc

    def agent(self, **kw: Any) -> dict[str, Any]:
        proc = self.start_agent(**kw)
        out, err = proc.communicate(timeout=120)
        assert out.strip(), f"agent printed nothing; stderr:\n{err}"
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        result["stderr"] = err
        return result


@pytest.fixture(scope="module")
def pair() -> Iterator[NetnsPair]:
    with netns_pair() as p:
        yield p


@pytest.fixture
def env(pair: NetnsPair, tmp_path: Path) -> Iterator[Env]:
    src, dst, state = tmp_path / "src", tmp_path / "dst", tmp_path / "state"
    dst.mkdir()
    receiver = Receiver(pair, state, dst, tmp_path / "receiver.log")
    receiver.start()
    e = Env(pair, tmp_path, receiver, src, dst)
    try:
        yield e
    finally:
        for proc in e.runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        receiver.kill(signal.SIGTERM)
        pair.set_rate(None)
        if src.exists():  # make read-only dirs removable for tmp_path's cleanup
            subprocess.run(["chmod", "-R", "u+rwx", str(src), str(dst)], check=False)


def assert_same(env: Env) -> None:
    assert rsync_diff(env.src, env.dst) == []
    assert meta_diff(env.src, env.dst) == []
    leftovers = [p for p in env.dst.rglob(".rehost-*")]
    assert leftovers == []


# --- tests ------------------------------------------------------------------------------------


def test_full_then_incremental(env: Env) -> None:
    make_edge_tree(env.src)
    first = env.agent()
    assert "error" not in first, first
    assert_same(env)
    assert (env.dst / "proc").is_dir() and list((env.dst / "proc").iterdir()) == []
    assert stat.S_IMODE(os.lstat(env.dst / "tmp").st_mode) == 0o1777
    dense = 6 * MiB + 300_000 + 100_000 + 5000
    assert first["bytes_sent"] < dense + MiB, "holes were sent"

    again = env.agent()
    assert again["files_sent"] == 0 and again["bytes_sent"] == 0
    assert_same(env)

    # changes: modify, append, in-place change in a large file, deletions, new entries
    src = env.src
    (src / "small.txt").write_text("changed\n")
    with open(src / "text.log", "ab") as f:
        f.write(b"appended line\n")
    with open(src / "big.bin", "r+b") as f:
        f.seek(3 * MiB + 7)
        f.write(b"in-place edit")
    shutil.rmtree(src / "a" / "b" / "c")
    os.unlink(src / "sym-abs")
    os.unlink(src / "hard3")
    (src / "sym-dir").unlink()
    (src / "sym-dir").mkdir()  # a symlink became a directory
    (src / "sym-dir" / "new").write_text("new file\n")
    os.chmod(src / "owned", 0o600)  # metadata only
    os.chown(src / "sgid-dir", 7, 7)
    os.utime(src / "a" / "b", ns=(1, 1_300_000_000_000_000_000))
    third = env.agent()
    assert "error" not in third, third
    assert_same(env)
    assert third["delta_files"] == 1
    # small.txt + text.log in full, one 128 KiB block of big.bin, the new file
    assert third["bytes_sent"] < 300_000 + 200 + 128 * 1024 + 100, third
    assert third["deleted"] >= 3


def test_a_terabyte_sparse_file_costs_its_data(env: Env) -> None:
    """A 1 TiB lastlog with a few records arrives whole and sparse, and its hash costs its
    blocks, not its terabyte of zeros (15 s a side with XXH3 when holes were hashed). After
    one record changes, the incremental pass sends a delta of its 128 MiB block in pieces
    (one frame of it was refused as too large) and the copy stays as sparse as the source."""
    records = [(292 * 1000, b"a" * 292), (5 * MiB - 100, b"b" * 292), ((1 << 40) - 292, b"c" * 292)]
    env.src.mkdir()
    lastlog = env.src / "lastlog"

    def write(off: int, record: bytes) -> None:
        with open(lastlog, "r+b") as f:
            f.seek(off)
            f.write(record)

    lastlog.touch()
    os.truncate(lastlog, 1 << 40)
    for off, record in records:
        write(off, record)
    for run in ("full", "incremental"):
        start = time.monotonic()
        result = env.agent()
        took = time.monotonic() - start
        assert "error" not in result and result["files_sent"] == 1, result
        assert result["delta_files"] == (run == "incremental"), result
        assert result["bytes_sent"] < 3 * 2 * 4096, result  # the data pages only
        st = os.stat(env.dst / "lastlog")
        assert st.st_size == 1 << 40
        assert st.st_blocks <= os.stat(lastlog).st_blocks
        with open(env.dst / "lastlog", "rb") as f:
            for off, record in records:
                f.seek(off)
                assert f.read(len(record)) == record
        assert meta_diff(env.src, env.dst) == []
        print(f"1 TiB sparse file, {run}: {took:.2f} s")
        records.append((292 * 3000, b"d" * 292))  # another login, in the first record's block
        write(*records[-1])


def _deep(root: Path, depth: int) -> int:
    """The fd of root/d.../d... (`depth` levels of 30-byte names), made if missing."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        with contextlib.suppress(FileExistsError):
            os.mkdir("d" * 30, dir_fd=fd)
        step = os.open("d" * 30, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = step
    return fd


def test_a_path_longer_than_path_max_is_migrated(env: Env) -> None:
    """Entries 9 KB deep, beyond the 4 KiB a path may have: a file with an xattr and a
    symlink arrive, and a second pass finds nothing to send (it stopped the agent with
    ENAMETOOLONG)."""
    env.src.mkdir()
    env.dst.mkdir(exist_ok=True)
    fd = _deep(env.src, 300)
    try:
        leaf = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o640, dir_fd=fd)
        os.write(leaf, b"deep leaf\n")
        os.setxattr(leaf, "user.depth", b"300")
        os.close(leaf)
        os.symlink("leaf", "link", dir_fd=fd)
    finally:
        os.close(fd)
    first = env.agent()
    assert "error" not in first and first["files_sent"] == 1, first
    fd = _deep(env.dst, 300)
    try:
        leaf = os.open("leaf", os.O_RDONLY, dir_fd=fd)
        assert os.read(leaf, 100) == b"deep leaf\n"
        assert os.getxattr(leaf, "user.depth") == b"300"
        assert stat.S_IMODE(os.fstat(leaf).st_mode) == 0o640
        os.close(leaf)
        assert os.readlink("link", dir_fd=fd) == "leaf"
    finally:
        os.close(fd)
    again = env.agent()
    assert "error" not in again and again["files_sent"] == 0, again


def test_a_file_that_cannot_be_read_is_counted_and_its_copy_kept(env: Env) -> None:
    """A read error mid-file (simulated: see AGENT) sends the other files, counts the file
    as unreadable, and leaves the destination's earlier copy of it as it was."""
    env.src.mkdir()
    (env.src / "good").write_text("good")
    urandom_file(env.src / "bad", 3 * MiB)
    first = env.agent(eio="/bad")
    assert first["unreadable"] == 1 and first["files_sent"] == 1, first
    assert f"{logging.WARNING} cannot read " in first["stderr"]  # on the operator's console
    assert (env.dst / "good").read_text() == "good"
    second = env.agent()
    assert second["unreadable"] == 0 and second["files_sent"] == 1, second
    assert_same(env)
    kept = (env.dst / "bad").read_bytes()
    urandom_file(env.src / "bad", 3 * MiB)  # changed, then unreadable
    third = env.agent(eio="/bad")
    assert third["unreadable"] == 1 and third["files_sent"] == 0, third
    assert (env.dst / "bad").read_bytes() == kept
    assert env.agent()["unreadable"] == 0
    assert_same(env)


def test_a_full_destination_says_so(env: Env) -> None:
    """A destination filesystem that fills up (a 2 MiB tmpfs, 4 MiB to send) stops the
    agent with DESTINATION_FULL and what to do, not a bare 500."""
    env.receiver.kill()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(env.dst)], check=True)
    try:
        env.receiver.start()
        env.src.mkdir()
        urandom_file(env.src / "big", 4 * MiB)
        result = env.agent()
        assert result.get("error") == "DESTINATION_FULL", result
        assert "grow the destination disk" in result["hint"]
        assert "a destination filesystem is full" in env.receiver.log_text()
    finally:
        env.receiver.kill()
        subprocess.run(["umount", str(env.dst)], check=True)


def test_wrong_token_is_refused_and_logged(env: Env) -> None:
    env.src.mkdir()
    result = env.agent(token="not-the-token")
    assert result["error"] == "TOKEN_REJECTED"
    log = env.receiver.log_text()
    assert "refused GET /v1/hello" in log
    assert "not-the-token" not in log and TOKEN not in log


def test_wrong_fingerprint_sends_nothing(env: Env) -> None:
    env.src.mkdir()
    before = env.receiver.log_text()
    result = env.agent(fp="00" * 32)
    assert result["error"] == "FINGERPRINT_MISMATCH"
    assert "copy the fingerprint" in result["hint"]
    time.sleep(0.3)
    assert env.receiver.log_text() == before, "the receiver saw a request"


_CLIENT = r"""
import http.client, json, socket, ssl, sys, time
host, port = sys.argv[1].split(":")
ctx = ssl._create_unverified_context()
def closed(s):
    s.setblocking(False)
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True
"""
"""What the flood scripts below share: the receiver's address from argv[1], a TLS context
that trusts any certificate, and closed(socket): has the receiver closed it?"""

_FLOOD = (
    _CLIENT
    + r"""
token, n = sys.argv[2], int(sys.argv[3])
def hello(conn):
    conn.request("GET", "/v1/hello", headers={"Authorization": "Bearer " + token})
    reply = conn.getresponse()
    reply.read()
    return reply.status
agent = http.client.HTTPSConnection(host, int(port), context=ctx)
first = hello(agent)
flood = [socket.create_connection((host, int(port))) for _ in range(n)]
time.sleep(0.5)
at_once = sum(closed(s) for s in flood)
time.sleep(2.0)
later = sum(closed(s) for s in flood)
second = hello(agent)
for s in flood:
    s.close()
agent.close()
print(json.dumps({"at_once": at_once, "later": later, "agent": [first, second],
                  "after": hello(http.client.HTTPSConnection(host, int(port), context=ctx))}))
"""
)


_SLOW = (
    _CLIENT
    + r"""
token = sys.argv[2]
def tls():
    return ctx.wrap_socket(socket.create_connection((host, int(port))), server_hostname=host)
def status(s):
    s.settimeout(10)
    data = b""
    try:
        while b"\r\n" not in data:
            more = s.recv(4096)
            if not more:
                break
            data += more
    except OSError:
        pass
    return int(data.split()[1]) if data.startswith(b"HTTP/") else None
out = {}
# a head trickled a byte every 0.3 s: cut at the pre-auth deadline, not kept alive by each byte
s = tls()
s.sendall(b"GET /v1/hello HTTP/1.1\r\nHost: x\r\nX-Slow: ")
began = time.monotonic()
try:
    for _ in range(40):
        s.send(b"a")
        time.sleep(0.3)
except OSError:
    pass
out["trickle_cut_after"] = round(time.monotonic() - began, 1)
s.close()
# the token beyond 32 KiB of headers is never read: a 401, not a 200
s = tls()
s.sendall(b"GET /v1/hello HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"a" * 1000) for i in range(40))
          + b"Authorization: Bearer " + token.encode() + b"\r\n\r\n")
out["late_token"] = status(s)
s.close()
# wrong tokens: answered, but logged once, not thirty times
for _ in range(30):
    c = http.client.HTTPSConnection(host, int(port), context=ctx)
    c.request("GET", "/v1/hello%1b[2J", headers={"Authorization": "Bearer wrong"})
    out.setdefault("wrong", []).append(c.getresponse().status)
    c.close()
# one address holds at most two unauthenticated connections here
held = [socket.create_connection((host, int(port))) for _ in range(3)]
time.sleep(0.3)
out["held_closed"] = [closed(x) for x in held]
for x in held:
    x.close()
time.sleep(0.3)
c = http.client.HTTPSConnection(host, int(port), context=ctx)
c.request("GET", "/v1/hello", headers={"Authorization": "Bearer " + token})
out["agent"] = c.getresponse().status
print(json.dumps(out))
"""
)


def _client_against(env: Env, script: str, **limits: float) -> Any:
    """Restart the receiver with these _Server limits, run `script` (its address and the
    token in argv) in the source namespace, and return the JSON it prints."""
    env.receiver.kill()
    env.receiver.limits = limits
    env.receiver.start()
    proc = subprocess.run(
        env.pair.cmd(env.pair.source, [PY, "-c", script, env.receiver.addr, TOKEN]),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_an_unauthenticated_client_is_held_to_a_deadline_a_budget_and_a_quiet_log(
    env: Env,
) -> None:
    """An unauthenticated client trickling its head kept a connection (and its memory:
    100 headers of 64 KiB) for as long as it liked, 64 of them locked the agent out, and
    each refusal logged its whole path: ~49 MB/s of log from one client."""
    out = _client_against(env, _SLOW, preauth_timeout=1.5, preauth_per_ip=2)
    assert out["trickle_cut_after"] < 4, out
    assert out["late_token"] == 401, out
    assert out["wrong"] == [401] * 30, out
    assert out["held_closed"] == [False, False, True], out
    assert out["agent"] == 200, out
    assert env.receiver.log_text().count("refused GET") == 1, env.receiver.log_text()


_CROWD = (
    _CLIENT
    + r"""
token = sys.argv[2]
crowd = [socket.create_connection((host, int(port))) for _ in range(3)]
time.sleep(0.5)
c = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=10)
c.request("GET", "/v1/hello", headers={"Authorization": "Bearer " + token})
agent = c.getresponse().status
time.sleep(0.3)
print(json.dumps({"agent": agent, "crowd_closed": [closed(s) for s in crowd]}))
"""
)


def test_the_agent_gets_the_slot_of_the_oldest_unauthenticated_connection(env: Env) -> None:
    """Connections from many addresses (one here, with the per-address cap raised) held
    every slot: an agent was refused for as long as they stayed. It now takes the slot of
    the oldest one that has not authenticated."""
    out = _client_against(env, _CROWD, max_connections=3, preauth_timeout=30.0)
    assert out == {"agent": 200, "crowd_closed": [True, False, False]}, out


def test_a_flood_of_idle_connections_is_capped_and_dropped(env: Env) -> None:
    """Beyond the cap each new connection takes the slot of the oldest unauthenticated one
    (so all but the newest are closed at once), and the rest go after the pre-auth timeout; an authenticated connection outlives that timeout; the receiver's
    threads stay bounded, and an agent is served once the flood is over."""
    env.receiver.kill()
    env.receiver.limits = {"max_connections": 4, "preauth_timeout": 1.0}
    env.receiver.start()
    assert env.receiver.proc is not None
    tasks = Path(f"/proc/{env.receiver.proc.pid}/task")
    idle_threads = len(list(tasks.iterdir()))
    flood = subprocess.Popen(
        env.pair.cmd(env.pair.source, [PY, "-c", _FLOOD, env.receiver.addr, TOKEN, "12"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(0.4)
    busiest = len(list(tasks.iterdir()))
    out, err = flood.communicate(timeout=60)
    assert flood.returncode == 0, err
    result = json.loads(out)
    assert result["at_once"] == 12 - 3, result  # beyond the cap (the agent holds one)
    assert result["later"] == 12, result  # the rest: dropped after the pre-auth timeout
    assert result["agent"] == [200, 200], result  # authenticated: idle past that timeout
    assert result["after"] == 200, result
    assert busiest <= idle_threads + 4, (idle_threads, busiest)
    assert "cut the oldest that had not authenticated" in env.receiver.log_text()
    env.src.mkdir()
    (env.src / "f").write_bytes(b"still served")
    assert env.agent()["files_sent"] == 1
    assert_same(env)


def _raw_post(env: Env, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """A hand-crafted request, run from the source namespace."""
    script = r"""
import http.client, json, ssl, sys
host, port = sys.argv[1].split(":")
ctx = ssl._create_unverified_context()
c = http.client.HTTPSConnection(host, int(port), context=ctx)
c.request("POST", sys.argv[2], body=bytes.fromhex(sys.argv[3]),
          headers={"Authorization": "Bearer " + sys.argv[4],
                   "Content-Type": "application/octet-stream"})
r = c.getresponse()
print(json.dumps([r.status, json.loads(r.read() or b"{}")]))
"""
    out = env.pair.run(env.pair.source,
                       [PY, "-c", script, env.receiver.addr, path, body.hex(), TOKEN])  # fmt: skip
    status, obj = json.loads(out.stdout)
    return int(status), obj


def _entry(i: int, path: str, kind: str, **extra: Any) -> bytes:
    """An ENTRY frame as an agent would send it, but with anything in it, unvalidated."""
    base: dict[str, Any] = {"i": i, "p": path, "t": kind, "m": 0o100644 if kind == "f" else 0o40755,
            "u": 0, "g": 0, "s": 0, "mt": 0, "at": 0, "x": {}}  # fmt: skip
    if kind == "d":
        base["c"] = []
    base.update(extra)
    for key in ("p", "l", "h"):
        if key in base:
            base[key] = os.fsencode(base[key])
    base["c"] = [os.fsencode(c) for c in base.get("c", [])]
    return encode_entry(base)


def test_traversal_attempts_are_rejected(env: Env) -> None:
    outside = env.tmp / "outside"
    outside.mkdir()
    (outside / "victim").write_text("untouched\n")
    root = _entry(0, "", "d", c=["link", "sub"])
    link = _entry(1, "link", "l", l=str(outside), m=0o120777)
    status, obj = _raw_post(env, "/v1/manifest/root", root + link)
    assert status == 200, obj
    assert os.readlink(env.dst / "link") == str(outside)
    attacks = [
        _entry(0, "../escape", "f", s=5),
        _entry(0, "/abs/file", "f", s=5),
        _entry(0, "sub/../../escape", "f", s=5),
        _entry(0, "link/victim", "f", s=5),  # through the symlink received above
        _entry(0, "link", "d", c=[]),  # replaces the link itself, which is allowed ...
    ]
    for frame in attacks[:4]:
        status, obj = _raw_post(env, "/v1/manifest/root", frame)
        assert status == 400, obj
        assert obj["code"] in ("BAD_PATH", "UNSAFE_PATH")
    hard = _entry(0, "stolen", "h", h="link/victim")
    status, obj = _raw_post(env, "/v1/manifest/root", hard)
    assert status == 400 and obj["code"] == "UNSAFE_PATH"
    bad_child = _entry(0, "", "d", c=["../x"])
    status, obj = _raw_post(env, "/v1/manifest/root", bad_child)
    assert status == 400 and obj["code"] == "BAD_PATH"
    # replacing the symlink by a directory must not touch its target
    status, obj = _raw_post(env, "/v1/manifest/root", attacks[4])
    assert status == 200
    assert (outside / "victim").read_text() == "untouched\n"
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert not (env.tmp / "escape").exists()
    log = env.receiver.log_text()
    assert log.count("rejected POST /v1/manifest/root") >= 6


_RAW_REQUEST = r"""
import json, socket, ssl, sys
host, port = sys.argv[1].split(":")
ctx = ssl._create_unverified_context()
s = ctx.wrap_socket(socket.create_connection((host, int(port))))
s.settimeout(10)  # the answer must come at once, not after the receiver read to the end
try:  # one TLS record: the refusal may close the connection before more could go
    s.sendall(sys.argv[2].replace("TOKEN", sys.argv[3]).encode() + b"x" * 64)
except OSError:
    pass
answer = b""
while True:  # the receiver closes the connection after a refusal
    piece = s.recv(65536)
    if not piece:
        break
    answer += piece
head, _, body = answer.partition(b"\r\n\r\n")
print(json.dumps([int(head.split()[1]), json.loads(body or b"{}")]))
"""


@pytest.mark.parametrize(
    "head",
    [
        "POST /v1/manifest/root HTTP/1.1\r\nTransfer-Encoding: chunked\r\n",
        "POST /v1/prepare HTTP/1.1\r\nContent-Length: -1\r\n",
        "POST /v1/manifest/root HTTP/1.1\r\nContent-Length: 1e3\r\n",
        # a body the handler would leave unread, to be parsed as the next request
        "GET /v1/hello HTTP/1.1\r\nContent-Length: 64\r\n",
        "POST /v1/finish/root HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 0\r\n",
        "POST /v1/manifest/root HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n",
        "POST /v1/prepare HTTP/1.1\r\nTransfer-Encoding: chunked\r\n",
    ],
    ids=[
        "chunk size -1",
        "Content-Length -1",
        "Content-Length 1e3",
        "GET with a body",
        "two Content-Lengths",
        "a coding before chunked",
        "chunked JSON",
    ],
)
def test_a_malformed_body_length_is_refused_at_once(env: Env, head: str) -> None:
    """A length of -1 made the receiver read the connection to its end, into memory (an
    authorised client could hold gigabytes there); other garbage was a 500."""
    chunk = "-1\r\n" if "chunked" in head else ""
    request = f"{head}Host: x\r\nAuthorization: Bearer TOKEN\r\n\r\n{chunk}"
    out = env.pair.run(env.pair.source, [PY, "-c", _RAW_REQUEST, env.receiver.addr, request, TOKEN])
    assert out.returncode == 0, out.stderr
    status, obj = json.loads(out.stdout)
    assert status == 400 and obj.get("code") in ("BAD_FRAME", "BAD_REQUEST"), (status, obj)


def _tree_for_kill(src: Path) -> None:
    src.mkdir()
    for i in range(60):
        urandom_file(src / f"f{i:03d}", 256 * 1024 + i)
    (src / "sub").mkdir()
    urandom_file(src / "sub" / "large.bin", 40 * MiB)
    for i in range(60, 120):
        urandom_file(src / "sub" / f"f{i:03d}", 300 * 1024)


def _wait_bytes(env: Env, proc: subprocess.Popen[str], at_least: int) -> None:
    """Wait until the receiver holds `at_least` bytes of file data (partials included)."""
    deadline = time.monotonic() + 60
    while True:
        have = sum(p.stat().st_blocks * 512 for p in env.dst.rglob("*") if p.is_file())
        if have >= at_least:
            return
        assert proc.poll() is None, "the agent finished before the kill"
        assert time.monotonic() < deadline
        time.sleep(0.05)


def _resume_sends_only_what_is_left(env: Env) -> None:
    left = left_to_send(env.src, env.dst)
    result = env.agent(compression="off")
    assert "error" not in result, result
    assert_same(env)
    print(f"resume sent {result['bytes_sent']} of {left} left")
    assert result["bytes_sent"] <= 1.10 * left + 64 * 1024, (result["bytes_sent"], left)


@pytest.mark.parametrize("at", [8 * MiB, 30 * MiB])
def test_kill_agent_then_resume(env: Env, at: int) -> None:
    _tree_for_kill(env.src)
    proc = env.start_agent(limit=12000, compression="off")
    _wait_bytes(env, proc, at)
    proc.kill()
    proc.wait()
    _resume_sends_only_what_is_left(env)


def test_kill_receiver_then_resume(env: Env) -> None:
    _tree_for_kill(env.src)
    proc = env.start_agent(limit=12000, compression="off", retry=3)
    _wait_bytes(env, proc, 20 * MiB)
    env.receiver.kill()
    out, err = proc.communicate(timeout=120)
    assert json.loads(out.strip().splitlines()[-1])["error"] == "RECEIVER_UNREACHABLE", err
    env.receiver.start()
    _resume_sends_only_what_is_left(env)


def test_a_stale_request_is_taken_over(env: Env) -> None:
    """The agent's connection goes silent mid-transfer without closing (a network cut the
    receiver cannot see: here the agent is frozen, as its traffic would be lost). The
    receiver would hold the filesystem for the ten minutes its socket may wait; the agent
    run again takes the filesystem over from that request and resumes at once."""
    _tree_for_kill(env.src)
    proc = env.start_agent(limit=12000, compression="off")
    _wait_bytes(env, proc, 10 * MiB)
    proc.send_signal(signal.SIGSTOP)
    try:
        start = time.monotonic()
        _resume_sends_only_what_is_left(env)
        assert time.monotonic() - start < 60
    finally:
        proc.kill()
        proc.wait()
    assert "took over" in env.receiver.log_text()


def test_a_network_cut_is_noticed_by_both_sides(env: Env) -> None:
    """The source's address changes mid-transfer (as when a NAT loses its state: nothing of
    the old connection gets through any more). The receiver, waiting for the rest of the
    body, notices by its keepalives; the agent, sending, by its data going unacknowledged
    (both shortened to seconds from a minute here) instead of waiting the 600 s a socket
    may. The agent then retries the batch on a new connection and finishes by itself."""
    env.receiver.kill()
    env.receiver.keepalive = [1, 1, 2]
    env.receiver.start()
    _tree_for_kill(env.src)
    proc = env.start_agent(limit=12000, compression="off", stall=3)
    _wait_bytes(env, proc, 10 * MiB)
    old = f"{env.pair.source_ip}/24"
    new = f"{env.pair.source_ip.rsplit('.', 1)[0]}.3/24"
    addr = ["ip", "addr"]
    dev = ["dev", env.pair.source_if]
    promote = f"net.ipv4.conf.{env.pair.source_if}.promote_secondaries=1"  # else the new
    env.pair.run(env.pair.source, ["sysctl", "-qw", promote]).check_returncode()  # goes too
    env.pair.run(env.pair.source, [*addr, "add", new, *dev]).check_returncode()
    env.pair.run(env.pair.source, [*addr, "del", old, *dev]).check_returncode()
    cut = time.monotonic()
    try:
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - cut
        result = json.loads(out.strip().splitlines()[-1])
        assert "error" not in result, err
        assert "s: the network to the receiver is cut" in err, err
        # its read gave up by itself, by its keepalives
        assert "broke off: [Errno 110] Connection timed out" in env.receiver.log_text()
        print(f"the agent finished {took:.1f} s after the cut")
    finally:
        env.pair.run(env.pair.source, [*addr, "add", old, *dev])
        env.pair.run(env.pair.source, [*addr, "del", new, *dev])
    assert_same(env)


def test_a_receiver_that_stops_reading_is_not_cut(env: Env) -> None:
    """A live receiver may stop reading for minutes or hours (hashing a large file for a
    delta): its kernel still answers, with a zero window, and the agent must wait rather
    than take it for a cut. Here the receiver is frozen for longer than the agent's
    (shortened) stall limit and its connect timeout, which once bounded every read and
    write too (600 s: a pass over a file of more than ~300 GB failed)."""
    _tree_for_kill(env.src)
    proc = env.start_agent(limit=12000, compression="off", stall=2, timeout=3)
    _wait_bytes(env, proc, 10 * MiB)
    assert env.receiver.proc is not None
    env.receiver.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(8)
    finally:
        env.receiver.proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=60)
    assert "error" not in json.loads(out.strip().splitlines()[-1]), err
    assert "retrying" not in err, err
    assert_same(env)


def test_receiver_restart_during_a_run_is_retried(env: Env) -> None:
    _tree_for_kill(env.src)
    proc = env.start_agent(limit=12000, compression="off", retry=60)
    _wait_bytes(env, proc, 10 * MiB)
    env.receiver.kill()
    time.sleep(1)
    env.receiver.start()
    out, err = proc.communicate(timeout=120)
    assert "error" not in json.loads(out.strip().splitlines()[-1]), err
    assert "retrying" in err
    assert_same(env)


def test_bandwidth_limit_holds_under_a_tbf_cap(env: Env) -> None:
    env.src.mkdir()
    urandom_file(env.src / "payload.bin", 40 * MiB)
    env.pair.set_rate(40_000)  # 40 Mbit/s on the source side, above the limit
    limit = 2000  # KiB/s
    proc = env.start_agent(limit=limit, compression="off")
    samples: list[tuple[float, int]] = []
    deadline = time.monotonic() + 14
    while time.monotonic() < deadline and proc.poll() is None:
        samples.append((time.monotonic(), env.pair.tx_bytes()))
        time.sleep(1 - (time.monotonic() - samples[-1][0]) % 1)
    proc.kill()
    proc.wait()
    # skip the first second (handshake, manifest) and judge every 10-second window
    rates = [(b1 - b0) / (t1 - t0) for (t0, b0), (t1, b1) in itertools.pairwise(samples)][1:]
    assert len(rates) >= 11, rates
    want = limit * 1024
    for k in range(len(rates) - 9):
        window = sum(rates[k : k + 10]) / 10
        assert 0.95 * want <= window <= 1.05 * want, (k, window / want, rates)
    assert max(rates) <= 1.10 * want, rates
    print("1-s rates / limit:", [round(r / want, 3) for r in rates])


# A minimal HTTP CONNECT proxy, like the gateway of a private network: it logs each tunnel
# and counts the bytes it carried in both directions.
PROXY = r"""
import socket, sys, threading
listen, log = sys.argv[1], sys.argv[2]
host, port = listen.rsplit(":", 1)
srv = socket.create_server((host, int(port)))
open(log + ".ready", "w").write("ok")
def pipe(a, b, counter):
    while True:
        data = a.recv(65536)
        if not data:
            break
        counter[0] += len(data)
        b.sendall(data)
    b.shutdown(socket.SHUT_WR)
def handle(c):
    head = b""
    while b"\r\n\r\n" not in head:
        head += c.recv(4096)
    line = head.split(b"\r\n")[0].decode()
    method, target, _ = line.split(" ")
    assert method == "CONNECT", line
    th, tp = target.rsplit(":", 1)
    up = socket.create_connection((th, int(tp)))
    c.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
    sent, got = [0], [0]
    t = threading.Thread(target=pipe, args=(up, c, got)); t.start()
    pipe(c, up, sent); t.join()
    with open(log, "a") as f:
        f.write("CONNECT %s up %d down %d\n" % (target, sent[0], got[0]))
while True:
    conn, _ = srv.accept()
    threading.Thread(target=handle, args=(conn,), daemon=True).start()
"""


def test_through_a_connect_proxy(env: Env) -> None:
    """The agent reaches the receiver only through an HTTP CONNECT proxy on its side."""
    (env.src / "etc").mkdir(parents=True)
    payload = 3 * MiB
    urandom_file(env.src / "etc" / "blob", payload)
    (env.src / "etc" / "hostname").write_text("proxied\n")
    log = env.tmp / "proxy.log"
    proxy = subprocess.Popen(
        env.pair.cmd(env.pair.source, [PY, "-c", PROXY, "127.0.0.1:3128", str(log)])
    )
    try:
        deadline = time.monotonic() + 20
        while not Path(str(log) + ".ready").exists():
            assert proxy.poll() is None and time.monotonic() < deadline, "proxy did not start"
            time.sleep(0.05)
        result = env.agent(proxy="127.0.0.1:3128")
        assert "error" not in result, result
        # the proxy logs a tunnel once both its directions have ended, just after the agent
        while not log.exists() and time.monotonic() < deadline + 10:
            time.sleep(0.05)
    finally:
        proxy.kill()
        proxy.wait()
    assert_same(env)
    tunnels = log.read_text().splitlines()
    assert tunnels and all(t.startswith(f"CONNECT {env.receiver.addr} ") for t in tunnels)
    carried = sum(int(t.split(" up ")[1].split()[0]) for t in tunnels)
    assert carried >= payload


def test_the_receiver_says_why_it_cannot_start(tmp_path: Path) -> None:
    """A port someone holds, or a state dir another receiver uses: a typed error saying so
    (the first was a SYSTEM_ERROR calling itself a bug; the second went unnoticed, and two
    receivers then shared one journal and prepared the same disks)."""
    import fcntl
    import socket

    from rehost.online.receiver.server import ReceiverStartFailed, serve

    roots = {"root": tmp_path}
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(ReceiverStartFailed, match=r"cannot listen on .*in use"):
            serve(f"127.0.0.1:{port}", TOKEN, tmp_path / "a", {}, roots=roots)
    (tmp_path / "b").mkdir()
    with open(tmp_path / "b" / "receiver.lock", "w") as lock:  # a running receiver's hold
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write("4242")
        lock.flush()
        with pytest.raises(ReceiverStartFailed, match=r"another receiver \(PID 4242\)") as e:
            serve("127.0.0.1:0", TOKEN, tmp_path / "b", {}, roots=roots)
    assert e.value.code == "RECEIVER_START_FAILED" and "--state-dir" in e.value.hint


def test_block_hash_is_stable() -> None:
    # both sides must agree on delta block hashes, whichever algorithm the agent has
    assert block_hash("sha256", b"abc") == hashlib.sha256(b"abc").hexdigest()[:32]
    assert delta_block_size(1) == 128 * 1024
    assert delta_block_size(8192 * 128 * 1024 + 1) == 256 * 1024


def _digest_by_definition(alg: str, content: bytes) -> str:
    """END's hash of a DATA file, as docs/online-protocol.md defines it."""
    if len(content) <= CHUNK_SIZE:
        whole = new_hash(alg)
        whole.update(content)
        return str(whole.hexdigest())
    blocks = range(0, len(content), CHUNK_SIZE)
    return blocks_digest(alg, [block_hash(alg, content[o : o + CHUNK_SIZE]) for o in blocks])


def test_a_file_that_changed_kind_since_the_walk_is_skipped(tmp_path: Path) -> None:
    """A path the walk saw as a file and that is now a FIFO (whose open blocked for ever),
    a directory or a symlink: skipped, not counted as unreadable, its END matching nothing."""
    from types import SimpleNamespace

    from rehost.online.agent import transfer

    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to("dir")
    client = SimpleNamespace(hash_alg="xxh128", payload_bytes=0)
    stats = dict.fromkeys(["bytes_sent", "files_sent", "delta_files", "unreadable", "changed"], 0)
    logged: list[str] = []
    levels: set[int] = set()

    def log(level: int, message: str) -> None:
        levels.add(level)
        logged.append(message)

    sender = transfer._Sender(client, transfer._Compressor("off"), stats, log)
    for name in ("fifo", "dir", "link"):
        path = os.fsencode(tmp_path / name)
        done: list[list[Any]] = []

        def send(path: bytes = path, done: list[list[Any]] = done) -> None:
            done.append(list(sender.frames(0, path, 100, [0, "full"], (0, 0))))

        worker = threading.Thread(target=send, daemon=True)
        worker.start()
        worker.join(10)
        assert done, f"{name}: frames() blocked"
        ends = [f for f in done[0] if f[:1] == b"Z"]
        assert all(b'"hash":""' in f for f in ends), (name, done)
    assert stats["unreadable"] == 0 and stats["files_sent"] == 0, stats
    assert stats["changed"] == 3  # for the finalize, which runs its pass again
    assert len(logged) == 3 and all("changed since the walk" in m for m in logged), logged
    assert levels == {logging.INFO}  # churn on a live server: the log file, not the console


def test_a_directory_swapped_for_a_symlink_after_the_walk_sends_nothing(tmp_path: Path) -> None:
    """A user on the source swaps a directory of theirs for a symlink into /root between the
    walk and the send: the agent (root) would open root's file through it and send it under
    the owner and mode the walk saw for the user's file. It must send nothing of it."""
    from types import SimpleNamespace

    from rehost.online.agent import transfer

    home, secret = tmp_path / "home", tmp_path / "root"
    (home / "d").mkdir(parents=True)
    secret.mkdir()
    (home / "d" / "x").write_bytes(b"mine" * 100)
    (secret / "x").write_bytes(b"SECRET" * 100)
    st = os.lstat(home / "d" / "x")  # what the walk saw
    (home / "d").rename(home / "old")
    (home / "d").symlink_to(secret)
    client = SimpleNamespace(hash_alg="xxh128", payload_bytes=0)
    stats = dict.fromkeys(["bytes_sent", "files_sent", "delta_files", "unreadable", "changed"], 0)
    logged: list[str] = []
    sender = transfer._Sender(
        client, transfer._Compressor("off"), stats, lambda level, m: logged.append(m)
    )
    path = os.fsencode(home / "d" / "x")
    frames = list(sender.frames(0, path, 600, [0, "full"], transfer._identity(st)))
    assert not any(b"SECRET" in (f if isinstance(f, bytes) else b"".join(f)) for f in frames)
    assert stats["bytes_sent"] == 0 and stats["files_sent"] == 0, stats
    assert len(logged) == 1 and "changed since the walk" in logged[0], logged


def _sender(log: list[str]) -> tuple[Any, dict[str, int]]:
    from types import SimpleNamespace

    from rehost.online.agent import transfer

    client = SimpleNamespace(hash_alg="xxh128", payload_bytes=0)
    stats = dict.fromkeys(["bytes_sent", "files_sent", "delta_files", "unreadable", "changed"], 0)
    sender = transfer._Sender(
        client, transfer._Compressor("off"), stats, lambda _, m: log.append(m)
    )
    return sender, stats


def test_a_file_replaced_by_a_socket_or_under_a_replaced_directory_is_churn(
    tmp_path: Path,
) -> None:
    """ENXIO (a UNIX socket where the file was) and ENOTDIR (a file where its directory
    was) are a live server changing, not a failing disk: counted as unreadable, they failed
    the stage with SOURCE_UNREADABLE ("repair or restore them")."""
    from rehost.online.agent import transfer

    (tmp_path / "d").mkdir()
    for name in ("sock", "d/x"):
        (tmp_path / name).write_bytes(b"data")
    seen = {name: os.lstat(tmp_path / name) for name in ("sock", "d/x")}
    (tmp_path / "sock").unlink()
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "sock"))
    shutil.rmtree(tmp_path / "d")
    (tmp_path / "d").write_bytes(b"now a file")
    logged: list[str] = []
    sender, stats = _sender(logged)
    try:
        for name, st in seen.items():
            path = os.fsencode(tmp_path / name)
            assert not list(sender.frames(0, path, 4, [0, "full"], transfer._identity(st)))
    finally:
        server.close()
    assert stats["unreadable"] == 0 and stats["files_sent"] == 0, stats
    assert stats["changed"] == 2
    assert len(logged) == 2 and all("changed since the walk" in m for m in logged), logged


def test_a_file_whose_owner_or_mode_changed_since_the_walk_is_not_sent(tmp_path: Path) -> None:
    """The send checks more than the inode number, which a deleted file's successor often
    gets (ext4 hands it out again at once): root's new 0600 file at a user's old path went
    out as the user's, mode 0644. Here the same inode is made 0600 and root's."""
    from rehost.online.agent import transfer

    path = tmp_path / "notes.txt"
    path.write_bytes(b"ROOT SECRET")
    os.chown(path, 1000, 1000)
    os.chmod(path, 0o644)
    st = os.lstat(path)  # what the walk saw
    os.chown(path, 0, 0)
    os.chmod(path, 0o600)
    logged: list[str] = []
    sender, stats = _sender(logged)
    frames = list(sender.frames(0, os.fsencode(path), 11, [0, "full"], transfer._identity(st)))
    assert frames == [] and stats["bytes_sent"] == 0, (frames, stats)
    assert len(logged) == 1 and "changed since the walk" in logged[0], logged


def test_the_walk_does_not_follow_a_directory_swapped_for_a_symlink(tmp_path: Path) -> None:
    """While the walk is inside x/aaa, x is moved away and a symlink to a tree outside the
    filesystem takes its name (mv x x.old; ln -s /outside x). By path, the walk then listed
    x/etc through the symlink and sent /outside/etc/shadow as x/etc/shadow, with its owner
    and mode: a pass that reported success. The directory it opens is not the one its
    parent listed, so it is left for the next pass."""
    from rehost.online.agent import transfer

    src, outside = tmp_path / "src", tmp_path / "outside"
    (src / "x" / "aaa").mkdir(parents=True)
    (src / "x" / "etc").mkdir()
    (src / "x" / "aaa" / "f").write_text("mine")
    (outside / "etc").mkdir(parents=True)
    (outside / "etc" / "shadow").write_text("SECRET")
    sent = []
    walker = transfer._Walker(str(src), [], None)
    for entry, _ in walker.walk():
        sent.append(entry["p"])
        if entry["p"] == b"x/aaa":  # the swap, as the walk goes on
            (src / "x").rename(src / "x.old")
            (src / "x").symlink_to(outside)
    assert sent == [b"", b"x", b"x/aaa", b"x/aaa/f"], sent
    assert walker.changed == 1  # a final pass runs again, and finds x a symlink


def test_the_walk_goes_on_when_an_entry_changes_under_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A symlink deleted between the walk's stat and its readlink, and a directory replaced
    by a file while its child's attributes are read: both raised out of the walk and ended
    the pass. Now each is skipped, for the next pass. The writer acts at that exact moment
    here (wrapped os calls; the changes to the tree are real)."""
    from rehost.online.agent import transfer

    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "child").write_text("c")
    (src / "lnk").symlink_to("d")
    (src / "z").write_text("after")
    readlink, listxattr = os.readlink, os.listxattr

    def vanishing(path: Any, *args: Any, **kw: Any) -> Any:
        if path == b"lnk":
            (src / "lnk").unlink()
        return readlink(path, *args, **kw)

    def replacing(path: Any, *args: Any, **kw: Any) -> Any:
        if isinstance(path, bytes) and path.endswith(b"/child") and (src / "d").is_dir():
            (src / "d").rename(src / "d.old")
            (src / "d").write_text("a file now")
        return listxattr(path, *args, **kw)

    monkeypatch.setattr(os, "readlink", vanishing)
    monkeypatch.setattr(os, "listxattr", replacing)
    walker = transfer._Walker(str(src), [], None)
    entries = {e["p"]: e for e, _ in walker.walk()}
    assert sorted(entries) == [b"", b"d", b"z"], sorted(entries)
    assert walker.changed == 2


def _applier(tmp_path: Path) -> tuple[Any, Path, Any]:
    """An FsApplier on a plain directory, and a function that sends it a manifest."""
    from rehost.online.receiver.apply import FsApplier

    root = tmp_path / "dst"
    root.mkdir()
    applier = FsApplier("root", root, tmp_path / "state")
    mt = 1_600_000_000_000_000_000
    meta = {"u": 0, "g": 0, "mt": mt, "at": mt, "x": {}, "m": 0o100644, "s": 0}

    def manifest(*entries: dict[str, Any]) -> dict[str, Any]:
        frames = [(ENTRY, encode_entry({**meta, **e})[5:]) for e in entries]
        answer: dict[str, Any] = applier.manifest(frames, "sha256")
        return answer

    return applier, root, manifest


def test_a_partial_nothing_resumes_goes_at_the_pass_end(tmp_path: Path) -> None:
    """A large file cut off mid-transfer leaves a partial for the next pass to resume. When
    by then its name is a directory or a symlink, nothing resumes it, and it stayed in the
    destination for good; the pass's end removes it. One a file is received into stays."""
    applier, root, manifest = _applier(tmp_path)
    for name in (b"big", b"dir", b"was-big"):
        (root / os.fsdecode(partial_name(name))).write_bytes(os.urandom(4096))
    needs = manifest(
        {"i": 0, "p": b"", "t": "d", "m": 0o40755, "s": 0, "c": [b"big", b"dir", b"was-big"]},
        {"i": 1, "p": b"big", "t": "f", "m": 0o100644, "s": 8 * MiB},
        {"i": 2, "p": b"was-big", "t": "l", "m": 0o120777, "s": 0, "l": b"big"},
        {"i": 3, "p": b"dir", "t": "d", "m": 0o40755, "s": 0, "c": []},
    )["needs"]
    assert [n[0] for n in needs] == [1] and needs[0][-1] == "partial", needs
    assert applier.finish()["stale_partials"] == 2
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".rehost-")) == [
        os.fsdecode(partial_name(b"big"))
    ]


def test_a_file_the_receiver_cannot_size_or_open_keeps_no_descriptor(tmp_path: Path) -> None:
    """DATA for a size the filesystem cannot hold (32 TiB on this ext4: EFBIG) left its file
    open, one descriptor per request until the receiver ran out. A device node the agent
    planted at a file's partial name was opened read-write (truncated, then left open); the
    partial is now made anew, never opened."""
    applier, root, manifest = _applier(tmp_path)
    top = {"i": 0, "p": b"", "t": "d", "m": 0o40755}
    before = set(os.listdir("/proc/self/fd"))
    for name in (b"big0", b"big1", b"big2"):
        manifest({**top, "c": [name]}, {"i": 1, "p": name, "t": "f", "s": 1 << 45})
        with pytest.raises(OSError) as err:
            applier.data(applier.batch, iter([(DATA, b'{"i":1}')]))
        assert err.value.errno == errno.EFBIG
    assert set(os.listdir("/proc/self/fd")) == before
    planted = partial_name(b"dev")
    node = {"i": 2, "p": planted, "t": "c", "m": 0o20600, "r": os.makedev(1, 3)}
    size = DELTA_MIN_SIZE + 1
    for first in (10, size):  # the second manifest finds the partial: it is written into
        manifest({**top, "c": [b"dev", planted]}, {"i": 1, "p": b"dev", "t": "f", "s": first}, node)
    assert applier.pending[1][3] == "partial", applier.pending
    assert stat.S_ISCHR(os.lstat(root / os.fsdecode(planted)).st_mode)
    end = {"i": 1, "hash": FileDigest("sha256", size).hexdigest(), "alg": "sha256"}
    frames = [(DATA, b'{"i":1}'), (END, json.dumps(end).encode())]
    assert applier.data(applier.batch, iter(frames))["files"] == 1
    assert (root / "dev").read_bytes() == bytes(size)
    assert not (root / os.fsdecode(planted)).exists()
    assert set(os.listdir("/proc/self/fd")) == before


def test_a_manifest_is_bounded_in_xattrs_and_file_sizes(tmp_path: Path) -> None:
    """One manifest within its byte limit, of files with 65535 2-byte xattr names each, took
    1 GB as objects; a file size of 2^62 made END hash zeros for about a day."""
    from rehost.online import protocol

    _, root, manifest = _applier(tmp_path)
    top = {"i": 0, "p": b"", "t": "d", "m": 0o40755, "c": [b"f"]}
    many = {f"user.{k:05d}": b"" for k in range(6000)}  # 66,000 bytes of names with NULs
    with pytest.raises(ProtocolError) as err:
        manifest(top, {"i": 1, "p": b"f", "t": "f", "x": many})
    assert err.value.code == "BAD_ENTRY" and "64 KiB" in str(err.value)
    some = dict(list(many.items())[:5000])
    count = protocol.MAX_MANIFEST_XATTRS // 5000 + 1
    files = [{"i": k, "p": b"f%d" % k, "t": "f", "x": some} for k in range(1, count + 1)]
    with pytest.raises(ProtocolError) as err:
        manifest({**top, "c": [f["p"] for f in files]}, *files)
    assert err.value.code == "BAD_FRAME" and "xattrs" in str(err.value)
    for size, ok in ((protocol.MAX_FILE_SIZE, True), (protocol.MAX_FILE_SIZE + 1, False)):
        entry = encode_entry({**top, "i": 1, "p": b"f", "t": "f", "s": size, "c": []})
        if ok:
            assert decode_entry(entry[5:])["s"] == size
        else:
            with pytest.raises(ProtocolError, match="1 PiB"):
                decode_entry(entry[5:])
    assert not [p for p in root.iterdir()]


def test_attributes_come_from_the_file_the_walk_saw(tmp_path: Path) -> None:
    """The same swap between the walk's lstat and its read of the attributes: another
    file's (root's security.capability, here a user.* stand-in) must not be taken for the
    user's. Read by path, they were."""
    from rehost.online.agent import transfer

    home, other = tmp_path / "home", tmp_path / "sbin"
    (home / "d").mkdir(parents=True)
    other.mkdir()
    for where, value in ((home / "d", b"mine"), (other, b"cap_setuid+ep")):
        (where / "x").write_bytes(b"#!/bin/sh\n")
        os.setxattr(where / "x", "user.rehost-test", value)
    path = os.fsencode(home / "d" / "x")
    st = os.lstat(path)  # what the walk saw
    assert transfer._xattrs(path, st) == {"user.rehost-test": b"mine"}
    (home / "d").rename(home / "old")
    (home / "d").symlink_to(other)
    assert transfer._xattrs(path, st) == {}  # not cap_setuid+ep
    assert transfer._xattrs(path, os.lstat(path)) == {"user.rehost-test": b"cap_setuid+ep"}


def test_a_directory_the_agent_cannot_list_keeps_its_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An I/O error listing a source directory (a failing disk) flags its entry "unlisted",
    and the receiver then deletes nothing in it; the same empty list unflagged empties it."""
    from rehost.online.agent import transfer
    from rehost.online.receiver.apply import FsApplier

    src = tmp_path / "src"
    (src / "sick").mkdir(parents=True)
    (src / "sick" / "a").write_text("a")
    real = os.listdir

    def failing(path: Any) -> Any:  # the walk lists a directory through its descriptor
        where = os.readlink(f"/proc/self/fd/{path}") if isinstance(path, int) else path
        if os.fsencode(where).endswith(b"/sick"):
            raise OSError(errno.EIO, "Input/output error")
        return real(path)

    monkeypatch.setattr(os, "listdir", failing)
    logged: list[str] = []
    entries = [
        e for e, _ in transfer._Walker(str(src), [], lambda level, m: logged.append(m)).walk()
    ]
    sick = next(e for e in entries if e["p"] == b"sick")
    assert sick["unlisted"] and sick["c"] == [], sick
    assert "nothing in it is sent or deleted" in logged[0]
    monkeypatch.setattr(os, "listdir", real)

    dst = tmp_path / "dst"
    (dst / "sick").mkdir(parents=True)
    (dst / "sick" / "a").write_text("a")
    applier = FsApplier("root", dst, tmp_path / "state")
    for i, entry in enumerate(entries):
        entry["i"] = i
    applier.manifest([(ENTRY, encode_entry(e)[5:]) for e in entries], "xxh128")
    assert (dst / "sick" / "a").exists()
    del sick["unlisted"]
    applier.manifest([(ENTRY, encode_entry(e)[5:]) for e in entries], "xxh128")
    assert not (dst / "sick" / "a").exists()
    applier.close()


def test_a_directory_the_agent_cannot_open_is_sent_unlisted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent run as a user gets EACCES opening another's directory (root, as in these
    tests, does not: the refusal is injected): its entry still goes, unlisted, with its
    metadata, and the walk goes on."""
    from rehost.online.agent import transfer

    src = tmp_path / "src"
    (src / "private" / "inner").mkdir(parents=True)
    (src / "z").write_text("z")
    real = transfer._open_dir

    def refusing(path: bytes, nofollow: bool) -> int:
        if path.endswith(b"/private"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(path, nofollow)

    monkeypatch.setattr(transfer, "_open_dir", refusing)
    logged: list[str] = []
    walker = transfer._Walker(str(src), [], lambda level, m: logged.append(m))
    entries = {e["p"]: e for e, _ in walker.walk()}
    assert sorted(entries) == [b"", b"private", b"z"]
    private = entries[b"private"]
    assert private["unlisted"] and private["c"] == [] and private["x"] == {}, private
    assert private["m"] == os.lstat(src / "private").st_mode
    assert len(logged) == 1 and "cannot list" in logged[0], logged


@pytest.mark.parametrize("alg", ["xxh128", "sha256"])
@pytest.mark.parametrize(
    "layout",
    [
        [],  # empty
        [(0, 1000)],
        [(0, CHUNK_SIZE)],
        [(CHUNK_SIZE - 10, 20)],  # one piece over a block edge
        [(5, 300), (70_000, 90_000), (3 * CHUNK_SIZE + 4096, CHUNK_SIZE + 7)],
        [(2 * CHUNK_SIZE, CHUNK_SIZE)],  # a data block of zeros between holes
    ],
)
def test_file_digest_is_over_blocks_and_holes_cost_nothing(
    tmp_path: Path, alg: str, layout: list[tuple[int, int]]
) -> None:
    """END's hash of a file is over its block hashes, a hole hashing as zeros: from the file
    re-read, from its pieces fed in order however they are cut, and never from pieces out
    of order or across a block edge."""
    size = max([off + n for off, n in layout] + [0]) + 12_345
    content = bytearray(size)
    path = tmp_path / "f"
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in layout:
            piece = bytes(n) if off == 2 * CHUNK_SIZE else os.urandom(n)
            content[off : off + n] = piece
            f.seek(off)
            f.write(piece)
    want = _digest_by_definition(alg, bytes(content))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert file_digest(fd, size, alg) == want
    finally:
        os.close(fd)
    rng = random.Random(size)
    fed = FileDigest(alg, size)
    for start, end in [(o, o + n) for o, n in layout if n]:
        pos = start
        while pos < end:  # random cuts, none across a block edge
            edge = pos - pos % CHUNK_SIZE + CHUNK_SIZE
            stop = min(end, edge, pos + rng.randint(1, CHUNK_SIZE))
            assert fed.feed(pos, content[pos:stop])
            pos = stop
    assert fed.hexdigest() == want
    if size > CHUNK_SIZE:
        late = FileDigest(alg, size)
        assert late.feed(CHUNK_SIZE, bytes(10))
        assert not late.feed(0, bytes(10))  # out of order
        assert not late.feed(2 * CHUNK_SIZE - 5, bytes(10))  # across a block edge


@pytest.mark.parametrize("block", [128 * 1024, 4 * CHUNK_SIZE])
def test_block_digests_read_in_pieces_agree_with_whole_blocks(tmp_path: Path, block: int) -> None:
    """Delta block hashes, read a piece at a time, are those of the whole blocks, holes and
    stored zeros alike."""
    size = 3 * 4 * CHUNK_SIZE + 777
    content = bytearray(size)
    path = tmp_path / "f"
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in [(100, 5000), (CHUNK_SIZE + 3, 2 * CHUNK_SIZE), (size - 10, 10)]:
            piece = os.urandom(n)
            content[off : off + n] = piece
            f.seek(off)
            f.write(piece)
        f.seek(9 * CHUNK_SIZE)
        f.write(bytes(CHUNK_SIZE))  # stored zeros
    fd = os.open(path, os.O_RDONLY)
    try:
        got = list(block_digests(fd, size, block, "xxh128"))
    finally:
        os.close(fd)
    want = []
    for off in range(0, size, block):
        data = bytes(content[off : off + block])
        want.append((off, block_hash("xxh128", data)))
    assert got == want


@settings(max_examples=400, deadline=None)
@given(
    pieces=st.lists(
        st.tuples(
            st.sampled_from("bcae"), st.integers(0, 5 * 64 - 1), st.integers(1, 80), st.booleans()
        ),
        max_size=12,
    )
)
def test_delta_block_tracking_never_vouches_for_a_wrong_hash(
    pieces: list[tuple[str, int, int, bool]],
) -> None:
    """Whatever pieces a DELTA brings (in order or not, data or zeros, across blocks or
    not), a block hash the receiver keeps is that of the block as written; where it cannot
    tell, the hash is None and END re-reads the file."""
    from rehost.online.receiver.apply import _Incoming

    block, size = 64, 5 * 64 - 7  # the last block is short
    content = bytearray(os.urandom(size))
    incoming = _Incoming(-1, -1, b"f", None, {}, size)
    incoming.block = block
    incoming.hashes = [block_hash("xxh128", content[o : o + block]) for o in range(0, size, block)]
    end = 0
    for where, at, length, zero in pieces:
        # from a block's start, from the last piece's end, from anywhere, or to a block's end
        offset = {"b": at // block * block, "c": end, "a": at, "e": at}[where]
        if where == "e":
            length = block - offset % block
        length = min(length, size - offset) if offset < size else 0
        if not length:
            continue
        data = bytes(length) if zero else os.urandom(length)
        content[offset : offset + length] = data
        incoming.note_piece("xxh128", offset, length, None if zero else data)
        end = offset + length
    for k, kept in enumerate(incoming.hashes or []):
        if kept is not None:
            assert kept == block_hash("xxh128", content[k * block : k * block + block]), k


def test_a_terabyte_hole_hashes_in_its_block_count() -> None:
    """1 TiB of holes: the digest is that of its 2^20 zero blocks, without hashing 1 TiB."""
    size = 1 << 40
    start = time.process_time()
    fed = FileDigest("sha256", size)
    assert fed.feed(size - 3, b"end")
    got = fed.hexdigest()
    spent = time.process_time() - start
    zero = zero_block_hash("sha256", CHUNK_SIZE)
    last = block_hash("sha256", bytes(CHUNK_SIZE - 3) + b"end")
    assert got == blocks_digest("sha256", [zero] * (size // CHUNK_SIZE - 1) + [last])
    assert spent < 5, spent  # sha256 over the zeros themselves: ~10 minutes


def test_new_small_file_written_in_place_is_resent_after_an_interruption(tmp_path: Path) -> None:
    """A small file the destination lacks is created under its own name (no partial); cut
    off mid-stream it keeps a fresh mtime, so the next manifest asks for it again; a hash
    mismatch zeroes its mtime; a complete one gets owner, mode and times exactly."""
    from rehost.online.protocol import CHUNK, DATA, END, chunk_frame, encode_frame
    from rehost.online.receiver.apply import FsApplier

    root = tmp_path / "dst"
    root.mkdir()
    applier = FsApplier("root", root, tmp_path / "state")
    content = os.urandom(10000)
    mt = 1_600_000_000_123_456_789
    entries = [
        {"i": 0, "p": b"", "t": "d", "m": 0o40755, "u": 0, "g": 0, "s": 0, "mt": mt, "at": mt,
         "x": {}, "c": [b"f"]},
        {"i": 1, "p": b"f", "t": "f", "m": 0o104750, "u": 1234, "g": 4321, "s": 12000,
         "mt": mt, "at": mt, "x": {}},
    ]  # fmt: skip

    def manifest() -> list[Any]:
        frames = [(ENTRY, encode_entry(e)[5:]) for e in entries]  # without the frame head
        needs: list[Any] = applier.manifest(frames, "sha256")["needs"]
        return needs

    def broken() -> Iterator[tuple[bytes, bytes]]:
        yield DATA, b'{"i":1}'
        yield CHUNK, chunk_frame(0, 0, content[:4000])[5:]
        raise ConnectionResetError("cut off")

    assert manifest() == [[1, "full"]]
    with pytest.raises(ConnectionResetError):
        applier.data(applier.batch, broken())
    st = os.lstat(root / "f")
    assert st.st_mtime_ns != mt
    assert not [p for p in os.listdir(root) if p.startswith(".rehost-")]

    def stream(digest: str) -> list[tuple[bytes, bytes]]:
        end = {"i": 1, "hash": digest, "alg": "sha256"}
        return [(DATA, b'{"i":1}'), (CHUNK, chunk_frame(0, 0, content)[5:]),
                (END, encode_frame(END, json.dumps(end).encode())[5:])]  # fmt: skip

    full = content + bytes(2000)  # the last 2000 bytes are a hole
    (root / "f").unlink()
    assert manifest() == [[1, "full"]]
    assert applier.data(applier.batch, stream("0" * 64))["failed"] == [1]
    assert os.lstat(root / "f").st_mtime_ns == 0
    assert manifest() == [[1, "full"]]  # exists now: received into a partial, renamed
    good = hashlib.sha256(full).hexdigest()
    assert applier.data(applier.batch, stream(good)) == {"files": 1, "bytes": 10000, "failed": []}
    (root / "f").unlink()
    assert manifest() == [[1, "full"]]  # absent again: created in place
    assert applier.data(applier.batch, stream(good))["files"] == 1
    st = os.lstat(root / "f")
    assert (root / "f").read_bytes() == full
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 4321, 0o4750)
    assert (st.st_mtime_ns, st.st_atime_ns) == (mt, mt)
    assert manifest() == []
    assert sorted(os.listdir(root)) == ["f"]
    applier.close()


def test_a_small_file_goes_as_one_file_frame(tmp_path: Path) -> None:
    """A file of at most a chunk and no holes goes as one FILE frame (protocol 7), its
    zeros as no data; a sparse one and a larger one go as DATA, CHUNKs and END. The
    receiver lands each byte-exact (the zero file sparse) and refuses a FILE that is
    garbled, not asked for, longer than its size or inside another file."""
    import io
    from types import SimpleNamespace

    from rehost.online.agent import transfer
    from rehost.online.protocol import FILE, file_head, read_frames
    from rehost.online.receiver.apply import FsApplier

    src, root = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    root.mkdir()
    files = {
        "small": os.urandom(10_000),
        "zeros": bytes(5000),
        "empty": b"",
        "chunk": os.urandom(CHUNK_SIZE),
        "big": os.urandom(CHUNK_SIZE + 1),
    }
    for name, content in files.items():
        (src / name).write_bytes(content)
    with open(src / "sparse", "wb") as f:
        f.truncate(CHUNK_SIZE)
        f.write(b"head")
    files["sparse"] = b"head" + bytes(CHUNK_SIZE - 4)
    names = sorted(files)
    mt = 1_600_000_000_123_456_789
    entries = [{"i": 0, "p": b"", "t": "d", "m": 0o40755, "u": 0, "g": 0, "s": 0, "mt": mt,
                "at": mt, "x": {}, "c": [n.encode() for n in names]}]  # fmt: skip
    entries += [{"i": k, "p": n.encode(), "t": "f", "m": 0o100640, "u": 0, "g": 0,
                 "s": len(files[n]), "mt": mt, "at": mt, "x": {}}
                for k, n in enumerate(names, 1)]  # fmt: skip
    applier = FsApplier("root", root, tmp_path / "state")
    client = SimpleNamespace(hash_alg="xxh128", payload_bytes=0)
    stats = dict.fromkeys(["bytes_sent", "files_sent", "delta_files", "unreadable", "changed"], 0)
    sender = transfer._Sender(client, transfer._Compressor("auto"), stats, None)
    needs = applier.manifest([(ENTRY, encode_entry(e)[5:]) for e in entries], "xxh128")["needs"]
    assert len(needs) == len(names)
    kinds: dict[str, list[bytes]] = {}
    wire = bytearray()
    sender.compressor.new_stream()
    for need in needs:
        path = os.fsencode(src / names[need[0] - 1])
        st = os.stat(path)
        ident = transfer._identity(st)
        frames = list(sender.frames(need[0], path, st.st_size, need, ident))
        wire += b"".join(b"".join(f) if isinstance(f, tuple) else f for f in frames)
        kinds[names[need[0] - 1]] = [(f[0] if isinstance(f, tuple) else f)[:1] for f in frames]
    sender.compressor.end_stream()
    for name in ("small", "zeros", "empty", "chunk"):
        assert kinds[name] == [FILE], (name, kinds[name])
    assert kinds["big"][0] == kinds["sparse"][0] == DATA
    got = applier.data(applier.batch, read_frames(io.BytesIO(bytes(wire))))
    # the sparse file sends its one data page
    assert got == {"files": 6, "bytes": 10_000 + 2 * CHUNK_SIZE + 1 + 4096, "failed": []}
    for name in names:
        assert (root / name).read_bytes() == files[name], name
        assert os.stat(root / name).st_mtime_ns == mt
    assert os.stat(root / "zeros").st_blocks == 0

    # a FILE the receiver must refuse, each after a manifest that asks for "small" again
    small = files["small"]

    def frame(index: int, digest: str, data: bytes) -> tuple[bytes, bytes]:
        return FILE, (file_head(index, 0, digest, len(data)) + data)[5:]

    def asked() -> int:
        (root / "small").unlink(missing_ok=True)
        answer = applier.manifest([(ENTRY, encode_entry(e)[5:]) for e in entries], "xxh128")
        return int(next(n[0] for n in answer["needs"] if names[n[0] - 1] == "small"))

    i = asked()
    right = hashlib.sha256(small).hexdigest()  # the manifest chose xxh128: no match
    assert applier.data(applier.batch, iter([frame(i, right, small)]))["failed"] == [i]
    cases: list[list[tuple[bytes, bytes]]] = [
        [frame(i + 100, "ab", small)],  # not asked for
        [frame(i, "ab", small + b"x")],  # longer than its size
        [(DATA, b'{"i":%d}' % i), frame(i, "ab", small)],  # inside another file
        [(FILE, b"\0\0")],  # short
        [(FILE, file_head(i, 0, "not hex!", 0)[5:])],
    ]
    for bad in cases:
        i = asked()
        with pytest.raises(ProtocolError) as exc:
            applier.data(applier.batch, iter(bad))
        assert exc.value.code == "BAD_FRAME", (bad[0][1][:20], exc.value)
    applier.close()


def test_delta_end_hash_is_checked_over_block_hashes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DELTA's END hash is over the block hashes of the final content: the receiver checks
    it from the hashes it kept and the blocks it received, or, when a chunk comes off the
    block grid, by re-reading the patched file; a wrong one fails the file."""
    from rehost.online.protocol import CHUNK, DELTA, END, chunk_frame, zero_frame
    from rehost.online.receiver import apply
    from rehost.online.receiver.apply import FsApplier

    reads: list[int] = []  # files read for their block hashes: the manifest's, and re-reads
    real = apply._block_hashes

    def counted(*args: Any) -> list[str]:
        reads.append(1)
        return real(*args)

    monkeypatch.setattr(apply, "_block_hashes", counted)
    root = tmp_path / "dst"
    root.mkdir()
    applier = FsApplier("root", root, tmp_path / "state")
    size = DELTA_MIN_SIZE + 100_000  # the last block is partial
    block = delta_block_size(size)
    old = os.urandom(size)
    (root / "big").write_bytes(old)
    os.utime(root / "big", ns=(1, 1))
    mt = 1_700_000_000_000_000_000

    def patched(*changes: tuple[int, bytes]) -> bytes:
        data = bytearray(old)
        for off, piece in changes:
            data[off : off + len(piece)] = piece
        return bytes(data)

    def run(chunks: list[bytes], digest: str) -> dict[str, Any]:
        entries = [
            {"i": 0, "p": b"", "t": "d", "m": 0o40755, "mt": mt, "at": mt, "c": [b"big"]},
            {"i": 1, "p": b"big", "t": "f", "m": 0o100644, "s": size, "mt": mt, "at": mt},
        ]
        needs = applier.manifest([(ENTRY, encode_entry(e)[5:]) for e in entries], "xxh128")
        assert needs["needs"][0][:3] == [1, "delta", block]
        end = json.dumps({"i": 1, "hash": digest, "alg": "xxh128"}).encode()
        frames = [(DELTA, b'{"i":1}'), *[(CHUNK, c[5:]) for c in chunks], (END, end)]
        result: dict[str, Any] = applier.data(applier.batch, frames)
        return result

    def digest_of(content: bytes) -> str:
        hashes = [block_hash("xxh128", content[o : o + block]) for o in range(0, size, block)]
        return blocks_digest("xxh128", hashes)

    new = patched((block, os.urandom(block)), (3 * block, bytes(block)))
    on_grid = [chunk_frame(block, 0, new[block : 2 * block]), zero_frame(3 * block, block)]
    assert run(on_grid, "0" * 32)["failed"] == [1]  # a wrong digest fails the file
    (root / "big").write_bytes(old)
    os.utime(root / "big", ns=(1, 1))
    reads.clear()
    assert run(on_grid, digest_of(new)) == {"files": 1, "bytes": block, "failed": []}
    assert (root / "big").read_bytes() == new
    assert len(reads) == 1  # the manifest's answer; END needed no re-read
    old = new
    os.utime(root / "big", ns=(2, 2))
    new = patched((5, b"off the grid"))
    reads.clear()
    assert run([chunk_frame(5, 0, b"off the grid")], digest_of(new))["failed"] == []
    assert (root / "big").read_bytes() == new
    assert len(reads) == 2  # off the grid: END re-read the patched file
    # a block in pieces (the agent cuts blocks larger than 1 MiB), a data piece then a zero
    # run: hashed as they come; the same pieces out of order: END re-reads
    half = block // 2
    for k, order in [(2, 1), (4, -1)]:
        old = new
        os.utime(root / "big", ns=(k, k))
        piece = os.urandom(half)
        new = patched((k * block, piece + bytes(half)))
        pieces = [chunk_frame(k * block, 0, piece), zero_frame(k * block + half, half)]
        reads.clear()
        assert run(pieces[::order], "0" * 32)["failed"] == [1]
        os.utime(root / "big", ns=(k, k))
        reads.clear()
        assert run(pieces[::order], digest_of(new))["failed"] == []
        assert (root / "big").read_bytes() == new
        assert len(reads) == (1 if order == 1 else 2)
    applier.close()


_VALID_ENTRIES: list[dict[str, Any]] = [
    {"i": 0, "p": b"", "t": "d", "m": 0o40755, "c": [b"a", b"b\xff"], "x": {"user.k": b"v"}},
    {"i": 1, "p": b"a/b", "t": "f", "m": 0o100644, "s": 5, "mt": -1, "n": 2},
    {"i": 2, "p": b"l", "t": "l", "l": b"../../etc/passwd", "x": {"security.selinux": b"c"}},
    {"i": 3, "p": b"h", "t": "h", "h": b"a/b"},
]


def _safe(parts: list[bytes]) -> bool:
    return all(p not in (b"", b".", b"..") and b"/" not in p and b"\0" not in p for p in parts)


@settings(max_examples=400, deadline=None)
@given(
    which=st.integers(0, len(_VALID_ENTRIES) - 1),
    cut=st.integers(0, 200),
    at=st.integers(0, 200),
    byte=st.integers(0, 255),
    tail=st.binary(max_size=8),
)
def test_entry_decoding_rejects_malformed_entries(
    which: int, cut: int, at: int, byte: int, tail: bytes
) -> None:
    """Round trips hold; a truncated, overwritten or extended entry is either refused with
    BAD_ENTRY or BAD_PATH or decodes to paths and names that stay inside the root."""
    payload = encode_entry(_VALID_ENTRIES[which])[5:]
    decoded = decode_entry(payload)
    assert decoded["i"] == which and decoded["p"] == os.fsdecode(_VALID_ENTRIES[which]["p"])
    mutated = bytearray(payload[: max(cut, 1)] if cut < len(payload) else payload)
    if at < len(mutated):
        mutated[at] = byte
    mutated += tail
    try:
        entry = decode_entry(bytes(mutated))
    except ProtocolError as e:
        assert e.code in ("BAD_ENTRY", "BAD_PATH")
        return
    assert _safe(entry["parts"]) and _safe(entry.get("h", [b"x"])) and _safe(entry.get("c", []))


def test_a_huge_child_list_costs_its_frame(tmp_path: Path) -> None:
    """A directory entry listing 500,000 names is applied without a Python object per name
    (a list and a set of them took ~25x the frame); what the destination has and the list
    lacks is deleted, and a listed file's partial is kept for its resume."""
    import tracemalloc

    from rehost.online.receiver import apply

    root = tmp_path / "dst"
    root.mkdir()
    here = [b"a", b"ff", b"not-listed", partial_name(b"a"), partial_name(b"not-listed")]
    for name in here:
        (root / os.fsdecode(name)).write_bytes(b"x")
    names = [b"%x" % k for k in range(500_000)]
    payload = encode_entry({"i": 0, "p": b"", "t": "d", "m": 0o40755, "c": names})[5:]
    del names
    applier = apply.FsApplier("root", root, tmp_path / "state")
    tracemalloc.start()
    try:
        assert applier.manifest([(ENTRY, payload)], "sha256")["deleted"] == 2
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    applier.close()
    assert sorted(os.listdir(root)) == sorted(os.fsdecode(n) for n in here[:2] + here[3:4])
    assert peak < len(payload) // 2, (peak, len(payload))


def test_a_directory_listed_in_slices_deletes_after_its_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A huge directory's names come in slices over several manifests (sizes lowered here).
    The receiver deletes what no slice listed only after the last one, keeping a listed
    file's partial; for a listing whose first slice it missed (it restarted), it deletes
    nothing, and the next pass does."""
    from rehost.online import protocol
    from rehost.online.agent import transfer
    from rehost.online.receiver.apply import FsApplier

    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "big").mkdir(parents=True)
    names = {f"l-{k:03d}" for k in range(60)}
    for name in names:
        os.symlink("target-" + name, src / "big" / name)
    (dst / "big" / "zzz-old").mkdir(parents=True)
    (dst / "big" / "zzz-old" / "f").write_text("x")
    kept_partial = os.fsdecode(partial_name(b"l-059"))
    extra = {"a-stale", "zzz-old", kept_partial, os.fsdecode(partial_name(b"gone"))}
    for name in extra - {"zzz-old"} | {"l-030"}:
        (dst / "big" / name).write_text("x")
    monkeypatch.setattr(protocol, "CHILD_SLICE_BYTES", 60)  # ~10 names a slice
    monkeypatch.setattr(transfer, "BATCH_BYTES", 1)  # every entry a manifest of its own
    walk = transfer._batches(transfer._Walker(str(src), [], None))
    batches = [[(ENTRY, frame[5:]) for frame in frames] for _, frames in walk]
    entries = [decode_entry(frames[0][1]) for frames in batches]
    slices = [k for k, e in enumerate(entries) if e["t"] == "d" and e["p"] == "big"]
    assert len(slices) >= 3 and slices == list(range(slices[0], slices[-1] + 1))

    def apply(applier: FsApplier, part: list[list[tuple[bytes, bytes]]]) -> None:
        for frames in part:
            applier.manifest(frames, "sha256")

    def here() -> set[str]:
        return set(os.listdir(dst / "big"))

    applier = FsApplier("root", dst, tmp_path / "state")
    apply(applier, batches[: slices[-1]])  # every slice but the last: nothing deleted yet
    assert extra <= here()
    applier.close()
    applier = FsApplier("root", dst, tmp_path / "state")  # restarted: the first slice missed
    apply(applier, batches[slices[-1] :])
    assert here() == names | extra and os.path.islink(dst / "big" / "l-030")
    apply(applier, batches)  # the next pass, seen whole
    assert here() == names | {kept_partial}
    assert all(os.readlink(dst / "big" / n) == "target-" + n for n in names)
    applier.close()


def test_a_garbled_or_inflating_chunk_is_bad_frame() -> None:
    """A chunk whose data does not decode is BAD_FRAME, and so is one that decodes to more
    than a chunk, however it was made to: a zstd frame declaring a huge size or window
    (zstandard would allocate it), or runs of zeros (a few KB of zstd can fill gigabytes).
    The receiver never holds more than about a chunk for it."""
    import tracemalloc
    import zlib

    import zstandard

    from rehost.online.protocol import CHUNK_SIZE, CODEC_ZLIB, CODEC_ZSTD, MAX_FRAME
    from rehost.online.receiver.apply import _Decoder

    bomb = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(MAX_FRAME + 1))
    stream = zstandard.ZstdCompressor().compressobj()
    over = stream.compress(bytes(CHUNK_SIZE + 1)) + stream.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    header = bytes.fromhex("28b52ffd e0") + (1 << 60).to_bytes(8, "little") + bytes(3)
    cases = [
        (CODEC_ZLIB, b"\x78\x9c not deflate"),
        (CODEC_ZLIB, zlib.compress(b"data")[:-1] + b"\0"),  # a wrong check value
        (CODEC_ZLIB, zlib.compress(bytes(CHUNK_SIZE + 1))),
        (CODEC_ZSTD, b"not zstd"),
        (CODEC_ZSTD, bomb),
        (CODEC_ZSTD, over),
        (CODEC_ZSTD, header),
    ]
    tracemalloc.start()
    try:
        for codec, data in cases:
            with pytest.raises(ProtocolError) as exc:
                _Decoder().decode(codec, memoryview(data))
            assert exc.value.code == "BAD_FRAME", (codec, exc.value)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB, peak


def test_zstd_chunks_are_one_stream_per_data_stream() -> None:
    """The agent's chunks of one data stream, zstd against what came before (incompressible
    ones too, as zstd's stored blocks), decode in order to exactly what was read; a chunk
    skipped as raw does not disturb the stream; a new data stream starts afresh."""
    from rehost.online.agent.transfer import _Compressor
    from rehost.online.protocol import CHUNK_SIZE, CODEC_RAW, CODEC_ZSTD
    from rehost.online.receiver.apply import _Decoder

    rng = random.Random(7)
    text = b" ".join(b"word%d" % rng.randrange(400) for _ in range(300_000))
    pieces = [
        text[:CHUNK_SIZE],
        os.urandom(CHUNK_SIZE),
        bytes(CHUNK_SIZE),
        text[5:4000],
        b"x" * 100,
    ]
    pieces += [os.urandom(rng.randrange(64, CHUNK_SIZE)) for _ in range(12)]  # until it skips
    pieces += [text[i : i + 20_000] for i in range(0, 400_000, 20_000)]
    packer = _Compressor("auto")  # no client: the link counts as slow, so it compresses
    for _stream in range(2):
        packer.new_stream()
        decoder = _Decoder()
        codecs = set()
        for data in pieces:
            codec, packed = packer.pack(data)
            codecs.add(codec)
            assert bytes(decoder.decode(codec, memoryview(packed))) == data
        packer.end_stream()
        assert codecs == {CODEC_ZSTD, CODEC_RAW}
    # later text pieces compress against the first one: a small file's worth of gain
    later = text[5000:25000]
    packer.new_stream()
    alone = len(packer.pack(later)[1])
    packer.new_stream()
    packer.pack(text[:CHUNK_SIZE])
    assert len(packer.pack(later)[1]) < alone / 2


def test_a_data_streams_zstd_decoder_is_freed_with_it() -> None:
    """zstandard's stream writer is invisible to Python's cycle collector, so a decoder kept
    by a reference cycle held about 1 MB of native memory for the receiver's life, one per
    data request that used zstd. It goes with its stream, and 300 streams leave RSS flat."""
    import gc
    import weakref

    import zstandard

    from rehost.online.protocol import CODEC_ZSTD
    from rehost.online.receiver.apply import _Decoder

    stream = zstandard.ZstdCompressor().compressobj()
    packed = stream.compress(os.urandom(100) * 5000)
    packed += stream.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)

    def rss_kib() -> int:
        return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0])

    gc.disable()
    try:
        decoder = _Decoder()
        assert len(decoder.decode(CODEC_ZSTD, memoryview(packed))) == 500_000
        sink = weakref.ref(decoder._sink)  # the writer holds it while it lives
        del decoder
        assert sink() is None
    finally:
        gc.enable()
    before = rss_kib()
    for _ in range(300):
        assert len(_Decoder().decode(CODEC_ZSTD, memoryview(packed))) == 500_000
    assert rss_kib() - before < 32 * 1024  # it grew by about 300 MB before


def test_receiver_bounds_what_a_manifest_may_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An xattr value over Linux's 64 KiB is BAD_ENTRY; a manifest of more entries, or more
    bytes of them, than the receiver keeps is BAD_FRAME (the caps are lowered here)."""
    from rehost.online.receiver import apply

    big = {"i": 0, "p": b"f", "t": "f", "x": {"user.big": bytes(64 * 1024 + 1)}}
    with pytest.raises(ProtocolError) as exc:
        decode_entry(encode_entry(big)[5:])
    assert exc.value.code == "BAD_ENTRY"
    big["x"] = {"user.big": bytes(64 * 1024)}
    assert len(decode_entry(encode_entry(big)[5:])["x"]["user.big"]) == 64 * 1024

    monkeypatch.setattr(apply, "MAX_MANIFEST_ENTRIES", 3)
    root = tmp_path / "dst"
    root.mkdir()
    applier = apply.FsApplier("root", root, tmp_path / "state")
    names = [b"a", b"b", b"c"]
    entries = [{"i": 0, "p": b"", "t": "d", "m": 0o40755, "c": names}]
    entries += [{"i": k + 1, "p": n, "t": "p", "m": 0o10644} for k, n in enumerate(names)]
    frames = [(ENTRY, encode_entry(e)[5:]) for e in entries]
    assert applier.manifest(frames[:3], "sha256")["applied"] == 3
    with pytest.raises(ProtocolError) as exc:
        applier.manifest(frames, "sha256")
    assert exc.value.code == "BAD_FRAME" and "at most 3 entries" in exc.value.message
    monkeypatch.setattr(apply, "MAX_MANIFEST_ENTRIES", 20)
    monkeypatch.setattr(apply, "MAX_MANIFEST_BYTES", sum(len(f[1]) for f in frames[:3]))
    assert applier.manifest(frames[:3], "sha256")["applied"] == 3
    with pytest.raises(ProtocolError) as exc:
        applier.manifest(frames, "sha256")
    assert exc.value.code == "BAD_FRAME" and "take at most" in exc.value.message
    applier.close()
