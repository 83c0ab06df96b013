"""Issue 4 end to end: the bundled agent on a source host, `rehost receive` on a destination host.

Source and destination are two network namespaces joined by a veth pair. The source's disks are
loop devices with real GPT tables (BIOS boot, /boot ext4, / xfs or ext4, swap; a data disk at
/data), filled from the cached Debian bookworm minbase tree or a smaller tree, plus the edge-case
tree (tests/edgetree.py). The destination's disks are empty loop devices of other sizes (the
system disk smaller, the data disk larger). The agent is the zipapp `rehost agent-bundle` writes,
run with the host's python3; the receiver is `rehost receive`.

The oracles: the destination's partition tables and filesystems against the source's (types,
UUIDs, labels, sizes that fit), and `rsync -aHAXn -c --itemize-changes --numeric-ids --delete`
per filesystem, which must list nothing but the excluded paths, whose directories must exist
empty with their source's mode. Kill tests `kill -9` the agent and the receiver at several
points; the next run must complete with no differences and send at most 110% of what was left.

Each `ip netns exec` command also runs in its own mount namespace, so the receiver's mounts of
the destination filesystems are its own: killing it drops them, as a reboot of the rescue system
would. The test reads the destination through /proc/PID/root while the receiver runs, and mounts
it read-only itself once the receiver is gone.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
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

from edgetree import make_edge_tree, urandom_file
from loopdisk import (
    BIOS_BOOT,
    LINUX,
    SWAP,
    LoopDisk,
    LoopLab,
    MountNamespace,
    Part,
    blkid,
    mount_namespace,
    sh,
)
from netns import NetnsPair, netns_pair
from rehost.online.protocol import DELTA_MIN_SIZE, PROTOCOL_VERSION, delta_block_size, partial_name

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and loop devices"),
    pytest.mark.skipif(
        any(shutil.which(t) is None for t in ("rsync", "sfdisk", "mkfs.xfs", "setcap")),
        reason="needs rsync, sfdisk, xfsprogs and setcap",
    ),
]

MiB = 1024 * 1024
VENV_BIN = Path(sys.executable).parent
HOST_PYTHON = "/usr/bin/python3"
TOKEN = "e2e-secret-token-0123456789"
# The default excludes, written out here so that the oracle does not trust the agent's.
EXCLUDES = ["/dev/*", "/proc/*", "/sys/*", "/run/*", "/tmp/*", "/lost+found/*",
            "/var/cache/yum/*", "/var/cache/dnf/*", "/var/lib/lxcfs/*"]  # fmt: skip
KILL_LIMIT_KBPS = 6000  # slow enough to hit a point mid-transfer, fast enough for CI

# `rehost receive` with two test hooks: the reboot records itself instead of rebooting this
# machine, and (when asked) the fixup hook records what it saw mounted, then hangs so that the
# receiver can be killed during finalize.
RECEIVER_WRAPPER = r"""
import json, os, sys, time
from pathlib import Path
import rehost.cli.receive as receive
import rehost.online.receiver.server as server
marks = Path(os.environ["E2E_MARKS"])
def reboot():
    with open(marks / "reboots", "a") as f:
        f.write("reboot\n")
receive.reboot = reboot
if os.environ.get("E2E_HANG_IN_FIXUPS"):
    def run_fixups(mounts, **context):
        points = [line.split()[4] for line in open("/proc/self/mountinfo")]
        (marks / "fixups").write_text(json.dumps({k: str(v) in points for k, v in mounts.items()}))
        time.sleep(3600)
    server.run_fixups = run_fixups
