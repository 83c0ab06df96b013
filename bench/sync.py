"""Benchmark the online transfer (agent → receiver) against `rsync -aHAX` in daemon mode.

A source and a destination network namespace joined by a veth pair (tests/netns.py), both
trees on a private tmpfs so that disk write-back stays out of the figure. The source tree is
the cached Debian bookworm minbase plus generated files (many small, some medium, two large
ones, sparse files, hardlinks, symlinks, xattrs, odd owners): over 1 GiB in over 25,000
entries. The agent runs its transfer core (`sync_filesystem`) against a receiver in the
destination namespace; the anchor is `rsync -aHAX --numeric-ids SRC/ rsync://DEST/mod/`
against an rsync daemon there. Runs alternate; figures are medians (min/max alongside).

- full: into an empty destination each run; rehost time / rsync time.
- incremental: after ~1% of the files changed in place (one large file partly); ratio.
- cap: a ~300 MB mostly incompressible subset under a 100 Mbit/s tbf on the source's veth,
  Compression off; payload bytes / (link rate × time), rsync's alongside.
- compression: the Debian tree under the same cap with Compression auto; uncompressed
  payload bytes / time, as a multiple of the link rate (rsync -z alongside).

    .venv/bin/python bench/sync.py [--runs 3] [--only full,incremental,cap,compression]
        [--ab OTHER/src] [--profile DIR]

Full and incremental also print each side's CPU time (user+sys). `--ab` alternates every
rehost run with one of agent and receiver from another checkout's src/ (a second receiver,
its own destination); `--profile` py-spy-records the agent and the receiver per run.
"""

from __future__ import annotations

import argparse
import compileall
import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from common import Timing, byte_compile_rehost
from netns import NetnsPair, netns_pair
from rootfs import bookworm_minbase

SCENARIOS = ("full", "incremental", "cap", "compression")
PY = sys.executable
TOKEN = "bench-token"
MiB = 1024 * 1024
RATE_KBIT = 100_000  # the cap: 100 Mbit/s
LINK_BYTES_S = RATE_KBIT * 1000 / 8
RSYNC_PORT = 8730
RECEIVER_PORT = 8443
SSH_PORT = 2222
SSHD = "/usr/sbin/sshd"  # optional: with it, full and incremental also time `rsync -e ssh`

SSHD_CONFIG = """\
Port {port}
ListenAddress {addr}
HostKey {work}/ssh_host_key
AuthorizedKeysFile {work}/ssh_authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
UsePAM no
StrictModes no
PidFile none
"""

AGENT = r"""
import json, sys
from rehost.online.agent.client import ReceiverClient
from rehost.online.agent.transfer import sync_filesystem
a = json.loads(sys.argv[1])
c = ReceiverClient(a["addr"], a["token"], a["fp"], retry_seconds=10)
s = sync_filesystem(c, "root", a["root"], [], a["compression"])
print(json.dumps(s))
"""

RECEIVER = r"""
import json, logging, sys
from pathlib import Path
from rehost.online.receiver.server import serve
a = json.loads(sys.argv[1])
logging.basicConfig(level=logging.WARNING, filename=a["log"])
serve(a["listen"], a["token"], Path(a["state"]), {}, roots={"root": Path(a["root"])},
      ready=lambda addr: open(a["ready"], "w").write(addr))
"""

RSYNCD_CONF = """\
pid file = {work}/rsyncd.pid
address = {addr}
port = {port}
use chroot = no
uid = root
gid = root
numeric ids = yes
[mod]
path = {path}
read only = no
"""


# --- the source tree ------------------------------------------------------------------------


def _text_pool(rng: random.Random) -> bytes:
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 10)))
        for _ in range(2000)
    ]
    lines = []
    size = 0
    while size < 8 * MiB:
        line = f"{rng.randint(10**8, 10**9)} {' '.join(rng.choices(words, k=rng.randint(4, 14)))}\n"
        lines.append(line)
        size += len(line)
    return "".join(lines).encode()


