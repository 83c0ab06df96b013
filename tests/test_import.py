"""`rehost import`: the offline import task, end to end, including its faults.

The CLI is exercised in a subprocess: through `rehost import` once the command is
registered in the app, and through a one-command typer app over the same function
until then.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from helpers import MiB, oracle_sha256, run, s3_client, sha256_file, write_guest
from rehost.blob.source import LocalFile
from rehost.disk.target import Disk
from rehost.errors import (
    DestinationError,
    DestinationExpired,
    ImageMetadataError,
    ImageVerificationError,
    SystemError_,
)
from rehost.image import open_image
from rehost.image.base import ExtentKind
from rehost.objectstore import StoreInfo
from rehost.offline import StateDir, StateDirInUse, default_state_dir, run_import
from rehost.offline import task as task_module
from rehost.offline.state import StateDirUnusable, import_key
from rehost.offline.verify import Verifier

_RUNNER = """
import sys
from rehost.cli import app as cli
if any(c.name == "import" for c in cli.app.registered_commands):
    cli.main()
else:
    import typer
    from rehost.cli.importer import import_
    from rehost.cli.output import report_error, setup_logging
    app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
    app.command(name="import")(import_)
    @app.callback()
    def _root() -> None:
        "rehost"
    setup_logging()
    try:
        app()
    except Exception as e:
        sys.exit(report_error(e))
"""


def _cmd(*args: str | Path) -> list[str]:
    return [sys.executable, "-c", _RUNNER, "import", *map(str, args)]


def _env(state: Path) -> dict[str, str]:
    return dict(os.environ, REHOST_STATE_DIR=str(state))


def rehost_import(state: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_cmd(*args), capture_output=True, text=True, env=_env(state))


def error_line(stderr: str) -> str:
    """The `error: CODE: ...` line (notes such as "created ..." may come before it)."""
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


FORMATS = [
    # id, qemu-img convert options, rehost driver module
    ("raw", [], ""),
    ("qcow2", ["-O", "qcow2"], "qcow2"),
    ("qcow2-zstd", ["-O", "qcow2", "-c", "-o", "compression_type=zstd"], "qcow2"),
    ("vhd-dynamic", ["-O", "vpc", "-o", "subformat=dynamic"], "vhd"),
    ("vhdx", ["-O", "vhdx"], "vhdx"),
    ("vmdk-stream", ["-O", "vmdk", "-o", "subformat=streamOptimized"], "vmdk"),
]


def _make(guest: Path, tmp: Path, opts: list[str], name: str) -> Path:
    if not opts:
        return guest
    image = tmp / f"image.{name}"
    run("qemu-img", "convert", "-f", "raw", *opts, guest, image)
    return image


@pytest.mark.parametrize(
    ("name", "opts"),
    [pytest.param(n, o, id=n) for n, o, _ in FORMATS],
)
def test_byte_exact_from_local_path(
    name: str, opts: list[str], guest_raw: Path, tmp_path: Path
) -> None:
    image = _make(guest_raw, tmp_path, opts, name)
    dest = tmp_path / "out.raw"
    sd = tmp_path / "state"
    notes: list[str] = []
    report = run_import(str(image), dest, state_dir=sd, notify=notes.append)
    assert sha256_file(dest) == oracle_sha256(image, tmp_path)
    assert report.verified and report.status == "done"
    assert report.resumed_from == 0 and report.processed_bytes == report.virtual_size
    assert report.dest_created and any("sparse" in n for n in notes)
    state = json.loads((sd / "state.json").read_text())
    assert state["status"] == "done" and state["digest"] == report.digest
    assert not (sd / "INCOMPLETE").exists()


def test_cli_json_state_and_log(guest_raw: Path, tmp_path: Path) -> None:
    image = _make(guest_raw, tmp_path, ["-O", "qcow2"], "qcow2")
    dest = tmp_path / "out.raw"
    state = tmp_path / "state"
    proc = rehost_import(state, image, "--to", dest, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert "created" in proc.stderr and "sparse" in proc.stderr
    assert report["format"] == "qcow2" and report["verified"] is True
    assert report["virtual_size"] == guest_raw.stat().st_size
    assert report["file_size"] == image.stat().st_size
    assert 0 < report["data_bytes"] < report["virtual_size"]
    assert report["written_bytes"] <= report["data_bytes"]
    assert report["bytes_fetched"] is None  # a local file does not count network bytes
    assert report["source_bytes_read"] >= report["data_bytes"]
    assert report["rate"] > 0 and report["elapsed"] > 0
    assert sha256_file(dest) == sha256_file(guest_raw)

    sd = Path(report["state_dir"])
    assert sd == state / "imports" / import_key(str(image), dest)
    saved = json.loads((sd / "state.json").read_text())
    assert saved["source"] == str(image)
    assert saved["source_identity"]["size"] == image.stat().st_size
    assert {"mtime_ns", "inode"} <= set(saved["source_identity"])
    assert saved["dest"] == str(dest)
    assert saved["format"] == "qcow2" and saved["virtual_size"] == report["virtual_size"]
    assert saved["status"] == "done" and saved["digest"] == report["digest"]
    log = (sd / "import.log").read_text()
    for step in ("step precheck", "step writing", "step verifying", "verified", "done"):
        assert step in log

    human = rehost_import(state, image, "--to", dest)  # done before: imports again
    assert human.returncode == 0, human.stderr
    assert "verified: ok" in human.stdout and "importing again" in human.stderr


def test_destination_one_byte_too_small(guest_raw: Path, tmp_path: Path) -> None:
    dest = tmp_path / "small.raw"
    size = guest_raw.stat().st_size
    dest.write_bytes(b"\xaa" * (size - 1))
    before = sha256_file(dest)
    proc = rehost_import(tmp_path / "state", guest_raw, "--to", dest)
    assert proc.returncode == 1
    first = error_line(proc.stderr)
    assert first.startswith("error: IMAGE_VERIFICATION_FAILED: image file verification failed: ")
    assert f"holds {size - 1} bytes but needs at least {size}" in first
    assert "1 bytes short" in first and str(tmp_path / "state") in first
    assert sha256_file(dest) == before


def test_destination_smaller_than_the_image_file(tmp_path: Path) -> None:
    """A disk must also hold the image file's size, which metadata can push past the virtual size."""
    image = tmp_path / "prealloc.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-o", "preallocation=metadata", image, "4M")
    virtual, file_size = 4 * MiB, image.stat().st_size
    assert file_size > virtual
    dest = tmp_path / "disk.raw"
    dest.write_bytes(b"\x55" * virtual)
    with pytest.raises(ImageVerificationError) as info:
        run_import(str(image), dest, state_dir=tmp_path / "state")
    assert f"needs at least {file_size}" in info.value.reason
    assert dest.read_bytes() == b"\x55" * virtual
    assert not (tmp_path / "state" / "INCOMPLETE").exists()


