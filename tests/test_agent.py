"""The agent's config, prechecks, command line, logs, bundle and its run on an old Python.

Fakes stand in for the layout discovery and the receiver where the point is the agent's own
logic (exit status, lines, what it posts); the bundle tests run the real zipapp with real
interpreters (the host's, Python 3.6 when pyenv has it, and bullseye's own 3.9 in a chroot).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from rehost.online.agent import config as agent_config
from rehost.online.agent import main as agent_main
from rehost.online.agent.config import load, parse
from rehost.online.agent.precheck import Check, os_family, run_prechecks
from rehost.online.bundle import build_bundle
from rehost.online.protocol import AgentError

MiB = 1024 * 1024
GiB = 1024 * MiB
FP = "ab" * 32
AGENT_DIR = Path(agent_main.__file__).parent
PY36 = Path("/root/.pyenv/versions/3.6.15/bin/python3.6")


def minimal() -> dict[str, Any]:
    return {"Destination": {"Address": "10.0.0.2", "Token": "t0k", "Fingerprint": FP}}


def invalid(raw: Any) -> str:
    with pytest.raises(AgentError) as exc:
        parse(raw, "/x/config.json")
    assert exc.value.code == "CONFIG_INVALID"
    return exc.value.message


# -- config ------------------------------------------------------------------------------


def test_config_defaults() -> None:
    c = parse(minimal(), "/opt/agent/config.json")
    assert (c.host, c.port, c.address) == ("10.0.0.2", 443, "10.0.0.2:443")
    assert (c.token, c.fingerprint) == ("t0k", FP)
    assert (c.data_disks, c.excludes, c.bandwidth_kbps, c.compression, c.proxy) == (
        [],
        [],
        0,
        "auto",
        None,
    )
    assert c.base_dir == "/opt/agent"


def test_config_full() -> None:
    raw = minimal()
    raw["Destination"].update(Address="[fd00::2]:8443", Fingerprint=":".join(["AB"] * 32))
    raw.update(
        DataDisks=[{"Index": 1, "MountPoint": "/data/"}, {"Index": 2, "MountPoint": "/srv"}],
        Excludes=["/var/tmp/*"],
        BandwidthLimitKBps=2048,
        Compression="off",
        Proxy="gw.example:3128",
    )
    c = parse(raw, "config.json")
    assert (c.host, c.port, c.address, c.fingerprint) == ("fd00::2", 8443, "[fd00::2]:8443", FP)
    assert [(d.number, d.mount_point) for d in c.data_disks] == [(1, "/data"), (2, "/srv")]
    assert (c.excludes, c.bandwidth_kbps, c.compression, c.proxy) == (
        ["/var/tmp/*"],
        2048,
        "off",
        "gw.example:3128",
    )


def test_config_unknown_keys_are_named_at_every_level() -> None:
    assert "'Excludess'" in invalid({**minimal(), "Excludess": []})
    raw = minimal()
    raw["Destination"]["Adress"] = "x"
    assert "'Adress' in Destination" in invalid(raw)
    raw = {**minimal(), "DataDisks": [{"Index": 1, "MountPoint": "/d", "Size": 5}]}
    assert "'Size' in DataDisks[0]" in invalid(raw)


@pytest.mark.parametrize(
    ("patch", "named"),
    [
        ({"BandwidthLimitKBps": "10"}, "BandwidthLimitKBps must be an integer, not a string"),
        ({"BandwidthLimitKBps": -1}, "BandwidthLimitKBps must be at least 0"),
        ({"Compression": "gzip"}, "Compression must be one of auto, zstd, off"),
        ({"Proxy": "gw.example"}, "Proxy needs a port"),
        ({"Excludes": "/tmp/*"}, "Excludes must be a list, not a string"),
        ({"Excludes": ["var/tmp"]}, "Excludes[0] must be an absolute pattern"),
        ({"DataDisks": [{"Index": True, "MountPoint": "/d"}]}, "DataDisks[0].Index must be an"),
        (
            {"DataDisks": [{"Index": 0, "MountPoint": "/d"}]},
            "DataDisks[0].Index must be at least 1",
        ),
        ({"DataDisks": [{"Index": 1, "MountPoint": "d"}]}, "DataDisks[0].MountPoint must be"),
        ({"DataDisks": {"Index": 1}}, "DataDisks must be a list, not an object"),
        ({"Destination": []}, "Destination must be an object, not a list"),
        ({"Destination": {"Address": "h", "Token": "t"}}, "missing key 'Fingerprint'"),
        ({"Destination": {"Address": "h:0", "Token": "t", "Fingerprint": FP}}, "invalid port"),
        ({"Destination": {"Address": "h", "Token": 5, "Fingerprint": FP}}, "Destination.Token"),
        ({"Destination": {"Address": "h", "Token": "t", "Fingerprint": "abc"}}, "64 hex digits"),
    ],
)
def test_config_bad_values(patch: dict[str, Any], named: str) -> None:
    assert named in invalid({**minimal(), **patch})


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match="cannot read the config file"):
        load(str(tmp_path / "missing.json"))
    (tmp_path / "c.json").write_text("{nope")
    with pytest.raises(AgentError, match="is not valid JSON") as exc:
        load(str(tmp_path / "c.json"))
    assert exc.value.code == "CONFIG_INVALID"
    assert invalid([]) == "the config must be an object, not a list"


def test_excludes(tmp_path: Path) -> None:
    swaps = tmp_path / "swaps"
    swaps.write_text(
        "Filename\tType\tSize\tUsed\tPriority\n/dev/vda3 partition 1 0 -2\n"
        "/srv/tree/swap\\040file file 1 0 -3\n/swapfile file 1 0 -4\n"
    )
    raw = {**minimal(), "Excludes": ["/data/cache/*", "/var/tmp/*"]}
    c = parse(raw, "/srv/tree/opt/agent/config.json")
    got = agent_config.effective_excludes(
        c, "/srv/tree", ["/srv/tree/opt/agent", "/elsewhere"], str(swaps)
    )
    assert got == [*agent_config.DEFAULT_EXCLUDES, "/swap file", "/opt/agent", *raw["Excludes"]]
    on_host = agent_config.effective_excludes(c, "/", [], str(swaps))
    assert "/srv/tree/swap file" in on_host and "/swapfile" in on_host
    assert agent_config.excludes_for_mount(got, "/data") == ["/cache/*"]
    assert agent_config.excludes_for_mount(got, "/") == got


def test_an_agent_folder_reached_through_a_symlink_is_excluded(tmp_path: Path) -> None:
    """--config /root/agent/config.json with /root/agent a symlink to /opt/rehost-agent: the
    walk sees /opt/rehost-agent, so that is what the exclude must name. By the link's name,
    the folder (its token, log/ and state/) was migrated."""
    real = tmp_path / "opt" / "rehost-agent"
    real.mkdir(parents=True)
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "agent").symlink_to(real)
    c = parse(minimal(), str(tmp_path / "root" / "agent" / "config.json"))
    got = agent_config.effective_excludes(c, str(tmp_path), [c.base_dir], "/nonexistent")
    assert got == [*agent_config.DEFAULT_EXCLUDES, "/opt/rehost-agent"]


def test_files_the_receiver_rejects_are_counted_as_changed(tmp_path: Path) -> None:
    """The receiver names in "failed" the files whose hash did not match what arrived (they
    changed while read); the agent dropped that list, so a final pass could report "ready
    to boot" with one of them half-patched. One that failed mid-read goes with no hash and
    counts as unreadable only. (A stand-in answers for the receiver, whose side is tested
    in test_online_transfer; the read error is injected.)"""
    from rehost.online.agent.transfer import sync_filesystem

    for name in ("a", "b", "c"):
        (tmp_path / name).write_bytes(name.encode() * 100)

    class Receiver:
        hash_alg, payload_bytes, bytes_on_wire, send_wait = "sha256", 0, 0, 0.0

        def post_frames(self, path: str, frames: Any) -> dict[str, Any]:
            if path.startswith("/v1/manifest/"):  # entries: root, a, b, c
                return {"needs": [[1, "full"], [2, "full"], [3, "full"]], "batch": 1}
            ends = [json.loads(f[5:]) for f in frames if isinstance(f, bytes) and f[:1] == b"Z"]
            blank = [end["i"] for end in ends if not end["hash"]]
            return {"failed": [1, *blank]}  # a arrived wrong (it changed while read)

        def post_json(self, path: str, body: Any) -> dict[str, Any]:
            return {"deleted": 0}

    real = os.pread
    c_size = os.stat(tmp_path / "c").st_size

    def failing(fd: int, *args: Any) -> bytes:
        if os.fstat(fd).st_size == c_size and os.readlink(f"/proc/self/fd/{fd}").endswith("/c"):
            raise OSError(5, "Input/output error")
        return real(fd, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "pread", failing)
        stats = sync_filesystem(Receiver(), "root", str(tmp_path), [], compression="off")
    assert (stats["changed"], stats["unreadable"], stats["files_sent"]) == (1, 1, 2), stats


@pytest.mark.parametrize("changes", [[3, 0], [1, 1, 1]])
def test_the_finalize_repeats_its_pass_while_files_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, changes: list[int]
) -> None:
    """A final pass with files that changed while sent runs again (they are resent: the
    receiver zeroed their mtime); if they keep changing, SOURCE_CHANGING, not "ready to
    boot". (The passes are stand-ins: what they count is tested above.)"""
    from types import SimpleNamespace

    agent = agent_main.Agent(parse(minimal(), str(tmp_path / "config.json")), str(tmp_path))
    passes: list[int] = []
    left = list(changes)
    posted: list[str] = []

    def sync_all(what: str, pass_no: int) -> int:
        passes.append(pass_no)
        return left.pop(0)

    def post_json(path: str, body: Any) -> dict[str, Any]:
        posted.append(path)
        return {}

    monkeypatch.setattr(agent, "sync_all", sync_all)
    agent._client = SimpleNamespace(post_json=post_json)
    if changes[-1]:
        with pytest.raises(AgentError) as exc:
            agent.finalize()
        assert exc.value.code == "SOURCE_CHANGING" and posted == []
    else:
        agent.finalize()
        assert posted == ["/v1/finalize"]
    assert passes == list(range(1, len(changes) + 1))