from rehost.cli.app import main
sys.argv = ["rehost", *sys.argv[1:]]
main()
"""


# --- sources ----------------------------------------------------------------------------------


@dataclass
class Source:
    root: Path
    disks: dict[str, LoopDisk]  # "0": system disk, "1": data disk
    parts: dict[str, tuple[str, int]]  # fs_id -> (disk key, partition number)
    mounts: dict[str, Path]  # fs_id -> where it is mounted
    extra: list[str] = field(default_factory=list)  # mounts the agent must leave out


def _system_parts(boot_mib: int, swap_mib: int, root_fs: str) -> list[Part]:
    return [
        Part(1, BIOS_BOOT),
        Part(boot_mib, LINUX, "ext4", "/boot", "boot"),
        Part(swap_mib, SWAP, "swap", label="swap0"),
        Part(None, LINUX, root_fs, "/", "rootfs"),
    ]


def make_source(lab: LoopLab, where: Path, *, full: bool) -> Source:
    """Source disks mounted at `where`: bookworm + edge cases (full) or a small tree."""
    system = _system_parts(100, 64, "xfs") if full else _system_parts(48, 32, "ext4")
    data = [Part(None, LINUX, "ext4", "/data", "data")]
    sys_disk = lab.disk("src-system", 800 if full else 320, "gpt", system)
    data_disk = lab.disk("src-data", 256 if full else 160, "gpt", data)
    layout = [(sys_disk, system), (data_disk, data)]
    extra = []
    if full:  # a mounted disk not in DataDisks: --check warns, nothing of it migrates
        scratch = [Part(None, LINUX, "ext4", "/srv/scratch", "scratch")]
        layout.append((lab.disk("src-scratch", 64, "gpt", scratch), scratch))
        extra.append("/srv/scratch")
    lab.mount_tree(where, layout)
    if full:
        from rootfs import bookworm_minbase

        sh("cp", "-a", f"{bookworm_minbase()}/.", f"{where}/")
        (where / "srv" / "scratch" / "not-migrated").write_text("left out\n")
    else:
        (where / "etc").mkdir()
        (where / "etc" / "os-release").write_text('ID=debian\nPRETTY_NAME="Debian small tree"\n')
        for i in range(6):
            urandom_file(where / f"blob{i}.bin", 2 * MiB + i * 4096)
        urandom_file(where / "large.bin", 10 * MiB)
        urandom_file(where / "data" / "large.bin", 12 * MiB)
    make_edge_tree(where / "srv" / "edge")
    make_edge_tree(where / "data" / "edge")
    for name in ("tmp", "proc", "run", "dev", "sys"):  # excluded: must arrive empty
        (where / name).mkdir(exist_ok=True)
    (where / "tmp" / "scratch.txt").write_text("excluded\n")
    (where / "proc" / "1").mkdir(exist_ok=True)
    (where / "run" / "lock.pid").write_text("123\n")
    os.chmod(where / "tmp", 0o1777)
    parts = {"boot": ("0", 2), "root": ("0", 4), "data-data": ("1", 1)}
    mounts = {"root": where, "boot": where / "boot", "data-data": where / "data"}
    return Source(where, {"0": sys_disk, "1": data_disk}, parts, mounts, extra)


# --- destinations -----------------------------------------------------------------------------


@dataclass
class Dest:
    """One destination host: its disks, a receiver's state dir, and the receiver process."""

    pair: NetnsPair
    lab: LoopLab
    tmp: Path
    disks: dict[str, LoopDisk]
    state: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    port: int = 443

    @property
    def address(self) -> str:
        return f"{self.pair.dest_ip}:{self.port}"

    @property
    def marks(self) -> Path:
        return self.tmp / "marks"

    def reboots(self) -> int:
        path = self.marks / "reboots"
        return len(path.read_text().splitlines()) if path.exists() else 0

    def start(
        self, *, real_cli: bool = False, hang_in_fixups: bool = False, fixups: bool = False
    ) -> None:
        """`rehost receive` in the destination namespace; returns when it listens.

        The boot fixups run only with `fixups` (and `hang_in_fixups` replaces them): these
        sources have no kernel, so `--no-fixups` otherwise (tests/test_boot.py boots one)."""
        self.starts += 1
        out = self.tmp / f"receiver-{self.starts}.out"
        args = ["--listen", self.address, "--token-file", str(self.tmp / "token"),
                "--state-dir", str(self.state), "--system-disk", self.disks["0"].dev,
                "--data-disk", f"1={self.disks['1'].dev}"]  # fmt: skip
        if not fixups and not hang_in_fixups:
            args.append("--no-fixups")
        if real_cli:
            argv = [str(VENV_BIN / "rehost"), "receive", *args]
        else:
            argv = [sys.executable, "-c", RECEIVER_WRAPPER, "receive", *args, "--reboot"]
        env = {**os.environ, "REHOST_STATE_DIR": str(self.tmp / "rehost-state"),
               "E2E_MARKS": str(self.marks)}  # fmt: skip
        if hang_in_fixups:
            env["E2E_HANG_IN_FIXUPS"] = "1"
        with open(out, "wb") as f:
            self.proc = subprocess.Popen(
                self.pair.cmd(self.pair.dest, argv), stdout=f, stderr=subprocess.STDOUT, env=env
            )
        deadline = time.monotonic() + 60
        while "rehost receiver listening on" not in out.read_text():
            assert self.proc.poll() is None, f"the receiver died at start:\n{out.read_text()}"
            assert time.monotonic() < deadline, "the receiver did not start"
            time.sleep(0.05)

    def output(self) -> str:
        return (self.tmp / f"receiver-{self.starts}.out").read_text()

    def fingerprint(self) -> str:
        return (self.state / "fingerprint").read_text().strip()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc = None

    def mnt(self, fs_id: str) -> Path:
        """The receiver's mount of `fs_id`, seen through its own mount namespace."""
        assert self.proc is not None
        return Path(f"/proc/{self.proc.pid}/root") / str(self.state).lstrip("/") / "mnt" / fs_id


