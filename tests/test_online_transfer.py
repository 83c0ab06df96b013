"""The transfer core end to end: an agent in one network namespace, a receiver in another.

Both run as subprocesses (so they can be killed with -9), the agent syncing a generated
tree with every kind of entry and attribute into a plain directory on the receiver. The
oracle is `rsync -aHAXn -c --itemize-changes --numeric-ids`, which must list nothing, plus a
walk comparing what rsync does not (nanosecond times, directory times).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from netns import NetnsPair, netns_pair
from rehost.online.protocol import (
    DELTA_MIN_SIZE,
    ENTRY,
    block_hash,
    delta_block_size,
    json_frame,
    partial_name,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")

PY = str(Path(sys.executable))
TOKEN = "s3cret-token-for-tests"
EXCLUDES = ["/proc/*", "/tmp/*"]
MiB = 1024 * 1024

AGENT = r"""
import json, sys
from rehost.online.agent.client import ReceiverClient
from rehost.online.agent.transfer import sync_filesystem
from rehost.online.protocol import AgentError
a = json.loads(sys.argv[1])
c = ReceiverClient(a["addr"], a["token"], a["fp"], limit_kbps=a.get("limit", 0),
                   retry_seconds=a.get("retry", 60))
try:
    s = sync_filesystem(c, "root", a["root"], a["excludes"], a.get("compression", "auto"),
                        log=lambda m: print(m, file=sys.stderr, flush=True))
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
from rehost.online.receiver.server import serve
a = json.loads(sys.argv[1])
logging.basicConfig(level=logging.INFO, filename=a["log"], format="%(asctime)s %(message)s")
serve(a["listen"], a["token"], Path(a["state"]), {}, roots={"root": Path(a["root"])},
      ready=lambda addr: open(a["ready"], "w").write(addr))