def test_walk_applies_excludes_at_any_depth(tmp_path: Path) -> None:
    """Directories whose path diverges from every pattern's literal start skip the pattern
    match; the result is the same as matching every path."""
    from rehost.online.agent.transfer import _Walker

    for rel in ["data/scratch/x/deep", "data/keep", "var/log/apt", "usr/share", "swap dir"]:
        (tmp_path / rel).mkdir(parents=True)
    for rel in ["data/scratch/x/deep/f", "data/keep/a.tmp", "data/keep/b", "var/log/apt/h.gz",
                "var/log/apt/h.txt", "usr/share/c.tmp", "usr/share/d", "swap dir/s"]:  # fmt: skip
        (tmp_path / rel).write_text("x")
    patterns = ["/data/scratch/*", "/var/log/*.gz", "*.tmp", "/swap dir/s"]
    walker = _Walker(str(tmp_path), patterns, None)
    sent = {entry["p"].decode() for entry, _ in walker.walk()}
    assert sent == {"", "data", "data/scratch", "data/keep", "data/keep/b", "var", "var/log",
                    "var/log/apt", "var/log/apt/h.txt", "usr", "usr/share", "usr/share/d",
                    "swap dir"}  # fmt: skip
    anchored = _Walker(str(tmp_path), ["/data/scratch/*", "/var/log/*.gz"], None)
    assert anchored._may_exclude_below(b"data") and anchored._may_exclude_below(b"var/log/apt")
    assert not anchored._may_exclude_below(b"usr/share")
    assert not anchored._may_exclude_below(b"data/keep")


@pytest.mark.parametrize("kind", ["files", "directories"])
def test_the_walk_holds_a_directory_as_its_names(tmp_path: Path, kind: str) -> None:
    """While a directory's children are sent, and its subdirectories wait for their turn,
    the walk holds their names, not a stat per child (~0.7 KiB each: GBs for a directory
    of millions on a live source)."""
    import tracemalloc

    from rehost.online.agent.transfer import _Walker

    big = tmp_path / "big"
    big.mkdir()
    count = 50_000
    for k in range(count):
        if kind == "files":
            os.close(os.open(big / f"some-file-{k:06d}.log", os.O_CREAT | os.O_WRONLY, 0o644))
        else:
            os.mkdir(big / f"some-dir-{k:06d}.d")
    tracemalloc.start()
    try:
        sent = sum(1 for _ in _Walker(str(tmp_path), [], None).walk())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sent == count + 2
    # the names (~70 bytes each), and a waiting subdirectory's path, not their stats
    assert peak < 200 * count, peak