def make_dest(lab: LoopLab, pair: NetnsPair, tmp: Path, sizes: tuple[int, int]) -> Dest:
    tmp.mkdir(parents=True)
    (tmp / "marks").mkdir()
    (tmp / "token").write_text(TOKEN + "\n")
    disks = {"0": lab.disk(f"{tmp.name}-system", sizes[0]),
             "1": lab.disk(f"{tmp.name}-data", sizes[1])}  # fmt: skip
    return Dest(pair, lab, tmp, disks, tmp / "state")


# --- the agent --------------------------------------------------------------------------------


@dataclass
class AgentRun:
    proc: subprocess.Popen[bytes]
    out: Path

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def wait(self, timeout: float = 240) -> tuple[int, list[str]]:
        status = self.proc.wait(timeout=timeout)
        return status, self.text().splitlines()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def write_config(dest: Dest, bundle: Path, **extra: Any) -> Path:
    folder = dest.tmp / "agent"
    folder.mkdir(exist_ok=True)
    shutil.copy(bundle, folder / "rehost-agent.pyz")
    config = {
        "Destination": {"Address": dest.address, "Token": TOKEN, "Fingerprint": dest.fingerprint()},
        "DataDisks": [{"Index": 1, "MountPoint": "/data"}],
        "Compression": "off",
        **extra,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder / "config.json"


def start_agent(dest: Dest, config: Path, source: Source, *args: str) -> AgentRun:
    """The bundled agent with the host's python3, in the source namespace."""
    runs = len(list(dest.tmp.glob("agent-*.out")))
    out = dest.tmp / f"agent-{runs + 1}.out"
    argv = [HOST_PYTHON, str(config.parent / "rehost-agent.pyz"), "--config", str(config),
            *args, "--source-root", str(source.root)]  # fmt: skip
    with open(out, "wb") as f:
        proc = subprocess.Popen(dest.pair.cmd(dest.pair.source, argv), stdout=f, stderr=f)
    return AgentRun(proc, out)


def payload_of(lines: list[str]) -> int:
    """File payload bytes a run sent: the sum over its per-filesystem summary lines."""
    return sum(int(m.group(1)) for line in lines if (m := re.search(r"\bbytes_sent (\d+)", line)))


# --- oracles ----------------------------------------------------------------------------------


def _excluded(rel: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase("/" + rel, p) for p in patterns)


def _data_bytes(path: Path) -> int:
    """Bytes of a file that are not holes: what a full send of it carries at most."""
    total, off = 0, 0
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            total += end - start
            off = end
    finally:
        os.close(fd)
    return total


def payload_left(src: Path, dst: Path | None, excludes: list[str]) -> int:
    """Payload bytes a correct resume must still send for one filesystem (independent of the
    agent): nothing for a file the destination has with the same content and quick-check
    metadata, the differing blocks of a large file against its partial or in-place copy, and
    the data (not the holes) of anything else."""
    total = 0
    seen: set[int] = set()
    root_dev = os.lstat(src).st_dev
    for dirpath, dirs, files in os.walk(src):
        rel_dir = os.path.relpath(dirpath, src)
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        dirs[:] = [d for d in dirs if os.lstat(os.path.join(dirpath, d)).st_dev == root_dev
                   and not _excluded(rel_dir + d + "/x", excludes)]  # fmt: skip
        for name in files:
            s = Path(dirpath) / name
            st = os.lstat(s)
            if not stat.S_ISREG(st.st_mode) or st.st_ino in seen or st.st_size == 0:
                continue
            seen.add(st.st_ino)
            d = None if dst is None else dst / rel_dir / name
            want = s.read_bytes()
            try:
                dt = os.lstat(d) if d is not None else None
            except FileNotFoundError:
                dt = None
            quick = ("st_mode", "st_uid", "st_gid", "st_size", "st_mtime_ns")
            if (
                dt is not None
                and d is not None
                and all(getattr(st, k) == getattr(dt, k) for k in quick)
                and d.read_bytes() == want
            ):
                continue
            base = None
            if d is not None and st.st_size >= DELTA_MIN_SIZE:
                partial = d.parent / os.fsdecode(partial_name(os.fsencode(name)))
                if partial.exists():
                    base = partial
                elif dt is not None and stat.S_ISREG(dt.st_mode):
                    base = d
            if base is None:
                total += _data_bytes(s)
                continue
            have, block = base.read_bytes(), delta_block_size(st.st_size)
            for off in range(0, len(want), block):
                piece = want[off : off + block]
                if have[off : off + block] != piece and piece.count(0) != len(piece):
                    total += len(piece)  # a changed block; one turned to zeros costs nothing
    return total


def rsync_diff(src: Path, dst: Path, excludes: list[str], ns: MountNamespace) -> list[str]:
    """The issue's oracle for one filesystem (-x: the mounts below are other filesystems;
    --delete: anything extra on the destination, such as a leftover partial, shows too), run in
    the namespace where `dst` is mounted (the source's mounts are there too: it copied ours)."""
    out = subprocess.run(
        [*ns.cmd("rsync"), "-aHAXn", "-c", "-x", "--delete", "--itemize-changes", "--numeric-ids",
         *[f"--exclude={e}" for e in excludes], f"{src}/", f"{dst}/"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return [line for line in out.stdout.splitlines() if line.strip()]


def mtime_ns_diff(src: Path, dst: Path, excludes: list[str]) -> list[str]:
    """Nanosecond mtimes of every entry, which rsync's itemize may round away."""
    diffs = []
    root_dev = os.lstat(src).st_dev
    for dirpath, dirs, files in os.walk(os.fsencode(src)):
        rel = os.path.relpath(dirpath, os.fsencode(src))
        for name in [*dirs, *files]:
            r = os.path.normpath(os.path.join(rel, name))
            a = os.lstat(os.path.join(dirpath, name))
            if _excluded(os.fsdecode(r), excludes):
                continue
            b = os.lstat(os.path.join(os.fsencode(dst), r))
            if a.st_mtime_ns != b.st_mtime_ns:
                diffs.append(f"{r!r}: {a.st_mtime_ns} != {b.st_mtime_ns}")
        dirs[:] = [x for x in dirs if os.lstat(os.path.join(dirpath, x)).st_dev == root_dev
                   and not _excluded(os.fsdecode(os.path.normpath(os.path.join(rel, x))) + "/x",
                                     excludes)]  # fmt: skip
    return diffs


def sfdisk_json(dev: str) -> dict[str, Any]:
    table: dict[str, Any] = json.loads(sh("sfdisk", "--json", dev))["partitiontable"]
    for p in table["partitions"]:
        p["number"] = int(re.search(r"(\d+)$", p["node"]).group(1))  # type: ignore[union-attr]
    return table


def disk_bytes(dev: str) -> int:
    return int((Path("/sys/class/block") / Path(dev).name / "size").read_text()) * 512


def assert_layout_matches(source: Source, dest: Dest) -> dict[str, str]:
    """Same table type, disk and partition GUIDs, types and names; same filesystem types,
    UUIDs and labels; sizes that fit. Returns fs_id -> the destination partition node."""
    nodes: dict[str, str] = {}
    for key, src_disk in source.disks.items():
        dst_disk = dest.disks[key]
        dest.lab.sync_partitions(dst_disk)
        a, b = sfdisk_json(src_disk.dev), sfdisk_json(dst_disk.dev)
        assert (b["label"], b["id"]) == (a["label"], a["id"])
        assert [p["number"] for p in b["partitions"]] == [p["number"] for p in a["partitions"]]
        for pa, pb in zip(a["partitions"], b["partitions"], strict=True):
            for k in ("type", "uuid", "name"):
                assert pa.get(k) == pb.get(k), (key, pa, pb)
            assert (pb["start"] + pb["size"]) * b["sectorsize"] <= disk_bytes(dst_disk.dev)
            sa, sb = (
                blkid(src_disk.parts[pa["number"]], "TYPE"),
                blkid(dst_disk.parts[pb["number"]], "TYPE"),
            )
            assert sa == sb, (pa["node"], sa, sb)
            for tag in ("UUID", "LABEL"):
                assert blkid(dst_disk.parts[pb["number"]], tag) == blkid(
                    src_disk.parts[pa["number"]], tag
                )
        # the system disk is smaller: its last partition shrank; the data disk is larger: it grew
        last_a, last_b = a["partitions"][-1]["size"], b["partitions"][-1]["size"]
        assert last_b < last_a if key == "0" else last_b > last_a
        if key == "1":
            end = (b["partitions"][-1]["start"] + last_b) * b["sectorsize"]
            assert disk_bytes(dst_disk.dev) - end <= 2 * MiB  # it took the rest of the disk
    for fs_id, (key, number) in source.parts.items():
        nodes[fs_id] = dest.disks[key].parts[number]
        used = os.statvfs(source.mounts[fs_id])
        need = (used.f_blocks - used.f_bfree) * used.f_frsize
        assert disk_bytes(nodes[fs_id]) > need, fs_id
    return nodes


@contextlib.contextmanager
def mounted_readonly(
    dest: Dest, nodes: dict[str, str]
) -> Iterator[tuple[MountNamespace, dict[str, Path]]]:
    """The destination filesystems mounted read-only by the test (the receiver is gone), in a
    mount namespace of their own: a copy of them in another namespace would fail the next
    receiver's read-write mount (loopdisk.mount_namespace says how). Yields it and where each
    is mounted in it."""
    with mount_namespace() as ns:
        where: dict[str, Path] = {}
        for fs_id, node in nodes.items():
            fstype = blkid(node, "TYPE")
            if not fstype:
                continue  # not formatted yet
            point = dest.tmp / "check" / fs_id
            point.mkdir(parents=True, exist_ok=True)
            ns.mount("-t", fstype, "-o", "ro,nouuid" if fstype == "xfs" else "ro", node, point)
            where[fs_id] = point
        yield ns, where


def assert_no_differences(source: Source, dest: Dest, nodes: dict[str, str]) -> None:
    with mounted_readonly(dest, nodes) as (ns, dst):
        assert sorted(dst) == sorted(source.mounts)
        for fs_id, src in source.mounts.items():
            excludes = EXCLUDES if fs_id == "root" else []
            assert rsync_diff(src, dst[fs_id], excludes, ns) == [], fs_id
            assert mtime_ns_diff(src, ns.path(dst[fs_id]), excludes) == [], fs_id
        root = ns.path(dst["root"])
        for name in ("tmp", "proc", "run", "dev", "sys"):
            assert os.listdir(root / name) == [], name
            assert os.lstat(root / name).st_mode == os.lstat(source.root / name).st_mode
        assert os.listdir(source.root / "tmp") and os.listdir(source.root / "proc")
        for extra in source.extra:  # left out: its mount point arrives empty
            assert os.listdir(root / extra.lstrip("/")) == []


def wait_for(
    what: str, cond: Any, proc: subprocess.Popen[bytes] | None, timeout: float = 120
) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc is None or proc.poll() is None, f"finished before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def used_bytes(path: Path) -> int:
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def formatted(dest: Dest) -> bool:
    """Some destination partition already holds a filesystem (prepare is past sfdisk)."""
    disk = dest.disks["0"]
    names = [c.name for c in (Path("/sys/class/block") / Path(disk.dev).name).glob("*p*")]
    return any(blkid(f"/dev/{n}", "TYPE") for n in names if Path(f"/dev/{n}").exists())


def left_now(source: Source, dest: Dest) -> int:
    """What is left, read from the live receiver's mounts or, once it is dead, from ours."""
    if dest.proc is not None:
        return sum(payload_left(src, dest.mnt(fs_id) if os.path.ismount(dest.mnt(fs_id)) else None,
                                EXCLUDES if fs_id == "root" else [])
                   for fs_id, src in source.mounts.items())  # fmt: skip
    for disk in dest.disks.values():
        dest.lab.sync_partitions(disk)
    nodes = {fs_id: dest.disks[k].parts[n] for fs_id, (k, n) in source.parts.items()
             if n in dest.disks[k].parts}  # fmt: skip
    with mounted_readonly(dest, nodes) as (ns, dst):
        return sum(payload_left(src, ns.path(dst[fs_id]) if fs_id in dst else None,
                                EXCLUDES if fs_id == "root" else [])
                   for fs_id, src in source.mounts.items())  # fmt: skip


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "rehost-agent.pyz"
    sh(VENV_BIN / "rehost", "agent-bundle", out)
    return out


@pytest.fixture(scope="module")
def small_source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Source]:
    tmp = tmp_path_factory.mktemp("small-source")
    lab = LoopLab(tmp)
    try:
        yield make_source(lab, tmp / "root", full=False)
    finally:
        lab.close()


@dataclass
class World:
    """Per test: namespace pairs, destination disks and processes, all undone afterwards."""

    tmp: Path
    lab: LoopLab
    stack: contextlib.ExitStack
    dests: list[Dest] = field(default_factory=list)
    agents: list[AgentRun] = field(default_factory=list)

    def dest(self, sizes: tuple[int, int]) -> Dest:
        pair = self.stack.enter_context(netns_pair())
        dest = make_dest(self.lab, pair, self.tmp / f"dest{len(self.dests)}", sizes)
        self.dests.append(dest)
        return dest

    def agent(self, dest: Dest, config: Path, source: Source, *args: str) -> AgentRun:
        run = start_agent(dest, config, source, *args)
        self.agents.append(run)
        return run


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    lab = LoopLab(tmp_path)
    with contextlib.ExitStack() as stack:
        w = World(tmp_path, lab, stack)
        try:
            yield w
        finally:
            for run in w.agents:
                run.kill()
            for dest in w.dests:
                dest.kill()
            lab.close()


SMALL_DEST = (256, 224)  # MiB: a smaller system disk, a larger data disk than the small source


def finish_and_check(world: World, source: Source, dest: Dest, config: Path) -> int:
    """Run the agent again to the end; check the result; return the payload it sent."""
    run = world.agent(dest, config, source, "--stage", "all")
    status, lines = run.wait()
    # the receiver's side too: a refusal's reason is in its log, not in the agent's lines
    assert status == 0, "\n".join([*lines, "receiver:", dest.output()[-4000:]])
    assert lines[-1].startswith("ready to boot"), lines[-1]
    assert dest.proc is not None
    assert dest.proc.wait(timeout=60) == 0, dest.output()  # migration mode ended
    assert dest.reboots() == 1
    nodes = assert_layout_matches(source, dest)
    assert_no_differences(source, dest, nodes)
    return payload_of(lines)


# --- tests ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_debootstrap_tree_migrates_end_to_end(world: World, bundle: Path) -> None:
    source = make_source(world.lab, world.tmp / "src", full=True)
    # system 800 -> 640 MiB (/ holds ~345 MiB, with the 64 MiB xfs log), data 256 -> 384 MiB
    dest = world.dest((640, 384))
    dest.start(real_cli=True)
    config = write_config(dest, bundle, Compression="auto")

    status, lines = world.agent(dest, config, source, "--check").wait()
    assert status == 0, "\n".join(lines)
    checks, last = lines[:-1], lines[-1]
    assert checks and all(re.match(r"(OK    |WARN  |FAIL  )\S", line) for line in checks), lines
    assert not [line for line in checks if line.startswith("FAIL")]
    assert any(line.startswith("WARN  left out: /srv/scratch") for line in checks), checks
    assert f"OK    network: {dest.pair.source_ip}/24: " in "\n".join(checks), checks
    assert last.startswith("check passed")
    assert not (dest.state / "prepared.json").exists()  # --check changed nothing

    status, lines = world.agent(dest, config, source, "--stage", "all").wait()
    assert status == 0, "\n".join(lines)
    assert lines[-1] == "ready to boot: the destination disks are synced and unmounted"
    assert dest.proc is not None and dest.proc.wait(timeout=60) == 0  # `rehost receive` ended
    assert "ready to boot; leaving migration mode" in dest.output()
    nodes = assert_layout_matches(source, dest)
    assert blkid(nodes["root"], "TYPE") == "xfs"
    assert_no_differences(source, dest, nodes)
    # the source's address went with its layout, for the network fixup's check
    prepared = json.loads((dest.state / "prepared.json").read_text())
    assert prepared["layout"]["addresses"] == [f"{dest.pair.source_ip}/24"]
    total = payload_of(lines)
    assert total > 150 * MiB, lines  # the whole tree went, once
    assert total < 260 * MiB, lines


@pytest.mark.parametrize("at", ["prepare", "transfer"])
def test_agent_killed_then_run_again(
    world: World, bundle: Path, small_source: Source, at: str
) -> None:
    dest = world.dest(SMALL_DEST)
    dest.start()
    config = write_config(dest, bundle, BandwidthLimitKBps=KILL_LIMIT_KBPS)
    run = world.agent(dest, config, small_source, "--stage", "all")
    if at == "prepare":  # the receiver is formatting: the agent waits for its answer
        wait_for("mkfs", lambda: formatted(dest), run.proc)
    else:
        wait_for("the transfer", lambda: "transfer 1: /" in run.text(), run.proc)
        base = used_bytes(dest.mnt("root"))
        wait_for("10 MiB", lambda: used_bytes(dest.mnt("root")) > base + 10 * MiB, run.proc)
    run.kill()
    time.sleep(0.5)  # the receiver notices the broken stream
    left = left_now(small_source, dest)
    assert dest.reboots() == 0
    sent = finish_and_check(world, small_source, dest, config)
    print(f"killed at {at}: resumed with {sent} payload bytes of {left} left")
    assert sent <= 1.10 * left + 64 * 1024, (sent, left)


@pytest.mark.parametrize("at", ["prepare", "transfer", "finalize"])
def test_receiver_killed_then_restarted(
    world: World, bundle: Path, small_source: Source, at: str
) -> None:
    """kill -9 the receiver, stop the (retrying) agent, restart the receiver with the same
    state dir, run the agent again. The reboot is recorded, not done: it cannot run here."""
    dest = world.dest(SMALL_DEST)
    dest.start(hang_in_fixups=at == "finalize")
    config = write_config(dest, bundle, BandwidthLimitKBps=KILL_LIMIT_KBPS)
    run = world.agent(dest, config, small_source, "--stage", "all")
    if at == "prepare":
        wait_for("mkfs", lambda: formatted(dest), run.proc)
    elif at == "transfer":
        wait_for("the transfer", lambda: "transfer 1: /" in run.text(), run.proc)
        base = used_bytes(dest.mnt("root"))
        wait_for("10 MiB", lambda: used_bytes(dest.mnt("root")) > base + 10 * MiB, run.proc)
    else:
        wait_for("the fixup hook", lambda: (dest.marks / "fixups").exists(), run.proc, 180)
        # the hook runs on the mounted filesystems, before they are unmounted
        assert json.loads((dest.marks / "fixups").read_text()) == dict.fromkeys(
            small_source.mounts, True
        )
    dest.kill()
    run.kill()
    left = left_now(small_source, dest)
    assert dest.reboots() == 0
    dest.start()
    sent = finish_and_check(world, small_source, dest, config)
    print(f"receiver killed at {at}: resumed with {sent} payload bytes of {left} left")
    assert sent <= 1.10 * left + 64 * 1024, (sent, left)


def test_a_second_source_is_refused(world: World, bundle: Path, small_source: Source) -> None:
    """A config copied to a second server with its Destination unchanged: the destination,
    prepared for the first, fails the second's precheck and refuses its transfer, so the
    two trees never mix; the first then finishes. (The second server is the same tree
    with another machine id, which is what tells servers apart.)"""
    dest = world.dest(SMALL_DEST)
    dest.start()
    config = write_config(dest, bundle)
    machine_id = small_source.root / "etc" / "machine-id"
    machine_id.parent.mkdir(exist_ok=True)
    before = machine_id.read_bytes() if machine_id.exists() else None
    try:
        machine_id.write_text("a" * 32 + "\n")
        status, lines = world.agent(dest, config, small_source, "--stage", "prepare").wait()
        assert status == 0, "\n".join(lines)
        used = used_bytes(dest.mnt("root"))
        status, lines = world.agent(dest, config, small_source, "--check").wait()
        assert "OK    destination: prepared for this server: the stages resume" in lines, lines

        machine_id.write_text("b" * 32 + "\n")
        status, lines = world.agent(dest, config, small_source, "--check").wait()
        assert status == 1, "\n".join(lines)
        assert any(
            line.startswith("FAIL  destination") and "DESTINATION_TAKEN" in line for line in lines
        ), lines
        status, lines = world.agent(dest, config, small_source, "--stage", "transfer").wait()
        assert status == 1, "\n".join(lines)
        assert "DESTINATION_TAKEN" in lines[-1] and "machine-id:aaaa" in lines[-1], lines[-1]
        assert "run the same command again" not in lines[-1]
        assert used_bytes(dest.mnt("root")) == used  # nothing of it landed

        machine_id.write_text("a" * 32 + "\n")
        finish_and_check(world, small_source, dest, config)
    finally:
        if before is None:
            machine_id.unlink(missing_ok=True)
        else:
            machine_id.write_bytes(before)


@pytest.mark.slow
def test_three_pairs_at_once(world: World, bundle: Path, small_source: Source) -> None:
    """Three destinations, each with its own receiver, migrated from one source at once."""
    dests = [world.dest(SMALL_DEST) for _ in range(3)]
    for dest in dests:
        dest.start()
    configs = [write_config(dest, bundle) for dest in dests]
    runs = [
        world.agent(d, c, small_source, "--stage", "all")
        for d, c in zip(dests, configs, strict=True)
    ]
    for dest, run in zip(dests, runs, strict=True):
        status, lines = run.wait()
        assert status == 0, "\n".join(lines)
        assert lines[-1].startswith("ready to boot")
        assert dest.proc is not None and dest.proc.wait(timeout=60) == 0
        assert dest.reboots() == 1
    # they overlapped: every destination was prepared before any was finalized
    prepared = [log_time(d, "POST /v1/prepare -> 200") for d in dests]
    finalized = [log_time(d, "finalized; leaving migration mode") for d in dests]
    assert max(prepared) < min(finalized), (prepared, finalized)
    for dest in dests:
        assert_no_differences(small_source, dest, assert_layout_matches(small_source, dest))


def log_time(dest: Dest, what: str) -> str:
    """The timestamp of the receiver's first log line containing `what`."""
    log = (dest.tmp / "rehost-state" / "log" / "rehost.log").read_text()
    return next(line[:23] for line in log.splitlines() if what in line)


def test_leaving_migration_mode_only_after_a_successful_finalize(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve() stops and calls on_finalized (the CLI's --reboot) exactly once, and only after
    a finalize succeeded; a failed finalize keeps it serving. The real reboot is not run: it
    would reboot the machine running the tests."""
    from rehost.errors import RehostError
    from rehost.online.agent.client import ReceiverClient
    from rehost.online.protocol import AgentError
    from rehost.online.receiver import server

    class FixupFailed(RehostError):
        code = "FIXUP_FAILED"
        message = "a fixup failed"

    fixups: list[dict[str, Path]] = []

    report = {"distro": "debian", "changes": [{"step": "fstab", "path": "/etc/fstab"}]}

    def run_fixups(mounts: dict[str, Path], **context: Any) -> dict[str, Any]:
        fixups.append(mounts)
        if len(fixups) == 1:
            raise FixupFailed("first try")
        return report

    monkeypatch.setattr(server, "run_fixups", run_fixups)
    rebooted: list[float] = []
    bound: list[str] = []
    result: list[bool] = []
    root = tmp_path / "root"
    root.mkdir()

    def receiver() -> None:
        finalized = server.serve(
            "127.0.0.1:0",
            TOKEN,
            tmp_path / "state",
            {},
            roots={"root": root},
            ready=bound.append,
            on_finalized=lambda: rebooted.append(time.time()),
        )
        result.append(finalized)

    thread = threading.Thread(target=receiver, daemon=True)
    thread.start()
    wait_for("the receiver", lambda: bool(bound), None, 30)
    client = ReceiverClient(bound[0], TOKEN, (tmp_path / "state" / "fingerprint").read_text().strip(),
                            retry_seconds=5)  # fmt: skip
    with pytest.raises(AgentError) as exc:
        client.post_json("/v1/finalize", {})
    assert exc.value.code == "FIXUP_FAILED"
    # why, not only what: the receiver's "reason" reaches the agent's message
    assert exc.value.message.endswith("failed with 422: a fixup failed: first try")
    time.sleep(0.3)
    assert thread.is_alive() and rebooted == []  # still in migration mode
    assert client.hello()["protocol"] == PROTOCOL_VERSION
    # the fixups' report goes back to the agent, which logs it
    assert client.post_json("/v1/finalize", {}) == {"status": "ready to boot", "fixups": report}
    thread.join(timeout=30)
    assert not thread.is_alive() and result == [True]
    assert len(rebooted) == 1 and len(fixups) == 2


def test_agent_refuses_another_protocol_and_picks_a_shared_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent from another rehost version stops at the hello with PROTOCOL_MISMATCH and
    a hint, before sending anything; the hash is the fastest both sides list."""
    from rehost.online.agent.client import ReceiverClient, _common_hash
    from rehost.online.protocol import AgentError
    from rehost.online.receiver import server

    assert _common_hash(["sha256"]) == "sha256"
    assert _common_hash(["sha256", "xxh128"]) == "xxh128"
    assert _common_hash(None) == "blake3"  # a receiver that lists none: blake3 and sha256
    monkeypatch.setattr(server, "run_fixups", lambda mounts, **context: None)
    monkeypatch.setattr(server, "PROTOCOL_VERSION", PROTOCOL_VERSION - 1)
    root = tmp_path / "root"
    root.mkdir()
    bound: list[str] = []
    thread = threading.Thread(
        target=server.serve,
        args=("127.0.0.1:0", TOKEN, tmp_path / "state", {}),
        kwargs={"roots": {"root": root}, "ready": bound.append},
        daemon=True,
    )
    thread.start()
    wait_for("the receiver", lambda: bool(bound), None, 30)
    fingerprint = (tmp_path / "state" / "fingerprint").read_text().strip()
    client = ReceiverClient(bound[0], TOKEN, fingerprint, retry_seconds=5)
    with pytest.raises(AgentError) as exc:
        client.post_json("/v1/finish/root", {"pass": 1})
    assert exc.value.code == "PROTOCOL_MISMATCH"
    assert "same rehost version" in exc.value.hint
    assert not (tmp_path / "state" / "journal").exists()  # nothing was applied
    monkeypatch.setattr(server, "PROTOCOL_VERSION", PROTOCOL_VERSION)
    assert client.hello()["hashes"][0] == client.hash_alg == "xxh128"
    assert client.post_json("/v1/finalize", {}) == {"status": "ready to boot"}
    thread.join(timeout=30)
    assert not thread.is_alive()


def test_reboot_falls_back_to_reboot8(monkeypatch: pytest.MonkeyPatch) -> None:
    """`systemctl reboot` first, `reboot` when that fails; REBOOT_FAILED when both do. The
    commands are recorded, not run."""
    from rehost.cli import receive

    calls: list[list[str]] = []

    def fake_run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        if argv[0] == "systemctl":
            raise FileNotFoundError(2, "No such file or directory")
        return subprocess.CompletedProcess(argv, returncode, "", "not permitted")

    monkeypatch.setattr(subprocess, "run", fake_run)
    returncode = 0
    receive.reboot()
    assert calls == [["systemctl", "reboot"], ["reboot"]]
    returncode = 1
    with pytest.raises(receive.RebootFailed) as exc:
        receive.reboot()
    assert exc.value.code == "REBOOT_FAILED"
    assert "systemctl: No such file or directory" in exc.value.reason