"""


# --- the edge-case tree ---------------------------------------------------------------------


def _text(n: int) -> bytes:
    return "".join(f"log line {i}: something happened\n" for i in range(n // 20)).encode()[:n]


def _urandom_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            step = min(left, 4 * MiB)
            f.write(os.urandom(step))
            left -= step


def make_edge_tree(root: Path) -> None:
    """Every entry kind and attribute the transfer must keep."""
    root.mkdir(parents=True)
    d = root / "a" / "b" / "c" / "d"
    d.mkdir(parents=True)
    (d / "deep.txt").write_text("deep\n")
    (root / "empty").write_bytes(b"")
    (root / "small.txt").write_text("hello\n" * 100)
    (root / "text.log").write_bytes(_text(300_000))
    _urandom_file(root / "big.bin", 6 * MiB)
    with open(root / "sparse.img", "wb") as f:
        f.truncate(64 * MiB)
        f.write(os.urandom(100_000))
        f.seek(10 * MiB + 12345)
        f.write(os.urandom(5000))
        f.seek(64 * MiB - 10)
        f.write(b"end of it!")
    # hardlinks across directories, one group of three
    (root / "a" / "linked").write_text("one inode, three names\n")
    os.link(root / "a" / "linked", root / "a" / "b" / "linked2")
    os.link(root / "a" / "linked", root / "hard3")
    # symlinks: relative, absolute, dangling, to a directory
    os.symlink("small.txt", root / "sym-rel")
    os.symlink("/etc/passwd", root / "sym-abs")
    os.symlink("nowhere/at/all", root / "sym-dangling")
    os.symlink("a/b", root / "sym-dir")
    os.mknod(root / "null-dev", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "loop-dev", 0o660 | stat.S_IFBLK, os.makedev(7, 200))
    os.mkfifo(root / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock"))
    sock.close()
    # modes and owners
    (root / "suid").write_text("#!/bin/sh\n")
    os.chmod(root / "suid", 0o4755)
    (root / "sgid-dir").mkdir()
    os.chmod(root / "sgid-dir", 0o2775)
    (root / "sticky").mkdir()
    os.chmod(root / "sticky", 0o1777)
    (root / "noperm").write_text("x")
    os.chmod(root / "noperm", 0)
    (root / "readonly-dir").mkdir()
    (root / "readonly-dir" / "inside").write_text("x")
    os.chmod(root / "readonly-dir", 0o555)
    (root / "owned").write_text("owned by nobody known\n")
    os.chown(root / "owned", 12345, 54321)
    os.chown(root / "sym-rel", 4242, 4343, follow_symlinks=False)
    os.chown(root / "sticky", 1000, 1000)
    # xattrs, ACLs, SELinux label, file capabilities
    os.setxattr(root / "small.txt", "user.comment", b"a user xattr")
    os.setxattr(root / "small.txt", "trusted.secret", b"\x00\x01binary\xff")
    os.setxattr(root / "a", "security.selinux", b"system_u:object_r:etc_t:s0\x00")
    subprocess.run(["setfacl", "-m", "u:1234:rwx,g:4321:r-x", str(root / "a")], check=True)
    subprocess.run(["setfacl", "-d", "-m", "u:1234:rwx", str(root / "a")], check=True)
    subprocess.run(["setfacl", "-m", "u:999:r--", str(root / "small.txt")], check=True)
    (root / "ping").write_bytes(b"\x7fELF fake")
    subprocess.run(["setcap", "cap_net_raw+ep", str(root / "ping")], check=True)
    os.chown(root / "ping", 0, 12)  # after setcap: the kernel would clear it otherwise
    subprocess.run(["setcap", "cap_net_raw+ep", str(root / "ping")], check=True)
    # names: unicode, undecodable bytes, 255 bytes (ascii and multibyte)
    (root / "héllo wörld 世界").write_text("unicode\n")
    with open(os.path.join(os.fsencode(root), b"bad-\xff\xfe-name"), "wb") as f:
        f.write(b"latin-1 name\n")
    (root / ("L" * 255)).write_text("long ascii name\n")
    (root / ("é" * 127)).mkdir()  # 254 bytes
    (root / ("é" * 127) / ("世" * 85)).write_text("255 bytes of utf-8\n")
    # excluded trees: their directories arrive empty
    (root / "proc" / "1").mkdir(parents=True)
    (root / "proc" / "1" / "status").write_text("excluded\n")
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    (root / "tmp" / "scratch").write_text("excluded\n")
    # odd times, directories last and bottom-up so that their times stick
    os.utime(root / "small.txt", ns=(1_000_000_123, 1_600_000_000_987_654_321))
    os.utime(root / "sym-dangling", ns=(5, 1_500_000_000_000_000_001), follow_symlinks=False)
    for dirpath, _dirs, _files in sorted(os.walk(root), key=lambda w: -len(w[0])):
        os.utime(dirpath, ns=(1_400_000_000_000_000_000, 1_450_000_000_111_222_333))


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

    @property
    def fingerprint(self) -> str:
        return (self.state / "fingerprint").read_text().strip()

    def start(self) -> None:
        ready = self.state.parent / "ready"
        ready.unlink(missing_ok=True)
        args = {"listen": f"{self.pair.dest_ip}:{self.port}", "token": TOKEN,
                "state": str(self.state), "root": str(self.root), "log": str(self.log),
                "ready": str(ready)}  # fmt: skip
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
    base = {"i": i, "p": path, "t": kind, "m": 0o100644 if kind == "f" else 0o40755,
            "u": 0, "g": 0, "s": 0, "mt": 0, "at": 0, "x": {}}  # fmt: skip
    if kind == "d":
        base["c"] = []
    base.update(extra)
    return json_frame(ENTRY, base)


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


def _tree_for_kill(src: Path) -> None:
    src.mkdir()
    for i in range(60):
        _urandom_file(src / f"f{i:03d}", 256 * 1024 + i)
    (src / "sub").mkdir()
    _urandom_file(src / "sub" / "large.bin", 40 * MiB)
    for i in range(60, 120):
        _urandom_file(src / "sub" / f"f{i:03d}", 300 * 1024)


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


@pytest.mark.parametrize("at", [8 * MiB, 30 * MiB])
def test_kill_agent_then_resume(env: Env, at: int) -> None:
    _tree_for_kill(env.src)
    proc = env.start_agent(limit=12000, compression="off")
    _wait_bytes(env, proc, at)
    proc.kill()
    proc.wait()
    left = left_to_send(env.src, env.dst)
    result = env.agent(compression="off")
    assert "error" not in result, result
    assert_same(env)
    print(f"resume sent {result['bytes_sent']} of {left} left")
    assert result["bytes_sent"] <= 1.10 * left + 64 * 1024, (result["bytes_sent"], left)


def test_kill_receiver_then_resume(env: Env) -> None:
    _tree_for_kill(env.src)
    proc = env.start_agent(limit=12000, compression="off", retry=3)
    _wait_bytes(env, proc, 20 * MiB)
    env.receiver.kill()
    out, err = proc.communicate(timeout=120)
    assert json.loads(out.strip().splitlines()[-1])["error"] == "RECEIVER_UNREACHABLE", err
    env.receiver.start()
    left = left_to_send(env.src, env.dst)
    result = env.agent(compression="off")
    assert "error" not in result, result
    assert_same(env)
    print(f"resume sent {result['bytes_sent']} of {left} left")
    assert result["bytes_sent"] <= 1.10 * left + 64 * 1024, (result["bytes_sent"], left)


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
    _urandom_file(env.src / "payload.bin", 40 * MiB)
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


def test_block_hash_is_stable() -> None:
    # both sides must agree on delta block hashes, whichever algorithm the agent has
    assert block_hash("sha256", b"abc") == hashlib.sha256(b"abc").hexdigest()[:32]
    assert delta_block_size(1) == 128 * 1024
    assert delta_block_size(8192 * 128 * 1024 + 1) == 256 * 1024