def _truncated_and_garbage(guest_raw: Path, tmp_path: Path) -> dict[str, bytes]:
    qcow = _make(guest_raw, tmp_path, ["-O", "qcow2"], "qcow2")
    data = qcow.read_bytes()
    return {"truncated": data[: len(data) // 2], "garbage": os.urandom(1 << 20)}


def test_truncated_and_garbage_files_are_unreadable(guest_raw: Path, tmp_path: Path) -> None:
    for name, data in _truncated_and_garbage(guest_raw, tmp_path).items():
        src = tmp_path / f"{name}.img"
        src.write_bytes(data)
        dest = tmp_path / f"{name}.raw"
        proc = rehost_import(tmp_path / "state", src, "--to", dest)
        assert proc.returncode == 1, name
        assert error_line(proc.stderr).startswith(
            "error: IMAGE_METADATA_UNREADABLE: failed to obtain the metadata of the image file: "
        ), (name, proc.stderr)
        assert not dest.exists(), name


def test_loop_device_destination(
    guest_raw: Path, tmp_path: Path, loop_device: tuple[Path, Path]
) -> None:
    dev, _ = loop_device
    image = _make(guest_raw, tmp_path, ["-O", "qcow2"], "qcow2")
    with open(dev, "r+b") as f:  # something to overwrite, zero regions included
        f.write(b"\xee" * (32 * MiB))
    report = run_import(str(image), dev, state_dir=tmp_path / "state")
    assert report.verified and not report.dest_created
    size = guest_raw.stat().st_size
    with open(dev, "rb") as f:
        landed = hashlib.sha256(f.read(size)).hexdigest()
    assert landed == sha256_file(guest_raw)
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert state["dest_identity"]["kind"] == "block"
    assert state["dest_identity"]["size"] == 64 * MiB


def test_expired_destination(guest_raw: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out.raw"
    proc = rehost_import(
        tmp_path / "state", guest_raw, "--to", dest, "--expires-at", "2001-02-03T04:05:06Z"
    )
    assert proc.returncode == 1
    assert error_line(proc.stderr).startswith(
        "error: DESTINATION_EXPIRED: the destination server has expired: "
    ), proc.stderr
    assert not dest.exists()
    with pytest.raises(DestinationExpired):
        run_import(str(guest_raw), dest, state_dir=tmp_path / "s2", expires_at=datetime(2001, 2, 3))
    assert not dest.exists()
    bad = rehost_import(tmp_path / "state", guest_raw, "--to", dest, "--expires-at", "soon")
    assert bad.returncode == 2 and "ISO 8601" in bad.stderr


def test_timeout_leaves_it_resumable_then_rerun_completes(guest_raw: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out.raw"
    state = tmp_path / "state"
    sd = import_key(str(guest_raw), dest)
    # 24 MiB at 16 Mbit/s takes 12.5 s: the 0.5 s timeout stops it after a batch or two.
    began = time.monotonic()
    proc = rehost_import(
        state, guest_raw, "--to", dest, "--timeout", "0.5", "--rate-limit-mbps", "16"
    )
    assert time.monotonic() - began < 8, "the timeout did not stop the import promptly"
    assert proc.returncode == 1
    assert error_line(proc.stderr).startswith("error: TASK_TIMEOUT: the task timed out: ")
    d = state / "imports" / sd
    assert (d / "INCOMPLETE").exists()
    saved = json.loads((d / "state.json").read_text())
    assert saved["status"] == "failed" and saved["error"]["code"] == "TASK_TIMEOUT"
    assert str(d) in proc.stderr

    again = rehost_import(state, guest_raw, "--to", dest, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["verified"] is True
    assert "stopped before its first checkpoint" in again.stderr
    assert not (d / "INCOMPLETE").exists()
    assert sha256_file(dest) == sha256_file(guest_raw)


def test_verification_mismatch(
    guest_raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Verifier, "digest", lambda *a, **k: "f" * 64)
    sd = tmp_path / "state"
    with pytest.raises(ImageVerificationError) as info:
        run_import(str(guest_raw), tmp_path / "out.raw", state_dir=sd)
    assert "f" * 64 in info.value.reason
    saved = json.loads((sd / "state.json").read_text())
    assert saved["status"] == "failed" and saved["step"] == "verifying"
    assert saved["checkpoint"]["offset"] == 0  # a rerun rewrites everything
    assert (sd / "INCOMPLETE").exists()


def test_unexpected_failure_names_the_log(
    guest_raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(task_module, "convert", boom)
    sd = tmp_path / "state"
    with pytest.raises(SystemError_) as info:
        run_import(str(guest_raw), tmp_path / "out.raw", state_dir=sd)
    assert info.value.code == "SYSTEM_ERROR"
    assert str(sd / "import.log") in info.value.reason and "disk on fire" in info.value.reason
    log = (sd / "import.log").read_text()
    assert "Traceback" in log and "RuntimeError: disk on fire" in log
    saved = json.loads((sd / "state.json").read_text())
    assert saved["status"] == "failed" and saved["error"]["code"] == "SYSTEM_ERROR"
    assert (sd / "INCOMPLETE").exists()


def test_the_source_itself_is_refused_as_destination(guest_raw: Path, tmp_path: Path) -> None:
    copy = tmp_path / "g.raw"
    copy.write_bytes(guest_raw.read_bytes())
    with pytest.raises(DestinationError) as info:
        run_import(str(copy), copy, state_dir=tmp_path / "state")
    assert "is the source image itself" in info.value.reason
    assert sha256_file(copy) == sha256_file(guest_raw)


def test_a_device_in_use_is_refused(
    guest_raw: Path, tmp_path: Path, loop_device: tuple[Path, Path]
) -> None:
    dev, _ = loop_device
    held = os.open(dev, os.O_RDONLY | os.O_EXCL)  # as a mount would hold it
    try:
        with pytest.raises(DestinationError) as info:
            run_import(str(guest_raw), dev, state_dir=tmp_path / "state")
    finally:
        os.close(held)
    assert "is in use" in info.value.reason
    report = run_import(str(guest_raw), dev, state_dir=tmp_path / "state")
    assert report.verified


def test_a_file_another_import_writes_is_refused(guest_raw: Path, tmp_path: Path) -> None:
    """Two imports into one file from two state dirs: one would write over segments the
    other had verified, which then reported a disk holding neither image as done. A
    running import holds its file with flock; the test holds it the same way."""
    dest = tmp_path / "out.raw"
    dest.write_bytes(b"")
    os.truncate(dest, guest_raw.stat().st_size)
    held = os.open(dest, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(DestinationError) as info:
            run_import(str(guest_raw), dest, state_dir=tmp_path / "state")
    finally:
        os.close(held)
    assert "the destination of another import" in info.value.reason
    assert run_import(str(guest_raw), dest, state_dir=tmp_path / "state").verified


def test_a_file_still_attached_to_a_loop_device_is_refused(guest_raw: Path, tmp_path: Path) -> None:
    """An `import --fixup` killed mid-way leaves its destination attached to a loop device,
    its filesystems mounted. Running the same command again rewrote the file under those
    mounts, whose cached blocks then went on being written over the new image: a corrupt
    /boot, reported done. The file is refused, untouched, until it is detached."""
    dest = tmp_path / "out.raw"
    dest.write_bytes(b"previous" * 512)
    os.truncate(dest, guest_raw.stat().st_size)
    before = sha256_file(dest)
    loop = subprocess.run(
        ["losetup", "-f", "--show", dest], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        with pytest.raises(DestinationError) as info:
            run_import(str(guest_raw), dest, state_dir=tmp_path / "state")
        assert f"attached to {loop}" in info.value.reason
        assert f"losetup -d {loop}" in info.value.hint
        assert sha256_file(dest) == before
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
    assert run_import(str(guest_raw), dest, state_dir=tmp_path / "state").verified


def test_a_state_dir_that_cannot_be_written_is_a_typed_error(
    guest_raw: Path, tmp_path: Path
) -> None:
    """A full filesystem under the state dir was SYSTEM_ERROR, 'a bug in rehost'."""
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "none", full], check=True)
    try:
        with open(full / "filler", "wb") as f, contextlib.suppress(OSError):
            f.write(bytes(1 << 20))
        with pytest.raises(StateDirUnusable) as info:
            run_import(str(guest_raw), tmp_path / "out.raw", state_dir=full / "state")
    finally:
        subprocess.run(["umount", full], check=True)
    assert info.value.code == "STATE_DIR_UNUSABLE" and str(full) in info.value.reason


def test_a_running_import_holds_its_state_dir(guest_raw: Path, tmp_path: Path) -> None:
    sd = StateDir(tmp_path / "state")
    sd.create()
    with sd.locked(), pytest.raises(StateDirInUse) as info:
        run_import(str(guest_raw), tmp_path / "out.raw", state_dir=sd.path)
    assert f"pid {os.getpid()}" in info.value.reason
    assert not (tmp_path / "out.raw").exists()


# -- resuming -----------------------------------------------------------------------


@dataclass
class Big:
    raw: Path
    qcow2: Path
    raw_sha: str


@pytest.fixture(scope="session")
def big(tmp_path_factory: pytest.TempPathFactory) -> Big:
    """A 320 MiB guest (five 64 MiB segments) as raw and qcow2."""
    d = tmp_path_factory.mktemp("big")
    raw = d / "big.raw"
    write_guest(raw, 320 * MiB, seed=5)
    qcow = d / "big.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow)
    return Big(raw, qcow, sha256_file(raw))


class Stop(BaseException):
    """Stands in for a crash: not an Exception, so the task records nothing about it."""


@contextmanager
def _stop_after(
    limit: int, description: str, total: int, exc: type[BaseException] = Stop
) -> Iterator[Any]:
    seen = 0

    def advance(n: int) -> None:
        nonlocal seen
        seen += n
        if description == "writing" and seen >= limit:
            raise exc

    yield advance


def _interrupt(
    src: Path, dest: Path, sd: Path, after: int, exc: type[BaseException] = Stop
) -> dict[str, Any]:
    with pytest.raises(exc):
        run_import(
            str(src), dest, state_dir=sd, progress=lambda d, t: _stop_after(after, d, t, exc)
        )
    saved: dict[str, Any] = json.loads((sd / "state.json").read_text())
    assert saved["checkpoint"]["offset"] == 64 * MiB
    assert len(saved["checkpoint"]["segments"]) == 1
    assert (sd / "INCOMPLETE").exists()
    return saved


@pytest.fixture
def save_every_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """Save each checkpoint (not once a second), so a crash's last checkpoint is known."""
    monkeypatch.setattr(task_module, "CHECKPOINT_INTERVAL", 0.0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("segments", {"0": "zz"}),
        ("runs", "x"),
        ("checkpoint", [1]),
        ("segments", [1]),
        ("digest", "not hex"),
    ],
    ids=["segment-not-hex", "runs-not-int", "checkpoint-list", "segments-list", "digest"],
)
@pytest.mark.usefixtures("save_every_checkpoint")
def test_a_damaged_state_starts_over(big: Big, tmp_path: Path, field: str, value: object) -> None:
    """A state saved with values a resume cannot use was SYSTEM_ERROR on every run (the
    failure saved them back); it is unreadable, so the import starts over."""
    dest, sd = tmp_path / "out.raw", tmp_path / "state"
    saved = _interrupt(big.qcow2, dest, sd, after=100 * MiB)
    if field == "segments":
        saved["checkpoint"]["segments"] = value
    else:
        saved[field] = value
    (sd / "state.json").write_text(json.dumps(saved))
    report = run_import(str(big.qcow2), dest, state_dir=sd)
    assert report.resumed_from == 0 and report.verified
    assert sha256_file(dest) == big.raw_sha


@pytest.mark.usefixtures("save_every_checkpoint")
def test_resume_after_a_crash(big: Big, tmp_path: Path) -> None:
    dest, sd = tmp_path / "out.raw", tmp_path / "state"
    saved = _interrupt(big.qcow2, dest, sd, after=100 * MiB)
    assert saved["status"] == "writing" and saved["error"] is None
    notes: list[str] = []
    report = run_import(str(big.qcow2), dest, state_dir=sd, notify=notes.append)
    assert report.resumed_from == 64 * MiB and report.restarted is None
    assert report.processed_bytes == 320 * MiB - 64 * MiB
    assert f"resuming from offset {64 * MiB} (64.0 MiB already written)" in notes
    assert sha256_file(dest) == big.raw_sha
    assert not (sd / "INCOMPLETE").exists()


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_a_bad_write_fails_verification(
    big: Big, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A byte that lands wrong in the second segment is caught by its re-read, which runs
    while later segments are written; the import is not reported done."""
    write = Disk.write

    def corrupt(self: Disk, offset: int, *parts: bytes | bytearray | memoryview) -> None:
        write(self, offset, *parts)
        if offset <= 100 * MiB < offset + sum(len(p) for p in parts):
            _flip_byte(Path(self.path), 100 * MiB)

    monkeypatch.setattr(Disk, "write", corrupt)
    dest, sd = tmp_path / "out.raw", tmp_path / "state"
    with pytest.raises(ImageVerificationError):
        run_import(str(big.raw), dest, state_dir=sd)
    saved = json.loads((sd / "state.json").read_text())
    assert saved["status"] == "failed" and saved["checkpoint"]["offset"] == 0
    assert (sd / "INCOMPLETE").exists()


@pytest.mark.usefixtures("save_every_checkpoint")
def test_a_resumed_import_rereads_what_the_earlier_run_wrote(big: Big, tmp_path: Path) -> None:
    """The resumed run writes from 64 MiB on, but verifies the whole disk: damage to the
    first segment after the crash fails it, and the next run starts over."""
    dest, sd = tmp_path / "out.raw", tmp_path / "state"
    _interrupt(big.raw, dest, sd, after=100 * MiB)
    _flip_byte(dest, 5 * MiB)
    with pytest.raises(ImageVerificationError):
        run_import(str(big.raw), dest, state_dir=sd)
    report = run_import(str(big.raw), dest, state_dir=sd)
    assert report.resumed_from == 0 and report.verified
    assert sha256_file(dest) == big.raw_sha


def test_interrupt_saves_the_last_checkpoint(big: Big, tmp_path: Path) -> None:
    """Ctrl-C is recorded, and the checkpoint not yet saved (they are saved once a second
    at most) is saved on the way out."""
    dest, sd = tmp_path / "out.raw", tmp_path / "state"
    saved = _interrupt(big.raw, dest, sd, after=100 * MiB, exc=KeyboardInterrupt)
    assert saved["status"] == "failed" and saved["error"]["code"] == "INTERRUPTED"
    report = run_import(str(big.raw), dest, state_dir=sd)
    assert report.resumed_from == 64 * MiB
    assert sha256_file(dest) == big.raw_sha


def test_resume_at_the_verify_step(
    guest_raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed while verifying: the next run verifies again without writing anything."""

    def crash(*args: object, **kwargs: object) -> str:
        raise Stop

    dest, sd = tmp_path / "out.raw", tmp_path / "state"
    with monkeypatch.context() as m:
        m.setattr(Verifier, "digest", crash)
        with pytest.raises(Stop):
            run_import(str(guest_raw), dest, state_dir=sd)
    saved = json.loads((sd / "state.json").read_text())
    assert saved["status"] == "verifying" and saved["digest"]
    notes: list[str] = []
    report = run_import(str(guest_raw), dest, state_dir=sd, notify=notes.append)
    assert report.processed_bytes == 0 and report.written_bytes == 0
    assert report.resumed_from == report.virtual_size and report.digest == saved["digest"]
    assert "the write finished in an earlier run; verifying the destination" in notes
    assert not (sd / "INCOMPLETE").exists()


@pytest.mark.parametrize("change", ["mtime", "rewritten, mtime put back"])
@pytest.mark.usefixtures("save_every_checkpoint")
def test_changed_source_starts_over(big: Big, tmp_path: Path, change: str) -> None:
    """A new mtime tells; a write in place whose mtime was put back only by its ctime:
    resuming would verify a disk made of two images."""
    src = tmp_path / "copy.raw"
    shutil.copyfile(big.raw, src)
    dest, sd = tmp_path / "out.raw", tmp_path / "state"
    _interrupt(src, dest, sd, after=100 * MiB)
    if change == "mtime":
        os.utime(src, ns=(0, 10**18))
    else:
        st = src.stat()
        with open(src, "r+b") as f:
            f.seek(50 * MiB)  # written before the interruption
            f.write(b"\xa5" * 4096)
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    notes: list[str] = []
    report = run_import(str(src), dest, state_dir=sd, notify=notes.append)
    assert report.resumed_from == 0 and report.processed_bytes == 320 * MiB
    assert report.restarted and "the source changed since the checkpoint" in report.restarted
    assert ("mtime_ns" if change == "mtime" else "ctime_ns") in report.restarted
    assert any(n.startswith("starting over from offset 0: the source changed") for n in notes)
    assert sha256_file(dest) == sha256_file(src)


@pytest.mark.usefixtures("save_every_checkpoint")
def test_changed_destination_starts_over(big: Big, tmp_path: Path) -> None:
    dest, sd = tmp_path / "out.raw", tmp_path / "state"
    _interrupt(big.qcow2, dest, sd, after=100 * MiB)
    dest.unlink()
    with open(dest, "wb") as f:  # another file, one MiB larger
        f.truncate(321 * MiB)
    report = run_import(str(big.qcow2), dest, state_dir=sd)
    assert report.resumed_from == 0
    assert report.restarted and "the destination is another" in report.restarted
    with open(dest, "rb") as f:
        assert hashlib.sha256(f.read(320 * MiB)).hexdigest() == big.raw_sha


def _data_after(image: Path | str, offset: int, source: Any = None) -> int:
    """Guest bytes backed by data in the image at or after `offset`."""
    with open_image(source or LocalFile(image)) as img:
        return sum(
            max(0, e.end - max(e.offset, offset))
            for e in img.extents()
            if e.kind is not ExtentKind.ZERO
        )


def _kill_at_checkpoint(cmd: list[str], env: dict[str, str], state_file: Path) -> int:
    """Run the import, SIGKILL it once a checkpoint of 128 MiB or more is saved."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    offset = 0
    try:
        while time.monotonic() < deadline:
            try:
                saved = json.loads(state_file.read_text())
                offset = saved["checkpoint"]["offset"]
                if saved["status"] == "writing" and offset >= 128 * MiB:
                    break
            except (FileNotFoundError, ValueError, KeyError):
                pass
            assert proc.poll() is None, f"finished before it could be killed: {proc.stderr}"
            time.sleep(0.01)
        else:
            pytest.fail("no checkpoint of 128 MiB within 120 s")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    # A later checkpoint may have landed between the poll and the kill.
    return int(json.loads(state_file.read_text())["checkpoint"]["offset"])


def _kill_and_resume(
    source: str, dest: Path, state: Path, expected_sha: str, data_after: Any
) -> dict[str, Any]:
    cmd = _cmd(source, "--to", dest, "--rate-limit-mbps", "400", "--json")
    env = _env(state)
    sd = import_key(source, dest)
    d = state / "imports" / sd
    killed_at = _kill_at_checkpoint(cmd, env, d / "state.json")
    assert (d / "INCOMPLETE").exists()

    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    report: dict[str, Any] = json.loads(again.stdout)
    assert f"resuming from offset {killed_at}" in again.stderr
    assert report["resumed_from"] == killed_at >= 128 * MiB
    remainder = report["virtual_size"] - report["resumed_from"]
    assert abs(report["processed_bytes"] - remainder) <= remainder // 10
    expected_read = data_after(report["resumed_from"])
    assert abs(report["source_bytes_read"] - expected_read) <= expected_read // 10
    assert report["verified"] is True
    assert not (d / "INCOMPLETE").exists()
    assert "verified:" in (d / "import.log").read_text()
    assert sha256_file(dest) == expected_sha
    return report


def test_kill_9_resumes_raw(big: Big, tmp_path: Path) -> None:
    _kill_and_resume(
        str(big.raw),
        tmp_path / "out.raw",
        tmp_path / "state",
        big.raw_sha,
        lambda offset: _data_after(big.raw, offset),  # holes in a raw file are not read
    )


def test_kill_9_resumes_qcow2(big: Big, tmp_path: Path) -> None:
    oracle = oracle_sha256(big.qcow2, tmp_path)
    assert oracle == big.raw_sha
    _kill_and_resume(
        str(big.qcow2),
        tmp_path / "out.raw",
        tmp_path / "state",
        oracle,
        lambda offset: _data_after(big.qcow2, offset),
    )


# -- from object storage ------------------------------------------------------------


def _upload(store: StoreInfo, bucket: str, key: str, data_or_path: bytes | Path) -> None:
    client = s3_client(store)
    if isinstance(data_or_path, Path):
        client.upload_file(str(data_or_path), bucket, key)
    else:
        client.put_object(Bucket=bucket, Key=key, Body=data_or_path)


@pytest.mark.parametrize("via", ["s3", "presigned"])
@pytest.mark.parametrize(("name", "opts"), [pytest.param(n, o, id=n) for n, o, _ in FORMATS])
def test_every_format_byte_exact_from_object_storage(
    name: str,
    opts: list[str],
    via: str,
    guest_raw: Path,
    tmp_path: Path,
    s3_env: StoreInfo,
    s3_bucket: str,
) -> None:
    image = _make(guest_raw, tmp_path, opts, name)
    _upload(s3_env, s3_bucket, f"img/{name}", image)
    source = f"s3://{s3_bucket}/img/{name}"
    if via == "presigned":
        source = s3_client(s3_env).generate_presigned_url(
            "get_object", Params={"Bucket": s3_bucket, "Key": f"img/{name}"}, ExpiresIn=600
        )
    dest = tmp_path / "out.raw"
    report = run_import(source, dest, state_dir=tmp_path / "state")
    assert report.verified and report.bytes_fetched
    assert sha256_file(dest) == oracle_sha256(image, tmp_path)


def test_byte_exact_from_s3(
    guest_raw: Path, tmp_path: Path, s3_env: StoreInfo, s3_bucket: str
) -> None:
    image = _make(guest_raw, tmp_path, ["-O", "qcow2", "-c"], "qcow2")
    _upload(s3_env, s3_bucket, "images/g.qcow2", image)
    dest = tmp_path / "out.raw"
    proc = rehost_import(tmp_path / "state", f"s3://{s3_bucket}/images/g.qcow2", "--to", dest)
    assert proc.returncode == 0, proc.stderr
    assert "fetched" in proc.stdout and "verified: ok" in proc.stdout
    assert sha256_file(dest) == sha256_file(guest_raw)
    saved = json.loads(next((tmp_path / "state" / "imports").glob("*/state.json")).read_text())
    assert saved["source"] == f"s3://{s3_bucket}/images/g.qcow2"
    assert saved["source_identity"]["etag"]


def test_byte_exact_from_presigned_url(
    guest_raw: Path, tmp_path: Path, s3_env: StoreInfo, s3_bucket: str
) -> None:
    image = _make(guest_raw, tmp_path, ["-O", "vpc", "-o", "subformat=dynamic"], "vhd")
    _upload(s3_env, s3_bucket, "g.vhd", image)
    url = s3_client(s3_env).generate_presigned_url(
        "get_object", Params={"Bucket": s3_bucket, "Key": "g.vhd"}, ExpiresIn=600
    )
    dest = tmp_path / "out.raw"
    report = run_import(url, dest, state_dir=tmp_path / "state")
    assert report.format == "vhd"
    assert report.bytes_fetched and report.bytes_fetched >= report.data_bytes // 2
    assert report.requests
    assert sha256_file(dest) == oracle_sha256(image, tmp_path)
    # The link's signature is a credential: it is kept out of the state and the log.
    assert "Signature" not in report.source
    for name in ("state.json", "import.log"):
        assert "Signature" not in (tmp_path / "state" / name).read_text(), name
    # A re-signed link to the same object is the same import.
    assert default_state_dir(url, dest) == default_state_dir(url.split("?")[0] + "?x=1", dest)


def test_truncated_and_garbage_objects_are_unreadable(
    guest_raw: Path, tmp_path: Path, s3_env: StoreInfo, s3_bucket: str
) -> None:
    for name, data in _truncated_and_garbage(guest_raw, tmp_path).items():
        _upload(s3_env, s3_bucket, name, data)
        dest = tmp_path / f"{name}.raw"
        with pytest.raises(ImageMetadataError) as info:
            run_import(f"s3://{s3_bucket}/{name}", dest, state_dir=tmp_path / name)
        assert info.value.code == "IMAGE_METADATA_UNREADABLE", name
        assert not dest.exists(), name


def test_kill_9_resumes_from_s3(
    big: Big, tmp_path: Path, s3_env: StoreInfo, s3_bucket: str
) -> None:
    from rehost.blob.source import open_source

    _upload(s3_env, s3_bucket, "big.qcow2", big.qcow2)
    url = f"s3://{s3_bucket}/big.qcow2"
    report = _kill_and_resume(
        url,
        tmp_path / "out.raw",
        tmp_path / "state",
        big.raw_sha,
        lambda offset: _data_after(big.qcow2, offset),
    )
    # The network carried only the rest of the image, give or take read-ahead chunks.
    expected = _data_after(url, report["resumed_from"], open_source(url))
    assert report["bytes_fetched"] <= expected * 1.1 + 8 * MiB
    assert report["bytes_fetched"] >= expected * 0.9


def test_fixup_without_a_root_filesystem_fails(tmp_path: Path) -> None:
    """--fixup on a disk whose only filesystem is no system: FIXUP_FAILED, loop and nodes gone."""
    from loopdisk import LoopLab, Part
    from rehost.online.fixup.common import FixupFailed

    lab = LoopLab(tmp_path)
    try:
        disk = lab.disk("nosys", 64, "dos", [Part(None, "83", "ext4")])
    finally:
        lab.close()
    dest = tmp_path / "dest.img"
    with pytest.raises(FixupFailed) as info:
        run_import(str(disk.image), dest, state_dir=tmp_path / "state", fixup=True)
    assert info.value.step == "locate"
    assert "no partition" in str(info.value), info.value
    assert "rehost import --fixup" in info.value.hint and "finalize" not in info.value.hint
    # this test's loop device only: another worker's tests make and drop their own meanwhile
    held = subprocess.run(["losetup", "-j", dest], capture_output=True, text=True, check=True)
    assert held.stdout == "", held.stdout
    log = (tmp_path / "state").glob("*.log")
    assert any("fixups failed" in p.read_text() for p in log)