def test_a_huge_directory_is_listed_in_slices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory whose child names exceed a slice goes as several entries: all but the
    last say "more", all but the first "cont", and together they list every name in order
    (the slice size is lowered here)."""
    from rehost.online import protocol
    from rehost.online.agent import transfer

    (tmp_path / "big").mkdir()
    names = [f"name-{k:04d}" for k in range(40)]
    for name in names:
        (tmp_path / "big" / name).write_text("x")
    monkeypatch.setattr(protocol, "CHILD_SLICE_BYTES", 100)  # ten 10-byte names a slice
    entries = [
        protocol.decode_entry(frame[5:])
        for _, frames in transfer._batches(transfer._Walker(str(tmp_path), [], None))
        for frame in frames
    ]
    slices = [e for e in entries if e["t"] == "d" and e["p"] == "big"]
    assert [(e["more"], e["cont"]) for e in slices] == [
        (True, False), (True, True), (True, True), (False, True)
    ]  # fmt: skip
    assert [os.fsdecode(n) for e in slices for n in e["c"]] == names
    assert [e["p"] for e in entries if e["t"] == "f"] == [f"big/{n}" for n in names]


def test_an_entry_too_large_for_a_frame_stops_the_walk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry that would exceed a frame even alone (its xattrs) stops the agent with
    ENTRY_TOO_LARGE naming it, instead of a BAD_FRAME from the receiver (the frame limit is
    lowered here)."""
    from rehost.online.agent import transfer

    big = tmp_path / "big"
    big.write_text("x")
    os.setxattr(big, "user.note", b"y" * 500)
    monkeypatch.setattr(transfer, "MAX_FRAME", 400)
    with pytest.raises(AgentError) as exc:
        list(transfer._batches(transfer._Walker(str(tmp_path), [], None)))
    assert exc.value.code == "ENTRY_TOO_LARGE" and str(big) in exc.value.message
    assert "Excludes" in exc.value.hint


def test_batches_end_at_their_xattr_count_and_a_file_over_1_pib_stops_the_walk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The receiver bounds a manifest's xattrs (as objects they took 15 times their bytes) and
    a file's size (its END hash costs its block count): the agent ends a batch at
    BATCH_XATTRS, lowered here to 3, and stops with FILE_TOO_LARGE on a file over the cap
    (lowered too: no filesystem here holds 1 PiB)."""
    from rehost.online.agent import transfer

    for k in range(4):
        (tmp_path / f"f{k}").write_text("x")
        for n in range(2):
            os.setxattr(tmp_path / f"f{k}", f"user.n{n}", b"v")
    monkeypatch.setattr(transfer, "BATCH_XATTRS", 3)
    batches = [b for b, _ in transfer._batches(transfer._Walker(str(tmp_path), [], None))]
    assert [[e["p"] for e, _ in b] for b in batches] == [
        [b"", b"f0", b"f1"], [b"f2", b"f3"]
    ]  # fmt: skip
    os.truncate(tmp_path / "f2", 4097)
    monkeypatch.setattr(transfer, "MAX_FILE_SIZE", 4096)
    with pytest.raises(AgentError) as exc:
        list(transfer._batches(transfer._Walker(str(tmp_path), [], None)))
    assert exc.value.code == "FILE_TOO_LARGE" and str(tmp_path / "f2") in exc.value.message


def test_auto_compression_follows_the_link(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto compresses until its first decision, after 0.1 s of streaming summed over short
    streams (gaps between them do not count); then only while the agent mostly waits on
    the link at under 64 MiB/s of file data, judged again every 0.5 s."""
    from types import SimpleNamespace

    from rehost.online.agent import transfer
    from rehost.online.protocol import CODEC_RAW

    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(transfer, "time", SimpleNamespace(monotonic=lambda: clock.now))
    text = b"the same line of text, over and over\n" * 4096

    def packs(c: Any, client: Any, at: float, waited: float, payload: int) -> bool:
        """Advance to `at` with the link's counters moved; True if the chunk was packed."""
        clock.now = at
        client.send_wait += waited
        client.payload_bytes += payload
        return bool(c.pack(text)[0] != CODEC_RAW)

    fast = SimpleNamespace(send_wait=0.0, payload_bytes=0)
    c = transfer._Compressor("auto", fast)
    c.new_stream()
    assert packs(c, fast, 0.05, 0.0, 20 << 20)  # no decision yet: compress
    c.end_stream()
    clock.now = 5.0  # a manifest round trip: not streaming time
    c.new_stream()
    assert not packs(c, fast, 5.06, 0.0, 20 << 20)  # 0.11 s streamed, never waiting: off
    assert not packs(c, fast, 5.3, 0.0, 20 << 20)

    slow = SimpleNamespace(send_wait=0.0, payload_bytes=0)
    c = transfer._Compressor("auto", slow)
    clock.now = 10.0
    c.new_stream()
    assert packs(c, slow, 10.2, 0.15, 1 << 20)  # mostly waiting at ~5 MB/s: keep compressing
    assert packs(c, slow, 10.5, 0.25, 1 << 20)
    assert not packs(c, slow, 10.8, 0.0, 60 << 20)  # 0.6 s later: no more waiting, fast
    c.end_stream()


# -- prechecks with fakes ----------------------------------------------------------------


def fake_layout(data_used: int = 3 * GiB) -> dict[str, Any]:
    """discover()'s shape: a system disk (/, /boot, swap), a data disk and an unlisted one."""

    def mount(mount: str, fs_id: str, dev: str, disk: str, index: str, used: int) -> dict[str, Any]:
        return {
            "mount": mount,
            "path": "/srv/src" + mount.rstrip("/"),
            "fs_id": fs_id,
            "device": dev,
            "disk": disk,
            "disk_index": index,
            "fs": "ext4",
            "uuid": "u-" + fs_id,
            "label": "",
            "used": used,
            "size": 10 * GiB,
        }

    def part(number: int, size: int, m: dict[str, Any] | None = None) -> dict[str, Any]:
        """A partition as discover() reports it: that of mount m, else a swap partition."""
        fs, fs_id, used = (m["fs"], m["fs_id"], m["used"]) if m else ("swap", None, 0)
        return dict(
            number=number, start=2048 * number, size=size, type="83", fs=fs, fs_id=fs_id, used=used
        )

    mounts = [
        mount("/", "root", "/dev/vda1", "/dev/vda", "0", 2 * GiB),
        mount("/boot", "boot", "/dev/vda2", "/dev/vda", "0", 100 * MiB),
        mount("/data", "data", "/dev/vdb1", "/dev/vdb", "1", data_used),
        mount("/scratch", "scratch", "/dev/vdc1", "/dev/vdc", "2", MiB),
    ]
    root, boot, data, scratch = mounts
    return {
        "label": "gpt",
        "disks": {
            "0": {
                "label": "gpt",
                "partitions": [part(1, 6 * GiB, root), part(2, GiB, boot), part(3, GiB)],
            },
            "1": {"label": "gpt", "partitions": [part(1, 10 * GiB, data)]},
            "2": {"label": "dos", "partitions": [part(1, 10 * GiB, scratch)]},
        },
        "mounts": mounts,
        "swap": [{"device": "/dev/vda3", "size": GiB}],
        "ignored": [{"mount": "/mnt/nfs", "fs": "nfs4", "reason": "network filesystem"}],
        "unsupported": [],
    }