class _Content:
    """Random (incompressible) or text-like (compressible ~4x) bytes, deterministic."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.text = _text_pool(self.rng)

    def random(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def textual(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            start = self.rng.randrange(len(self.text) - MiB)
            out += self.text[start : start + min(n - len(out), MiB)]
        return out

    def write(self, path: Path, size: int, random_share: float) -> None:
        with open(path, "wb") as f:
            left = size
            while left:
                step = min(left, MiB)
                kind = self.rng.random() < random_share
                f.write(self.random(step) if kind else self.textual(step))
                left -= step


def build_tree(src: Path) -> None:
    """debian/ (the cached minbase root) plus gen/ (generated; see the module docstring)."""
    src.mkdir()
    subprocess.run(["cp", "-a", f"{bookworm_minbase()}/.", str(src / "debian")], check=True)
    c = _Content(4242)
    rng = c.rng
    gen = src / "gen"
    small = gen / "small"
    names: list[Path] = []
    for d in range(200):
        sub = small / f"d{d:03d}"
        sub.mkdir(parents=True)
        for k in range(100):
            p = sub / f"f{k:03d}.{rng.choice(['txt', 'conf', 'bin', 'json', 'py'])}"
            size = min(int(rng.lognormvariate(8.3, 1.1)), 64 * 1024)
            p.write_bytes(c.random(size) if rng.random() < 0.3 else c.textual(size))
            names.append(p)
            if rng.random() < 0.02:
                os.setxattr(p, "user.origin", b"bench %d" % k)
            if rng.random() < 0.05:
                os.chown(p, rng.randint(1000, 60000), rng.randint(1000, 60000))
    medium = gen / "medium"
    medium.mkdir()
    for k in range(160):  # ~320 MB, mostly random: the capped run's subset
        c.write(medium / f"m{k:03d}.dat", rng.randint(MiB // 4, 3 * MiB + MiB // 2), 0.85)
    large = gen / "large"
    large.mkdir()
    c.write(large / "random.bin", 224 * MiB, 1.0)
    c.write(large / "mixed.bin", 224 * MiB, 0.5)
    sparse = gen / "sparse"
    sparse.mkdir()
    for k in range(2):
        with open(sparse / f"disk{k}.img", "wb") as f:
            f.truncate(64 * MiB)
            for _ in range(32):
                f.seek(rng.randrange(0, 63 * MiB, 4096))
                f.write(c.random(128 * 1024))
    links = gen / "links"
    links.mkdir()
    for k in range(1000):
        target = rng.choice(names).relative_to(gen)
        os.symlink(f"../{target}" if k % 10 else f"../missing/{k}", links / f"l{k:04d}")
    hard = gen / "hard"
    hard.mkdir()
    for k in range(500):
        os.link(names[k * 37 % len(names)], hard / f"h{k:03d}")
    subprocess.run(["setfacl", "-m", "u:1234:rwx,g:4321:r-x", str(small / "d000")], check=True)


def tree_stats(root: Path) -> tuple[int, int]:
    """(entries, bytes of file data, holes left out and hardlinks counted once)."""
    entries = 0
    data = 0
    seen: set[int] = set()
    for dirpath, dirs, files in os.walk(root):
        entries += len(dirs) + len(files)
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_ino not in seen and not os.path.islink(os.path.join(dirpath, name)):
                seen.add(st.st_ino)
                data += min(st.st_size, st.st_blocks * 512)
    return entries, data


def change_one_percent(src: Path, rng: random.Random, stamp: int) -> int:
    """Overwrite a few KiB in place in 1% of the files, and 1 MiB of the large random one."""
    files = []
    for dirpath, _dirs, names in os.walk(src):
        for name in names:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if os.path.isfile(p) and not os.path.islink(p) and st.st_nlink == 1:
                files.append((p, st.st_size))
    files.sort()
    chosen = rng.sample(files, len(files) // 100)
    chosen.append((str(src / "gen" / "large" / "random.bin"), 224 * MiB))
    for path, size in chosen:
        with open(path, "r+b") as f:
            n = MiB if size >= 100 * MiB else min(4096, max(size // 4, 1))
            f.seek(rng.randrange(0, max(size - n, 1)))
            f.write(rng.randbytes(n))
        os.utime(path, ns=(stamp, stamp))
    return len(chosen)


def clear(path: Path) -> None:
    """Empty a directory but keep it (the receiver holds it open)."""
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


# --- the two sides --------------------------------------------------------------------------


@dataclass
class Bench:
    pair: NetnsPair
    work: Path
    src: Path
    dst_rehost: Path
    dst_rsync: Path
    receiver_addr: str = ""
    fingerprint: str = ""
    receiver_pid: int = 0
    rsyncd_pid: int = 0
    profile: str = ""  # a directory: py-spy records both rehost sides there
    env: dict[str, str] | None = None  # the agent's environment (None: this one)
    base: Bench | None = None  # with --ab: the same, run from another source tree
    ssh: str = ""  # rsync's -e for the encrypted anchor, when sshd is installed
    dst_ssh: Path | None = None
    # CPU seconds (user+sys) per run: agent, receiver, rsync client, rsync daemon
    cpu: dict[str, list[float]] = field(default_factory=dict)

    def _cpu(self, key: str, seconds: float) -> None:
        self.cpu.setdefault(key, []).append(seconds)

    def _spy(self, argv: list[str], tag: str) -> tuple[list[str], subprocess.Popen[bytes] | None]:
        if not self.profile:
            return argv, None
        n = len(list(Path(self.profile).glob(f"agent-{tag}-*.txt")))
        out = f"{self.profile}/agent-{tag}-{n}.txt"
        spy = [str(Path(PY).parent / "py-spy"), "record", "-f", "raw", "-r", "250", "-o"]
        recv = subprocess.Popen(
            [*spy, f"{self.profile}/receiver-{tag}-{n}.txt", "--pid", str(self.receiver_pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        return [*spy, out, "--", *argv], recv

    def rehost(self, root: Path, compression: str, tag: str = "") -> tuple[float, dict[str, int]]:
        args = {"addr": self.receiver_addr, "token": TOKEN, "fp": self.fingerprint,
                "root": str(root), "compression": compression}  # fmt: skip
        inner: list[str] = [PY, "-c", AGENT, json.dumps(args)]
        spy = None
        if tag:
            inner, spy = self._spy(inner, tag)
        argv = self.pair.cmd(self.pair.source, inner)
        recv0 = _proc_cpu(self.receiver_pid)
        before = os.times()
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env)
        out, err = proc.communicate()
        elapsed = time.perf_counter() - start
        after = os.times()
        recv = _proc_cpu(self.receiver_pid) - recv0
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait()
        if proc.returncode != 0:
            raise RuntimeError(f"the agent failed ({proc.returncode}):\n{err.decode()[-3000:]}")
        lines = [x for x in out.decode().splitlines() if x.startswith("{")]  # py-spy talks too
        stats: dict[str, int] = json.loads(lines[-1])
        if tag:
            self._cpu(f"{tag}-receiver", recv)
            self._cpu(f"{tag}-agent", after.children_user + after.children_system
                      - before.children_user - before.children_system)  # fmt: skip
            self._cpu(f"{tag}-wire/payload", stats["bytes_on_wire"] / max(stats["bytes_sent"], 1))
        return elapsed, stats

    def rsync(self, root: Path, *extra: str, tag: str = "") -> float:
        url = f"rsync://{self.pair.dest_ip}:{RSYNC_PORT}/mod/"
        argv = self.pair.cmd(self.pair.source, ["rsync", "-aHAX", "--numeric-ids", *extra,
                                                f"{root}/", url])  # fmt: skip
        daemon0 = _proc_cpu(self.rsyncd_pid, children=True)
        before = os.times()
        start = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        after = os.times()
        time.sleep(0.05)  # let the daemon reap its connection's processes
        if tag:
            self._cpu(f"{tag}-rsyncd", _proc_cpu(self.rsyncd_pid, children=True) - daemon0)
            self._cpu(f"{tag}-rsync", after.children_user + after.children_system
                      - before.children_user - before.children_system)  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"rsync failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return elapsed

    def rsync_ssh(self, root: Path) -> float:
        """`rsync -e ssh` (OpenSSH's default cipher): the encrypted anchor, like our TLS."""
        dest = f"root@{self.pair.dest_ip}:{self.dst_ssh}/"
        rsync = ["rsync", "-aHAX", "--numeric-ids", "-e", self.ssh, f"{root}/", dest]
        argv = self.pair.cmd(self.pair.source, rsync)
        start = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"rsync -e ssh failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return time.perf_counter() - start

    def verify(self, root: Path, dst: Path) -> None:
        """rsync -n must find nothing to change: the copy is complete and exact."""
        out = subprocess.run(
            ["rsync", "-aHAXn", "--itemize-changes", "--numeric-ids", "--delete",
             f"{root}/", f"{dst}/"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        diffs = [line for line in out.stdout.splitlines() if line.strip()]
        if diffs:
            raise RuntimeError(f"{dst} differs from {root}:\n" + "\n".join(diffs[:20]))


def _proc_cpu(pid: int, children: bool = False) -> float:
    """user+sys CPU seconds of a running process (and of its reaped children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def _wait_port(pair: NetnsPair, port: int, proc: subprocess.Popen[bytes]) -> None:
    probe = f"import socket; socket.create_connection(({pair.dest_ip!r}, {port}), 1).close()"
    deadline = time.monotonic() + 30
    while pair.run(pair.source, [PY, "-c", probe]).returncode != 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on {pair.dest_ip}:{port}")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def tmpfs(size_mib: int) -> Iterator[Path]:
    mnt = Path(tempfile.mkdtemp(prefix="rehost-bench-sync-"))
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(mnt)],
                       check=True)  # fmt: skip
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        mnt.rmdir()


def _start_receiver(
    b: Bench, tag: str, port: int, root: Path, env: dict[str, str] | None
) -> subprocess.Popen[bytes]:
    work, pair = b.work, b.pair
    ready = work / f"receiver{tag}.ready"
    args = {"listen": f"{pair.dest_ip}:{port}", "token": TOKEN,
            "state": str(work / f"state{tag}"), "root": str(root),
            "log": str(work / f"receiver{tag}.log"), "ready": str(ready)}  # fmt: skip
    receiver = subprocess.Popen(
        pair.cmd(pair.dest, [PY, "-c", RECEIVER, json.dumps(args)]),
        stdout=subprocess.DEVNULL,
        env=env,
    )
    b.receiver_pid = receiver.pid
    deadline = time.monotonic() + 30
    while not ready.exists() or not ready.read_text():
        if receiver.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the receiver did not start")
        time.sleep(0.05)
    b.receiver_addr = ready.read_text()
    b.fingerprint = (work / f"state{tag}" / "fingerprint").read_text().strip()
    return receiver


@contextmanager
def bench_env(profile: str = "", ab: str = "") -> Iterator[Bench]:
    """Namespaces, a tmpfs with the source tree, a receiver and an rsync daemon."""
    procs: list[subprocess.Popen[bytes]] = []
    # the source and up to four copies of ~1.1 GiB (rehost, rsync, --ab, rsync -e ssh)
    with tmpfs(6144) as work, netns_pair() as pair:
        try:
            b = Bench(pair, work, work / "src", work / "dst-rehost", work / "dst-rsync",
                      profile=profile)  # fmt: skip
            started = time.monotonic()
            build_tree(b.src)
            b.dst_rehost.mkdir()
            b.dst_rsync.mkdir()
            entries, data = tree_stats(b.src)
            print(f"# tree: {data / 2**30:.2f} GiB of file data in {entries:,} entries, "
                  f"built in {time.monotonic() - started:.0f}s on tmpfs", flush=True)  # fmt: skip
            receiver = _start_receiver(b, "", RECEIVER_PORT, b.dst_rehost, None)
            procs.append(receiver)
            if ab:
                # the same receiver and agent, from another source tree, into its own root
                env = {**os.environ, "PYTHONPATH": ab}
                b.base = dataclasses.replace(b, dst_rehost=work / "dst-base", env=env)
                b.base.dst_rehost.mkdir()
                procs.append(_start_receiver(b.base, "-base", RECEIVER_PORT + 1,
                                             b.base.dst_rehost, env))  # fmt: skip
            conf = work / "rsyncd.conf"
            conf.write_text(RSYNCD_CONF.format(work=work, addr=pair.dest_ip, port=RSYNC_PORT,
                                               path=b.dst_rsync))  # fmt: skip
            daemon = subprocess.Popen(
                pair.cmd(pair.dest, ["rsync", "--daemon", "--no-detach", f"--config={conf}"]),
                stdout=subprocess.DEVNULL,
            )
            procs.append(daemon)
            b.rsyncd_pid = daemon.pid
            _wait_port(pair, RSYNC_PORT, daemon)
            if os.path.exists(SSHD):
                procs.append(_start_sshd(b))
            else:
                print(
                    f"# no rsync -e ssh anchor: {SSHD} is missing (apt-get install openssh-server)"
                )
            yield b
        finally:
            for proc in reversed(procs):
                _stop(proc)
            if (work / "receiver.log").exists():
                tail = (work / "receiver.log").read_text()[-2000:]
                if tail.strip():
                    print("# receiver log (tail):\n" + tail)


def _start_sshd(b: Bench) -> subprocess.Popen[bytes]:
    """An sshd in the destination namespace with throwaway keys, for `rsync -e ssh`."""
    w = b.work
    for key in ("ssh_host_key", "ssh_user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(w / key)],
                       check=True)  # fmt: skip
    (w / "ssh_authorized_keys").write_text((w / "ssh_user_key.pub").read_text())
    (w / "sshd_config").write_text(SSHD_CONFIG.format(port=SSH_PORT, addr=b.pair.dest_ip, work=w))
    os.makedirs("/run/sshd", exist_ok=True)  # its privilege-separation directory
    sshd = subprocess.Popen(
        b.pair.cmd(b.pair.dest, [SSHD, "-D", "-e", "-f", str(w / "sshd_config")]),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    _wait_port(b.pair, SSH_PORT, sshd)
    b.ssh = (f"ssh -p {SSH_PORT} -i {w}/ssh_user_key -o StrictHostKeyChecking=no "
             "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR")  # fmt: skip
    b.dst_ssh = w / "dst-ssh"
    b.dst_ssh.mkdir()
    return sshd


# --- scenarios ------------------------------------------------------------------------------


def _spread(t: Timing) -> str:
    return f"{t.minimum:.2f}/{t.median:.2f}/{max(t.seconds):.2f}"


def _ratio_row(name: str, r: Timing, s: Timing) -> None:
    ratios = sorted(a / b for a, b in zip(r.seconds, s.seconds, strict=True))
    print(f"{name:<13}{r.median:>10.2f}{s.median:>9.2f}{r.median / s.median:>8.2f}"
          f"   rehost {_spread(r)}  rsync {_spread(s)}  "
          f"per-run ratios {'/'.join(f'{x:.2f}' for x in ratios)}", flush=True)  # fmt: skip


def _cpu_row(b: Bench, tag: str) -> None:
    def med(side: str) -> str:
        xs = b.cpu.get(f"{tag}-{side}", [])
        return f"{statistics.median(xs):.2f} ({'/'.join(f'{x:.2f}' for x in xs)})" if xs else "-"

    print(f"{'':<13}CPU s (user+sys, median (runs)): agent {med('agent')}, receiver "
          f"{med('receiver')}; rsync client {med('rsync')}, daemon {med('rsyncd')}; "
          f"wire/payload {med('wire/payload')}"
          f"{'  (py-spy attached)' if b.profile else ''}", flush=True)  # fmt: skip


def full(b: Bench, runs: int) -> None:
    r, s, base, ssh = Timing(), Timing(), Timing(), Timing()
    for k in range(runs):
        clear(b.dst_rehost)
        seconds, _stats = b.rehost(b.src, "auto", tag="full")
        r.seconds.append(seconds)
        if k == 0:
            b.verify(b.src, b.dst_rehost)
        if b.base is not None:
            clear(b.base.dst_rehost)
            base.seconds.append(b.base.rehost(b.src, "auto", tag="base-full")[0])
        clear(b.dst_rsync)
        s.seconds.append(b.rsync(b.src, tag="full"))
        if b.dst_ssh is not None:
            clear(b.dst_ssh)
            ssh.seconds.append(b.rsync_ssh(b.src))
    _ratio_row("full", r, s)
    _cpu_row(b, "full")
    if ssh.seconds:
        _ratio_row("  vs -e ssh", r, ssh)
    if b.base is not None:
        _ratio_row("  base full", base, s)
        _cpu_row(b, "base-full")


def incremental(b: Bench, runs: int) -> None:
    # both destinations start equal to the source (they are after `full`; cheap if so)
    b.rehost(b.src, "auto")
    b.rsync(b.src)
    if b.base is not None:
        b.base.rehost(b.src, "auto")
    if b.dst_ssh is not None:
        b.rsync_ssh(b.src)
    rng = random.Random(77)
    r, s, base, ssh = Timing(), Timing(), Timing(), Timing()
    changed = 0
    sent: list[int] = []
    for k in range(runs):
        changed = change_one_percent(b.src, rng, time.time_ns() + k)
        first = ("rehost", "rsync") if k % 2 == 0 else ("rsync", "rehost")
        for side in first:
            if side == "rehost":
                seconds, stats = b.rehost(b.src, "auto", tag="incremental")
                r.seconds.append(seconds)
                sent.append(stats["bytes_sent"])
            else:
                s.seconds.append(b.rsync(b.src, tag="incremental"))
        if b.base is not None:
            base.seconds.append(b.base.rehost(b.src, "auto", tag="base-incremental")[0])
        if b.dst_ssh is not None:
            ssh.seconds.append(b.rsync_ssh(b.src))
        if k == 0:
            b.verify(b.src, b.dst_rehost)
    _ratio_row("incremental", r, s)
    _cpu_row(b, "incremental")
    if ssh.seconds:
        _ratio_row("  vs -e ssh", r, ssh)
    if b.base is not None:
        _ratio_row("  base incr", base, s)
        _cpu_row(b, "base-incremental")
    print(f"{'':<13}({changed} files changed per run; rehost sent "
          f"{statistics.median(sent) / MiB:.1f} MiB of file data)")  # fmt: skip


def _capped(b: Bench, root: Path, runs: int, compression: str, rsync_extra: list[str]) -> None:
    r, s = Timing(), Timing()
    payload: list[int] = []
    wire: list[float] = []
    b.pair.set_rate(RATE_KBIT)
    try:
        for k in range(runs):
            clear(b.dst_rehost)
            tx = b.pair.tx_bytes()
            seconds, stats = b.rehost(root, compression)
            wire.append((b.pair.tx_bytes() - tx) / (LINK_BYTES_S * seconds))
            r.seconds.append(seconds)
            payload.append(stats["bytes_sent"])
            if k == 0:
                b.verify(root, b.dst_rehost)
            clear(b.dst_rsync)
            s.seconds.append(b.rsync(root, *rsync_extra))
    finally:
        b.pair.set_rate(None)
    data = statistics.median(payload)
    util = sorted(p / (LINK_BYTES_S * t) for p, t in zip(payload, r.seconds, strict=True))
    rs = sorted(data / (LINK_BYTES_S * t) for t in s.seconds)
    label = "payload/link" if compression == "off" else "effective/link"
    print(f"{'':<13}{data / 1e6:.0f} MB of file data; rehost {_spread(r)} s, rsync "
          f"{_spread(s)} s")  # fmt: skip
    print(f"{'':<13}{label}: rehost {'/'.join(f'{x:.3f}' for x in util)} (min/median/max), "
          f"rsync{' ' + ' '.join(rsync_extra) if rsync_extra else ''} "
          f"{'/'.join(f'{x:.3f}' for x in rs)}; rehost link busy "
          f"{statistics.median(wire):.3f}", flush=True)  # fmt: skip


def cap(b: Bench, runs: int) -> None:
    print(f"cap          {RATE_KBIT // 1000} Mbit/s tbf, Compression off, gen/medium")
    _capped(b, b.src / "gen" / "medium", runs, "off", [])


def compression(b: Bench, runs: int) -> None:
    print(f"compression  {RATE_KBIT // 1000} Mbit/s tbf, Compression auto, debian/")
    _capped(b, b.src / "debian", runs, "auto", ["-z"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ",".join(SCENARIOS))
    ap.add_argument(
        "--ab",
        default="",
        metavar="SRC",
        help="also run agent and receiver from SRC (another checkout's src/) each run",
    )
    ap.add_argument(
        "--profile",
        default="",
        metavar="DIR",
        help="py-spy record the agent and the receiver (raw format) into DIR",
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/sync.py needs root (network namespaces, tmpfs)")
    names = [n for n in SCENARIOS if not args.only or n in args.only.split(",")]
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    # as installed from a wheel: without bytecode (and under PYTHONDONTWRITEBYTECODE) each
    # agent and receiver start would compile its modules again
    byte_compile_rehost()
    if args.ab:
        compileall.compile_dir(args.ab, quiet=1)
    with bench_env(os.path.abspath(args.profile) if args.profile else "", args.ab) as b:
        print(f"# {args.runs} alternating runs; medians; veth pair, both trees on tmpfs; "
              f"{time.strftime('%Y-%m-%d')}, {socket.gethostname()}")  # fmt: skip
        print(f"{'name':<13}{'rehost_s':>10}{'rsync_s':>9}{'ratio':>8}")
        for name in names:
            {"full": full, "incremental": incremental, "cap": cap, "compression": compression}[
                name
            ](b, args.runs)


if __name__ == "__main__":
    main()