class FakeClient:
    def __init__(self, sizes: dict[str, int], skew: float = 0.0, fail: bool = False) -> None:
        self.sizes, self.skew, self.fail = sizes, skew, fail
        self.posts: list[tuple[str, Any]] = []
        self.payload_bytes = 0

    def hello(self) -> dict[str, Any]:
        if self.fail:
            raise AgentError("FINGERPRINT_MISMATCH", "the receiver presented another cert", "h")
        disks = {k: {"path": f"/dev/x{k}", "size": v} for k, v in self.sizes.items()}
        return {"protocol": 1, "time": time.time() + self.skew, "disks": disks}

    def post_json(self, path: str, obj: dict[str, Any]) -> dict[str, Any]:
        self.posts.append((path, obj))
        if path == "/v1/prepare":
            return {"filesystems": {"root": {}, "boot": {}, "data": {}}}
        return {"status": "ready to boot"}


def write_os_release(root: Path, text: str) -> None:
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "os-release").write_text(text)


def make_config(folder: Path, **extra: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    raw = {**minimal(), "DataDisks": [{"Index": 1, "MountPoint": "/data"}], **extra}
    path = folder / "config.json"
    path.write_text(json.dumps(raw))
    return path


def lines(checks: list[Check]) -> list[str]:
    return [c.line() for c in checks]


def test_os_family(tmp_path: Path) -> None:
    write_os_release(tmp_path, 'ID="rocky"\nID_LIKE="rhel centos fedora"\nPRETTY_NAME="Rocky 9"\n')
    assert os_family(str(tmp_path)) == ("rhel", "Rocky 9")
    write_os_release(tmp_path, "ID=ubuntu\nID_LIKE=debian\n")
    assert os_family(str(tmp_path)) == ("debian", "ubuntu")
    write_os_release(tmp_path, "ID=opensuse-leap\nID_LIKE=suse\n")
    assert os_family(str(tmp_path)) == ("", "opensuse-leap")


def test_prechecks_pass_with_warnings(tmp_path: Path) -> None:
    write_os_release(tmp_path, "ID=debian\nPRETTY_NAME=Debian 12\n")
    c = load(str(make_config(tmp_path / "agent")))
    checks = run_prechecks(
        c, fake_layout(), FakeClient({"0": 8 * GiB, "1": 4 * GiB}), str(tmp_path)
    )
    out = lines(checks)
    assert out[0] == "OK    os: Debian 12 (debian family)"
    assert out[1].startswith("OK    disks: 3 (gpt): /dev/vda: / ext4, /boot ext4; /dev/vdb")
    assert "WARN  ignored: /mnt/nfs (nfs4): network filesystem; not migrated" in out
    assert "OK    used /data: 3.0 GiB of 10.0 GiB (ext4 on /dev/vdb1)" in out
    assert "WARN  left out: /scratch not on the system disk nor in DataDisks: not migrated" in out
    assert "OK    receiver: 10.0.0.2:443 reachable, fingerprint matches, protocol 1" in out
    assert (
        "OK    destination: not prepared yet: --stage prepare partitions and formats /dev/x0, "
        "/dev/x1 (what they hold is lost)"
    ) in out
    # disk 0: (2 GiB + 100 MiB) × 1.1 + 2 × 64 MiB, swap shrunk to 64 MiB, GPT's 2 MiB
    assert "OK    capacity disk 0: need 2.5 GiB, have 8.0 GiB on /dev/x0" in out
    assert "OK    capacity disk 1: need 3.4 GiB, have 4.0 GiB on /dev/x1" in out
    # the fake answers at once, between the agent's two clock reads: a skew under half their
    # interval, of either sign ("-0.0" when it answered in the first half: a loaded run saw it)
    assert any(re.fullmatch(r"OK    clock: skew [+-]0\.[0-4] s", line) for line in out), out
    assert out[-1].startswith("OK    state space: ")
    assert not [c for c in checks if c.status == "FAIL"]


def test_prechecks_fail(tmp_path: Path) -> None:
    c = load(str(make_config(tmp_path / "agent")))
    layout = fake_layout(data_used=4 * GiB)
    layout["unsupported"] = ["/home is on /dev/dm-0, device-mapper (LVM), which is not supported"]
    out = lines(run_prechecks(c, layout, FakeClient({"0": 8 * GiB, "1": 4 * GiB}, skew=-30), "/x"))
    assert out[0] == "WARN  os: unknown: not a RHEL- or Debian-family system; untested"
    assert (
        "FAIL  layout: unsupported: /home is on /dev/dm-0, device-mapper (LVM), which is not supported"
        in out
    )
    need = -(-(int(4 * GiB * 1.1) + 64 * MiB) // MiB) * MiB + 2 * MiB  # MiB-aligned, + GPT's
    assert (
        f"FAIL  capacity disk 1: DESTINATION_TOO_SMALL: need 4.5 GiB ({need} bytes), "
        f"have 4.0 GiB ({4 * GiB} bytes) on /dev/x1" in out
    )
    assert any(line.startswith("WARN  clock: the receiver's clock is -30.0 s off") for line in out)
    out = lines(run_prechecks(c, fake_layout(), FakeClient({"0": 8 * GiB}), "/x"))
    assert (
        "FAIL  capacity disk 1: DESTINATION_DISK_MISSING: the receiver has no disk 1 (start it with --data-disk 1=DEV)"
        in out
    )
    out = lines(run_prechecks(c, fake_layout(), FakeClient({}, fail=True), "/x"))
    assert (
        "FAIL  receiver: FINGERPRINT_MISMATCH: the receiver presented another cert (10.0.0.2:443)"
        in out
    )
    assert "WARN  capacity: not checked: the receiver is unreachable" in out


def test_prechecks_data_disk_mapping(tmp_path: Path) -> None:
    disks = [{"Index": 1, "MountPoint": "/boot"}, {"Index": 2, "MountPoint": "/nope"}]
    c = load(str(make_config(tmp_path / "agent", DataDisks=disks)))
    out = lines(run_prechecks(c, fake_layout(), FakeClient({"0": 8 * GiB}), "/x"))
    assert (
        "FAIL  data disk 1: /boot is on the system disk /dev/vda, which migrates to disk 0 "
        "anyway; remove it from DataDisks" in out
    )
    assert "FAIL  data disk 2: /nope is not a mounted filesystem" in out


# -- main with fakes ---------------------------------------------------------------------


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    """discover, ReceiverClient and sync_filesystem replaced; records what the agent did."""
    from rehost.online.agent import client, layout, transfer

    seen: dict[str, Any] = {"client": FakeClient({"0": 8 * GiB, "1": 4 * GiB}), "syncs": []}
    write_os_release(tmp_path / "src", "ID=debian\n")

    def sync(c: Any, fs_id: str, root: str, excludes: list[str], **kw: Any) -> dict[str, int]:
        seen["syncs"].append((fs_id, root, excludes, kw["pass_no"]))
        return {"entries": 3, "files_sent": 1}

    monkeypatch.setattr(layout, "discover", lambda root: fake_layout())
    monkeypatch.setattr(client, "ReceiverClient", lambda *a, **kw: seen["client"])
    monkeypatch.setattr(transfer, "sync_filesystem", sync)
    return seen


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    status = agent_main.main(list(argv))
    return status, capsys.readouterr().out.splitlines()


def test_source_identity_falls_back_from_machine_id_to_hostname(tmp_path: Path) -> None:
    from rehost.online.protocol import source_identity

    assert source_identity(str(tmp_path)) == "hostname:unknown unknown"
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "hostname").write_text("web1.example\n")
    assert source_identity(str(tmp_path)) == "hostname:web1.example web1.example"
    dbus = tmp_path / "var" / "lib" / "dbus"
    dbus.mkdir(parents=True)
    (dbus / "machine-id").write_text("b" * 32 + "\n")
    assert source_identity(str(tmp_path)) == f"machine-id:{'b' * 32} web1.example"
    (tmp_path / "etc" / "machine-id").write_text("a" * 32 + "\n")  # systemd's comes first
    assert source_identity(str(tmp_path)) == f"machine-id:{'a' * 32} web1.example"
    (tmp_path / "etc" / "hostname").write_text("we b\x01\xff;1\n")  # kept header-safe
    assert source_identity(str(tmp_path)).endswith(" web1")


def test_main_check(
    fakes: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = str(make_config(tmp_path / "agent"))
    src = str(tmp_path / "src")
    status, out = run_main(capsys, "--config", cfg, "--check", "--source-root", src)
    assert status == 0
    assert out[0] == "OK    os: debian (debian family)"
    assert out[-1] == "check passed; next: run --stage prepare (or --stage all on a quiet server)"
    assert not fakes["client"].posts and not fakes["syncs"]  # --check changes nothing
    assert not (tmp_path / "agent" / "state").exists()
    log_text = (tmp_path / "agent" / "log" / "agent.log").read_text()
    assert "precheck OK    receiver" in log_text and "t0k" not in log_text  # never the token

    fakes["client"].sizes = {"0": GiB, "1": 4 * GiB}
    status, out = run_main(capsys, "--config", cfg, "--check", "--source-root", src)
    assert status == 1
    assert any(line.startswith("FAIL  capacity disk 0: DESTINATION_TOO_SMALL") for line in out)
    assert out[-1] == "check failed: 1 FAIL; fix them, then run --check again"


def test_main_stages(
    fakes: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "src" / "opt" / "agent"  # inside the source: excluded
    cfg = str(make_config(folder, Excludes=["/data/cache/*"]))
    src = str(tmp_path / "src")
    status, out = run_main(capsys, "--config", cfg, "--stage", "transfer", "--source-root", src)
    assert status == 0
    assert out[-1] == (
        "transfer complete; run --stage transfer again to catch up, or stop your services and "
        "run --stage finalize"
    )
    assert [(s[0], s[1], s[3]) for s in fakes["syncs"]] == [
        ("root", "/srv/src", 1),
        ("boot", "/srv/src/boot", 1),
        ("data", "/srv/src/data", 1),
    ]
    root_excludes = fakes["syncs"][0][2]
    assert root_excludes[:2] == ["/dev/*", "/proc/*"] and "/opt/agent" in root_excludes
    assert fakes["syncs"][2][2] == ["/cache/*"]

    fakes["syncs"].clear()
    status, out = run_main(capsys, "--config", cfg, "--stage", "all", "--source-root", src)
    assert (
        status == 0 and out[-1] == "ready to boot: the destination disks are synced and unmounted"
    )
    (prepare, body), (finalize, _) = fakes["client"].posts
    assert (prepare, finalize) == ("/v1/prepare", "/v1/finalize")
    assert sorted(body["disks"]) == ["0", "1"] and body["disks"]["1"]["label"] == "gpt"
    assert set(body) == {"label", "disks", "swap"}
    # all = prepare, transfer (pass 2), then the final pass (3)
    assert [s[3] for s in fakes["syncs"]] == [2, 2, 2, 3, 3, 3]
    state = json.loads((folder / "state" / "agent.json").read_text())
    assert (state["completed"], state["passes"]) == (["transfer", "prepare", "finalize"], 3)

    status, out = run_main(capsys, "--config", cfg, "--stage", "all", "--source-root", src)
    assert (status, out[-1]) == (0, "already finalized: the destination is ready to boot")
    status, out = run_main(capsys, "--config", cfg, "--stage", "transfer", "--source-root", src)
    assert status == 1 and out[-1].startswith("failed: ALREADY_FINALIZED: this migration was")


def test_one_agent_at_a_time_per_folder(
    fakes: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second agent started from the same folder while one runs stops at once, naming it."""
    import fcntl

    folder = tmp_path / "src" / "opt" / "agent"
    cfg = str(make_config(folder))
    args = ("--config", cfg, "--stage", "transfer", "--source-root", str(tmp_path / "src"))
    (folder / "state").mkdir()
    with open(folder / "state" / "agent.lock", "w") as held:  # the running agent's hold
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242")
        held.flush()
        status, out = run_main(capsys, *args)
    assert status == 1
    assert out[-1] == (
        "failed: AGENT_RUNNING: another agent is running from this folder (PID 4242) — wait "
        "for it to end, or stop it; then run this command again"
    )
    assert not fakes["syncs"]
    status, out = run_main(capsys, *args)  # it ended: the lock went with it
    assert status == 0 and fakes["syncs"], out
    status, out = run_main(capsys, *args)  # and a finished run let go of its own
    assert status == 0, out


def test_a_long_transfer_says_how_far_it_is(
    fakes: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A line every PROGRESS_SECONDS (shortened here) while a filesystem is sent: against
    the used bytes on the first pass, as bytes and a rate on later ones."""
    from rehost.online.agent import transfer

    client = fakes["client"]

    def slow(c: Any, fs_id: str, *a: Any, **kw: Any) -> dict[str, int]:
        for _ in range(6):  # 0.6 s: several periods, even on a loaded machine
            time.sleep(0.1)
            client.payload_bytes += 64 * 1024 * 1024
        return {"entries": 3, "files_sent": 1}

    monkeypatch.setattr(transfer, "sync_filesystem", slow)
    monkeypatch.setattr(agent_main, "PROGRESS_SECONDS", 0.1)
    cfg = str(make_config(tmp_path / "agent"))
    args = ("--config", cfg, "--stage", "transfer", "--source-root", str(tmp_path / "src"))
    status, out = run_main(capsys, *args)
    assert status == 0, out
    first = [line for line in out if line.startswith("  /data: ")]
    assert first and all(re.fullmatch(
        r"  /data: [\d.]+ (?:[KMGT]i)?B sent of ~3\.0 GiB \(\d+%\), [\d.]+ (?:[KMGT]i)?B/s(, about .+ left)?",
        line) for line in first), out  # fmt: skip
    assert any("left" in line for line in first), out
    status, out = run_main(capsys, *args)  # pass 2: what changed, no total
    later = [line for line in out if line.startswith("  /data: ")]
    assert later and all(re.fullmatch(r"  /data: [\d.]+ (?:[KMGT]i)?B sent, [\d.]+ (?:[KMGT]i)?B/s", line)
                         for line in later), out  # fmt: skip
    line = agent_main._Progress(client, "/", 10 * GiB).line(10 * GiB // 4, 100.0)
    assert line == "  /: 2.5 GiB sent of ~10.0 GiB (25%), 25.6 MiB/s, about 5 min left"


def test_main_failures(
    fakes: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = make_config(tmp_path / "agent", Bogus=1)
    status = agent_main.main(["--config", str(cfg), "--stage", "all"])
    printed = capsys.readouterr()
    assert status == 1
    last = printed.out.splitlines()[-1]
    assert last.startswith("failed: CONFIG_INVALID: unknown key 'Bogus' in the config")
    assert "resume" not in last
    assert "failed" not in printed.err  # the last line once, on stdout; the log file has it

    cfg = make_config(tmp_path / "agent")
    fakes["client"].sizes = {"0": GiB, "1": GiB}
    status, out = run_main(capsys, "--config", str(cfg), "--stage", "prepare")
    assert status == 1 and out[-1].startswith("failed: PRECHECK_FAILED: capacity disk 0:")
    assert not fakes["client"].posts  # a FAIL stops before anything changes

    fakes["client"].sizes = {"0": 8 * GiB, "1": 4 * GiB}

    def broken(*a: Any, **kw: Any) -> dict[str, int]:
        raise AgentError("RECEIVER_UNREACHABLE", "cannot reach the receiver", "check the port")

    from rehost.online.agent import transfer

    monkeypatch.setattr(transfer, "sync_filesystem", broken)
    status, out = run_main(capsys, "--config", str(cfg), "--stage", "transfer")
    assert status == 1
    assert out[-1] == (
        "failed: RECEIVER_UNREACHABLE: cannot reach the receiver — check the port; "
        "run the same command again to resume"
    )

    with pytest.raises(SystemExit) as exc:
        agent_main.main(["--config", str(cfg)])
    assert exc.value.code == 2  # one of --check or --stage is required


def test_console_and_log_take_undecodable_file_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file name's undecodable bytes (surrogates, as os.fsdecode gives them) are escaped on
    the console and in the log, where they raised (print) or printed a traceback (logging)."""
    handlers = agent_main.setup_logging(str(tmp_path))
    try:
        agent_main.show("sent /srv/w\udce9bb")
        # straight to the file handler: pytest's own log capture (and xdist) cannot take it
        record = logging.LogRecord(
            "rehost.online", logging.INFO, __file__, 1, "sent %s", ("/srv/w\udce9bb",), None
        )
        handlers[0].handle(record)
    finally:
        for h in handlers:
            agent_main.log.removeHandler(h)
            h.close()
    out, err = capsys.readouterr()
    assert (out, err) == ("sent /srv/w\\udce9bb\n", "")
    assert "sent /srv/w\\udce9bb" in (tmp_path / "log" / "agent.log").read_text()


def test_log_rotation(
    fakes: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(agent_main, "LOG_MAX_BYTES", 2000)
    cfg = str(make_config(tmp_path / "agent"))
    for _ in range(4):
        assert agent_main.main(["--config", cfg, "--check"]) == 0
    logs = sorted(p.name for p in (tmp_path / "agent" / "log").iterdir())
    assert logs[:3] == ["agent.log", "agent.log.1", "agent.log.2"]
    assert all(p.stat().st_size <= 2000 for p in (tmp_path / "agent" / "log").iterdir())
    capsys.readouterr()


# -- the command-line wrappers -----------------------------------------------------------


def test_cli_agent_and_bundle(
    fakes: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rehost.cli.agent import agent, agent_bundle

    app = typer.Typer()
    app.command(name="agent")(agent)
    app.command(name="agent-bundle")(agent_bundle)
    cfg = make_config(tmp_path / "agent")
    result = CliRunner().invoke(app, ["agent", "--config", str(cfg), "--check"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1].startswith("check passed")
    out = tmp_path / "rehost-agent.pyz"
    result = CliRunner().invoke(app, ["agent-bundle", str(out)])
    assert result.exit_code == 0, result.output
    assert out.stat().st_mode & 0o777 == 0o755


def test_cli_receive_parses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    from rehost.cli.receive import receive

    calls: list[tuple[Any, ...]] = []
    fake = types.ModuleType("rehost.online.receiver.server")
    fake.serve = lambda *a, **kw: calls.append((*a, kw))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "rehost.online.receiver.server", fake)
    app = typer.Typer()
    app.command()(receive)
    token = tmp_path / "token"
    token.write_text("s3cret-0123456789\n")
    state = tmp_path / "state"
    base = ["--token-file", str(token), "--state-dir", str(state)]
    runner = CliRunner()
    result = runner.invoke(
        app, [*base, "--listen", ":80", "--system-disk", "/dev/vdb", "--data-disk", "1=/dev/vdc"]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app, [*base, "--listen", "[::1]:8443", "--root", "root=/srv/r", "--no-fixups"]
    )
    assert result.exit_code == 0, result.output
    disks = {"1": "/dev/vdc", "0": "/dev/vdb"}
    assert calls == [
        (
            "0.0.0.0:80",
            "s3cret-0123456789",
            state,
            disks,
            {"roots": None, "on_finalized": None, "fixups": True},
        ),
        (
            "[::1]:8443",
            "s3cret-0123456789",
            state,
            {},
            {"roots": {"root": Path("/srv/r")}, "on_finalized": None, "fixups": False},
        ),
    ]
    for bad in (["--listen", "host"], ["--data-disk", "0=/dev/x"], ["--data-disk", "1"], []):
        result = runner.invoke(app, [*base, *bad, *([] if bad == [] else ["--system-disk", "/d"])])
        assert result.exit_code == 2, (bad, result.output)
    for weak in ("", "s3cret"):  # empty, or short enough to guess
        token.write_text(weak)
        result = runner.invoke(app, [*base, "--system-disk", "/d"])
        assert result.exit_code == 2 and "at least 16" in result.output, result.output
    assert len(calls) == 2  # no bad command line reached serve()
    token.unlink()  # a missing file gets a random token, which is what serve() is given
    result = runner.invoke(app, [*base, "--system-disk", "/d"])
    assert result.exit_code == 0 and f"wrote a new token to {token}" in result.output
    written = token.read_text().strip()
    assert len(written) >= 32 and calls[-1][1] == written
    assert token.stat().st_mode & 0o777 == 0o600


# -- the bundle --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("bundle") / "rehost-agent.pyz")


def test_agent_sources_stay_within_python36() -> None:
    vermin = Path(sys.executable).parent / "vermin"
    if not vermin.exists():
        pytest.skip("vermin is not installed in the venv (pip install vermin==1.9.2)")
    files = sorted(str(p) for p in AGENT_DIR.glob("*.py"))
    files.append(str(AGENT_DIR.parent / "protocol.py"))
    # --eval-annotations: `list[int]` in a signature is evaluated at import, and fails on 3.6
    proc = subprocess.run(
        [str(vermin), "--target=3.6-", "--no-tips", "--violations", "--eval-annotations", *files],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_bundle_contents_and_help(bundle: Path) -> None:
    import zipfile

    assert bundle.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    assert bundle.stat().st_mode & 0o777 == 0o755
    names = set(zipfile.ZipFile(bundle).namelist())
    assert {
        "__main__.py",
        "rehost/__init__.py",
        "rehost/online/__init__.py",
        "rehost/online/protocol.py",
        "rehost/online/agent/main.py",
        "rehost/online/agent/config.py",
    } <= names
    assert not [n for n in names if "receiver" in n or "/cli/" in n or n.endswith(".pyc")]
    proc = subprocess.run([bundle, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--source-root" in proc.stdout, proc.stderr


@pytest.mark.skipif(not PY36.exists(), reason="pyenv's Python 3.6.15 is not installed")
def test_bundle_runs_on_python36(bundle: Path, tmp_path: Path) -> None:
    """The real 3.6 imports every agent module: --check runs discovery and the client."""
    proc = subprocess.run([PY36, bundle, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    cfg = make_config(
        tmp_path / "agent", Destination={**minimal()["Destination"], "Address": "127.0.0.1:9"}
    )
    proc = subprocess.run(
        [PY36, bundle, "--config", cfg, "--check", "--source-root", tmp_path],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "FAIL  receiver: RECEIVER_UNREACHABLE" in proc.stdout, proc.stdout
    assert proc.stdout.splitlines()[-1].startswith("check failed:")


@pytest.mark.skipif(not PY36.exists(), reason="pyenv's Python 3.6.15 is not installed")
def test_bundle_on_python36_under_lang_c(bundle: Path, tmp_path: Path) -> None:
    """CentOS 7's python3 from cron or `ssh host cmd`: under LANG=C its stdout, file names
    and locale codec are ASCII. A bad config still ends with the failed: line, and --check
    with a non-ASCII mount point on the host (a tmpfs in a private mount namespace) and a
    non-ASCII source root runs to its last line: no traceback, the root named (escaped)."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}
    bad = make_config(tmp_path / "bad", Bogus=1)
    proc = subprocess.run(
        [PY36, bundle, "--config", bad, "--check"], capture_output=True, env=env, timeout=60
    )
    out, err = proc.stdout.decode("ascii"), proc.stderr.decode("ascii")
    assert proc.returncode == 1 and "Traceback" not in out + err, out + err
    assert out.splitlines()[-1].startswith("failed: CONFIG_INVALID: unknown key 'Bogus'"), out

    cfg = make_config(
        tmp_path / "agent",
        Destination={**minimal()["Destination"], "Address": "127.0.0.1:9"},
        DataDisks=[],
    )
    root = tmp_path / "src-é"
    (root / "srv" / "wébb").mkdir(parents=True)
    script = (
        'mount -t tmpfs none "$1/srv/wébb" && '
        'exec "$2" "$3" --config "$4" --check --source-root "$1"'
    )
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]
        + [str(a) for a in (root, PY36, bundle, cfg)],
        capture_output=True,
        env=env,
        timeout=120,
    )
    out, err = proc.stdout.decode("ascii"), proc.stderr.decode("ascii")
    assert proc.returncode == 1 and "Traceback" not in out + err, out + err
    escaped = str(root).replace("é", "\\xe9")
    assert (
        f"FAIL  layout: unsupported: no filesystem on a disk partition is mounted at {escaped}"
        in out
    )
    assert out.splitlines()[-1].startswith("check failed:"), out


def test_deleting_the_folder_removes_every_trace(bundle: Path, tmp_path: Path) -> None:
    """In a private mount namespace /tmp, /var/tmp, /dev/shm and $HOME are empty tmpfs: after
    a run they are still empty, and the agent's folder holds only its files, log/ and state/."""
    folder = tmp_path / "agent"
    make_config(folder, Destination={**minimal()["Destination"], "Address": "127.0.0.1:9"})
    shutil.copy(bundle, folder / "rehost-agent.pyz")
    script = (
        f"mount --bind {folder} /mnt && "
        "for d in /tmp /var/tmp /dev/shm /root; do mount -t tmpfs none $d; done && "
        "cd / && HOME=/root python3 /mnt/rehost-agent.pyz --config /mnt/config.json --check "
        "--source-root /mnt; echo status=$?; find /tmp /var/tmp /dev/shm /root -mindepth 1"
    )
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout.splitlines()
    assert "status=1" in out, proc.stdout + proc.stderr  # no receiver: the check FAILs
    assert out[out.index("status=1") + 1 :] == []  # nothing left in any temporary place
    made = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    assert made == ["config.json", "log", "log/agent.log", "rehost-agent.pyz"]


# -- the bundle on Debian bullseye's own Python 3.9 --------------------------------------


def _run(*args: str | os.PathLike[str]) -> str:
    return subprocess.run(
        [str(a) for a in args], check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.fixture
def bullseye(tmp_path: Path) -> Iterator[Path]:
    """The cached bullseye root under an overlay (the cache stays pristine; the upper dir
    shows what the run wrote), with /proc, /sys and /dev mounted; all undone afterwards."""
    from rootfs import bullseye_python

    lower = bullseye_python()
    upper, work, merged = tmp_path / "upper", tmp_path / "work", tmp_path / "merged"
    for d in (upper, work, merged):
        d.mkdir()
    _run(
        "mount",
        "-t",
        "overlay",
        "overlay",
        "-o",
        f"lowerdir={lower},upperdir={upper},workdir={work}",
        merged,
    )
    mounted = [merged]
    try:
        for fs, opts in (
            ("proc", ["-t", "proc", "proc"]),
            ("sys", ["-t", "sysfs", "sysfs"]),
            ("dev", ["--bind", "/dev"]),
        ):
            _run("mount", *opts, merged / fs)
            mounted.append(merged / fs)
        yield merged
    finally:
        for m in reversed(mounted):
            subprocess.run(["umount", "-l", m], check=False)


@pytest.fixture
def source_tree(bullseye: Path, tmp_path: Path) -> Iterator[Path]:
    """/srv/tree in the root: an ext4 partition on a GPT loop disk, with assorted entries."""
    image = tmp_path / "src.img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["sfdisk", "-q", image], input="label: gpt\n,,L\n", text=True, check=True)
    dev = _run("losetup", "-fP", "--show", image)
    part = f"{dev}p1"
    made_node = False
    tree = bullseye / "srv" / "tree"
    try:
        subprocess.run(["partx", "-u", dev], check=False)
        major_minor = Path(f"/sys/class/block/{Path(dev).name}p1/dev").read_text().strip()
        maj, mnr = major_minor.split(":")
        if os.path.exists(part) and os.stat(part).st_rdev != os.makedev(int(maj), int(mnr)):
            os.unlink(part)  # a stale node: partition minors are reused by other loop devices
        if not os.path.exists(part):
            _run("mknod", part, "b", maj, mnr)
            made_node = True
        _run("mkfs.ext4", "-q", "-L", "srcroot", part)
        tree.mkdir(parents=True)
        _run("mount", part, tree)
        try:
            (tree / "etc").mkdir()
            (tree / "etc" / "os-release").write_text("ID=debian\nPRETTY_NAME=tree\n")
            (tree / "bin").mkdir()
            (tree / "bin" / "tool").write_bytes(os.urandom(300_000))
            os.chmod(tree / "bin" / "tool", 0o4755)
            os.link(tree / "bin" / "tool", tree / "bin" / "tool-link")
            os.symlink("tool", tree / "bin" / "sym")
            (tree / "var" / "log").mkdir(parents=True)
            (tree / "var" / "log" / "big.log").write_bytes(b"line\n" * 200_000)
            with open(tree / "sparse", "wb") as f:
                f.seek(5 * MiB)
                f.write(b"end")
            os.mkfifo(tree / "fifo")
            os.setxattr(tree / "bin" / "tool", "user.note", b"hello")
            os.chown(tree / "var" / "log" / "big.log", 1234, 5678)
            (tree / "tmp").mkdir()
            (tree / "tmp" / "scratch").write_text("excluded")
            yield tree
        finally:
            subprocess.run(["umount", tree], check=False)
    finally:
        if made_node:  # before the detach, after which another worker may reuse this loopN
            os.unlink(part)
        subprocess.run(["losetup", "-d", dev], check=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """`rehost receive --root root=DIR` on 127.0.0.1, stopped by PID afterwards."""
    try:
        import rehost.online.receiver.server  # noqa: F401
    except ImportError:
        pytest.skip("rehost.online.receiver.server is not there yet (transfer core, part A)")
    state, dest, token = tmp_path / "rstate", tmp_path / "dest", tmp_path / "token"
    dest.mkdir()
    token.write_text("bullseye-token-0123456789")
    port = _free_port()
    code = (
        "import typer; from rehost.cli.receive import receive; "
        "app = typer.Typer(); app.command()(receive); app()"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            "--listen",
            f"127.0.0.1:{port}",
            "--token-file",
            token,
            "--state-dir",
            state,
            "--root",
            f"root={dest}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while not (state / "fingerprint").exists():
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "the receiver did not start"
            time.sleep(0.2)
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the receiver does not listen"
                time.sleep(0.2)
        fingerprint = (state / "fingerprint").read_text().strip()
        yield f"127.0.0.1:{port}", fingerprint, dest
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_bundle_migrates_from_bullseye_python39(
    bundle: Path,
    bullseye: Path,
    source_tree: Path,
    receiver: tuple[str, str, Path],
) -> None:
    address, fingerprint, dest = receiver
    version = _run("chroot", bullseye, "python3", "--version")
    assert version.startswith("Python 3.9"), version
    probe = "import importlib.util as u; print(u.find_spec('zstandard'), u.find_spec('blake3'))"
    assert _run("chroot", bullseye, "python3", "-c", probe) == "None None"  # stdlib only
    agent = bullseye / "opt" / "agent"
    agent.mkdir(parents=True)
    shutil.copy(bundle, agent / "rehost-agent.pyz")
    config = {
        "Destination": {
            "Address": address,
            "Token": "bullseye-token-0123456789",
            "Fingerprint": fingerprint,
        }
    }
    (agent / "config.json").write_text(json.dumps(config))
    proc = subprocess.run(
        [
            "chroot",
            bullseye,
            "python3",
            "/opt/agent/rehost-agent.pyz",
            "--config",
            "/opt/agent/config.json",
            "--stage",
            "transfer",
            "--source-root",
            "/srv/tree",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("transfer complete;")
    diff = _run(
        "rsync",
        "-aHAXn",
        "-c",
        "--itemize-changes",
        "--numeric-ids",
        "--exclude=/tmp/*",
        f"{source_tree}/",
        f"{dest}/",
    )
    assert diff == "", diff
    assert sorted(os.listdir(dest / "tmp")) == []  # excluded: recreated empty
    # what the run wrote inside the root: only the agent's folder (and the tree's mount point)
    upper = bullseye.parent / "upper"
    written = sorted(str(p.relative_to(upper)) for p in upper.rglob("*"))
    assert [w for w in written if not w.startswith(("opt", "srv"))] == [], written
    assert {"opt/agent/log/agent.log", "opt/agent/state/agent.json"} <= set(written)


def test_swap_files_with_a_non_ascii_name_under_lang_c(bundle: Path, tmp_path: Path) -> None:
    """The excludes read /proc/swaps too: under LANG=C on 3.6 a swap file named in UTF-8
    failed to decode; it comes back as the host path os functions take, with every escape
    the kernel writes (space, tab, newline, backslash) undone, not only the space."""
    swaps = tmp_path / "swaps"
    swaps.write_bytes(
        b"Filename\tType\tSize\tUsed\tPriority\n"
        b"/sw\xc3\xa9p\\040file\tfile\t1024\t0\t-2\n/dev/vda2\tpartition\t1024\t0\t-3\n"
        b"/tab\\011and\\134back\tfile\t1024\t0\t-4\n"
    )
    code = (
        "import os, sys; sys.path.insert(0, sys.argv[1]);"
        "from rehost.online.agent.config import swap_files;"
        "print([os.fsencode(p) for p in swap_files(sys.argv[2])])"
    )
    proc = subprocess.run(
        [PY36, "-c", code, str(bundle), str(swaps)],
        capture_output=True,
        env={"PATH": "/usr/bin:/bin", "LANG": "C"},
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode("ascii", "replace")
    assert proc.stdout.decode().strip() == repr([b"/sw\xc3\xa9p file", b"/tab\tand\\back"])


def test_var_on_a_disk_left_out_fails_the_check(tmp_path: Path) -> None:
    """The fixups refuse to comment out /var (the system would boot with an empty one), so
    --check says so before the transfer, not at its end."""
    write_os_release(tmp_path, "ID=debian\nPRETTY_NAME=Debian 12\n")
    layout = fake_layout()
    for m in layout["mounts"]:
        if m["mount"] == "/scratch":
            m["mount"] = "/var"
    c = load(str(make_config(tmp_path / "agent")))
    out = lines(run_prechecks(c, layout, FakeClient({"0": 8 * GiB, "1": 4 * GiB}), str(tmp_path)))
    assert (
        "FAIL  left out: /var on a disk that is neither the system disk nor in DataDisks: "
        "the system cannot boot without it; add its disk to DataDisks" in out
    ), out
