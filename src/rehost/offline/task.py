"""The offline import task: precheck → write → verify → done, each step durable.

`run_import(source, dest)` streams an image (a path, s3:// object or https URL)
straight onto a block device or raw file, checkpointing as it goes, so that the
same call after a crash, kill or timeout resumes from the last checkpoint. It
always re-reads the whole destination and compares its content digest with the
digest of the image's guest bytes; the re-read of each checkpointed segment
overlaps the write of the next ones (see `offline.verify`).

The state lives in a directory per (source, destination); see `offline.state`.
"""

from __future__ import annotations

import copy
import errno
import fcntl
import os
import stat
import subprocess
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from rehost.blob.source import open_source
from rehost.disk.target import Disk, open_disk
from rehost.errors import (
    DestinationError,
    DestinationExpired,
    ImageMetadataError,
    ImageVerificationError,
    RehostError,
    SystemError_,
    TaskTimeout,
)
from rehost.image.base import DiskImage
from rehost.image.convert import Survey, convert, survey
from rehost.image.digest import SEGMENT
from rehost.image.probe import open_image
from rehost.malloc import tune_for_streaming
from rehost.offline.meter import MeteredSource
from rehost.offline.state import (
    Checkpoint,
    ImportLog,
    ImportState,
    StateDir,
    StateDirInUse,
    default_state_dir,
    dest_identity,
    dest_key,
    display_location,
    import_key,
    is_url,
    source_identity,
)
from rehost.offline.verify import Verifier

Advance = Callable[[int], None]
ProgressFactory = Callable[[str, int], AbstractContextManager[Advance]]
"""`progress(description, total_bytes)` gives a context that yields an advance(n) callback."""
Notify = Callable[[str], None]

CHECKPOINT_INTERVAL = 1.0
"""Seconds between saved checkpoints at least (more for big states: see `_checkpoint`)."""


@dataclass
class ImportReport:
    source: str
    destination: str
    state_dir: str
    format: str
    subformat: str
    virtual_size: int
    file_size: int
    data_bytes: int
    """Guest bytes backed by data in the image (what the image reader reads)."""
    zero_bytes: int
    resumed_from: int
    """The guest offset this run started writing at (0 for a fresh start)."""
    processed_bytes: int
    """Guest bytes converted by this run: the virtual size less what earlier runs did."""
    written_bytes: int
    """Bytes this run wrote to the destination (zero blocks are skipped or zeroed)."""
    source_bytes_read: int
    """Bytes this run read from the source, metadata included."""
    bytes_fetched: int | None
    """Bytes this run fetched over the network, for remote sources that count them."""
    requests: int | None
    dest_created: bool
    elapsed: float
    write_seconds: float
    verify_seconds: float
    digest: str
    verified: bool
    restarted: str | None = None
    """Why an earlier run's checkpoint was discarded, if it was."""
    status: str = "done"
    notes: list[str] = field(default_factory=list)
    fixups: dict[str, object] | None = None
    """With `fixup`: the boot fixups' report (FixupReport.to_dict); None when they did not run."""

    @property
    def rate(self) -> float:
        """Guest bytes per second of this run's write step."""
        return self.processed_bytes / self.write_seconds if self.write_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rate": self.rate}


def run_import(
    source: str,
    dest: str | os.PathLike[str],
    *,
    state_dir: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    expires_at: datetime | None = None,
    format: str | None = None,
    rate_limit_mbps: float | None = None,
    progress: ProgressFactory | None = None,
    notify: Notify | None = None,
    workers: int | None = None,
    fixup: bool = False,
    firmware: Literal["bios", "uefi"] = "bios",
) -> ImportReport:
    """Import `source` onto `dest`, resuming an earlier interrupted import of the same pair.

    Raises the typed errors of the task (IMAGE_METADATA_UNREADABLE, IMAGE_VERIFICATION_FAILED,
    DESTINATION_EXPIRED, TASK_TIMEOUT, ...) with the state directory named in the reason, or
    SystemError_ naming the log for anything unexpected. `rate_limit_mbps` caps the reads
    from the source at that many megabits per second.

    With `fixup`, the boot fixups (rehost.online.fixup) then run on the verified destination
    for `firmware`: its root filesystem is found from the partition table and its fstab.
    A fixup that cannot apply raises FixupFailed (FIXUP_FAILED); the import stays done.
    """
    began = time.monotonic()
    sd = StateDir(Path(state_dir) if state_dir else default_state_dir(source, dest))
    sd.create()
    with sd.locked():
        log = ImportLog(sd.log_file)
        try:
            task = _Import(
                source,
                os.fspath(dest),
                sd,
                log,
                began=began,
                timeout=timeout,
                expires_at=expires_at,
                format=format,
                rate=rate_limit_mbps * 1e6 / 8 if rate_limit_mbps else None,
                progress=progress,
                notify=notify,
                workers=workers,
            )
            report = task.run()
            if fixup:
                report.fixups = _fixup(os.fspath(dest), firmware, log, notify)
            return report
        finally:
            log.close()


OFFLINE_FIXUP_HINT = (
    "the imported system would not boot reliably as it is: change what the reason names in "
    "the image (or on the system it was made from, and make it again), then run the same "
    "`rehost import --fixup` again: it writes the image again from the start, then retries "
    "the fixups"
)


def _refuse_attached(dest: str) -> None:
    """A file still attached to a loop device (an `import --fixup` killed mid-way leaves it so,
    its filesystems mounted) must not be written: the old mounts would go on writing their
    cached blocks over the new image, which then verifies and is reported done."""
    try:
        found = subprocess.run(["losetup", "-j", dest], capture_output=True, text=True).stdout
    except OSError:  # no losetup: then nothing can have attached it through us either
        return
    loops = [line.split(":", 1)[0] for line in found.splitlines() if line.strip()]
    if loops:
        raise DestinationError(
            f"{dest} is attached to {', '.join(loops)}, perhaps by an interrupted `import "
            "--fixup` that left its filesystems mounted: writing it now would corrupt them",
            hint=f"once no process uses them, unmount what is mounted from {loops[0]}'s "
            f"partitions (`findmnt -rn -o TARGET -S {loops[0]}p1` lists them; `umount -R` "
            f"each) and detach it (`losetup -d {loops[0]}`), then run the import again",
        )


def _fixup(
    dest: str, firmware: Literal["bios", "uefi"], log: ImportLog, notify: Notify | None
) -> dict[str, object]:
    from rehost.offline.fixup import fixup_disk
    from rehost.online.fixup.common import FixupFailed

    def say(message: str) -> None:
        log(f"fixup: {message}")
        if notify is not None:
            notify(message)

    try:
        report = fixup_disk(dest, firmware=firmware, log=say)
    except RehostError as e:
        if isinstance(e, FixupFailed):  # its steps' hints speak of the source and finalize
            e.hint = OFFLINE_FIXUP_HINT
        log(f"fixups failed: {e}")
        raise
    return report.to_dict()


@contextmanager
def _no_progress(description: str, total: int) -> Iterator[Advance]:
    yield lambda n: None


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _diff(old: dict[str, Any] | None, new: dict[str, Any] | None) -> str:
    old, new = old or {}, new or {}
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


class _Import:
    def __init__(
        self,
        source: str,
        dest: str,
        sd: StateDir,
        log: ImportLog,
        *,
        began: float,
        timeout: float | None,
        expires_at: datetime | None,
        format: str | None,
        rate: float | None,
        progress: ProgressFactory | None,
        notify: Notify | None,
        workers: int | None,
    ) -> None:
        self.source = source
        self.shown = display_location(source)
        self.dest = dest
        self.sd = sd
        self.log = log
        self.began = began
        self.timeout = timeout
        self.deadline = began + timeout if timeout is not None else None
        if expires_at is not None and expires_at.tzinfo is None:
            expires_at = expires_at.replace(tzinfo=UTC)
        self.expires_at = expires_at
        self.format = format
        self.rate = rate
        self.progress = progress or _no_progress
        self._notify = notify or (lambda message: None)
        self.workers = workers
        self.notes: list[str] = []
        self.state = ImportState(
            key=import_key(source, dest), source=self.shown, dest=dest_key(dest)
        )
        self.meter: MeteredSource | None = None
        self.image: DiskImage | None = None
        self.disk: Disk | None = None
        self.verifier: Verifier | None = None
        self.plan = Survey()
        self.fetched_before: int | None = None
        self.requests_before: int | None = None
        self.resume_from = 0
        self.segments: dict[int, str] = {}
        self.skip_write = False
        self.restarted: str | None = None
        self.processed = 0
        self.written = 0
        self.write_seconds = 0.0
        self.verify_seconds = 0.0
        self._reported: Checkpoint | None = None
        self._claim = -1
        self._saved_at = 0.0

    # -- plumbing ---------------------------------------------------------------

    def note(self, message: str) -> None:
        self.notes.append(message)
        self.log(message)
        self._notify(message)

    def save(self) -> None:
        self.sd.save(self.state)

    def set_step(self, step: str) -> None:
        self.state.status = self.state.step = step
        self.state.error = None
        self.save()
        self.log(f"step {step}")

    def check_time(self) -> None:
        """Raise TaskTimeout past the deadline, DestinationExpired past the lease."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            if self.meter:
                self.meter.cancel()
            raise TaskTimeout(
                f"the import ran past its {self.timeout:g}s timeout in the {self.state.step} "
                f"step; {self._progress_text()}"
            )
        if self.expires_at is not None and datetime.now(UTC) >= self.expires_at:
            if self.meter:
                self.meter.cancel()
            raise DestinationExpired(
                f"the destination's lease expired at {self.expires_at.isoformat()}"
            )

    def _progress_text(self) -> str:
        done = self._reported.offset if self._reported else self.state.checkpoint.offset
        return f"the destination is written up to offset {done}; run it again to resume"

    # -- the task ---------------------------------------------------------------

    def run(self) -> ImportReport:
        self.log(
            f"run started: import {self.shown} -> {self.dest} (state {self.sd.path}, "
            f"timeout {self.timeout}, expires {self.expires_at}, format {self.format}, "
            f"rate limit {self.rate and self.rate * 8 / 1e6} Mbps)"
        )
        try:
            previous = self._load_previous()
            self._precheck(previous)
            if not self.skip_write:
                self._write()
            self._verify()
            return self._done()
        except RehostError as e:
            self._fail(e)
            raise
        except KeyboardInterrupt:
            self._fail(None, "INTERRUPTED", "interrupted")
            raise
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise self._unexpected(e) from e
            full = DestinationError(
                f"no space left for {self.dest} ({e})",
                hint="free space on the filesystem that holds the destination (or its state "
                "dir), then run the same command again to resume",
            )
            self._fail(full)
            raise full from e
        except Exception as e:
            raise self._unexpected(e) from e
        finally:
            if self.verifier is not None:
                self.verifier.close()
            if self.disk is not None:
                self.disk.close()
            if self._claim >= 0:
                os.close(self._claim)
            if self.image is not None:
                self.image.close()
            elif self.meter is not None:
                self.meter.close()

    def _unexpected(self, e: Exception) -> SystemError_:
        """Log the traceback, record the failure, and name the log in the error."""
        self.log("unexpected failure:\n" + "".join(traceback.format_exception(e)))
        err = SystemError_(
            f"{type(e).__name__}: {e} in the {self.state.step} step; see {self.sd.log_file}"
        )
        self._fail(err)
        return err

    def _load_previous(self) -> ImportState | None:
        try:
            previous = self.sd.load()
        except ValueError as e:
            self.note(f"ignoring the saved state and starting over: {e}")
            return None
        if previous is not None and previous.key != self.state.key:
            raise StateDirInUse(
                f"{self.sd.path} holds the state of the import of {previous.source} into "
                f"{previous.dest}, not of {self.shown} into {self.dest}"
            )
        if previous is not None:
            self.log(
                f"previous state: status {previous.status}, step {previous.step}, "
                f"checkpoint {previous.checkpoint.offset}, run {previous.runs}"
            )
            # Keep what the earlier runs recorded until this run knows better.
            self.state = copy.deepcopy(previous)
            if previous.status == "done":
                self.state.checkpoint, self.state.digest = Checkpoint(), None
        self.state.runs += 1
        return previous

    def _precheck(self, previous: ImportState | None) -> None:
        st = self.state
        st.status = st.step = "precheck"
        self.save()
        self.log("step precheck")
        self.check_time()

        tune_for_streaming()  # before the source's threads allocate their buffers
        src = open_source(self.source, deadline=self.deadline)
        self.meter = MeteredSource(src, self.rate)
        for message in getattr(src, "notes", ()):  # e.g. a source that cannot be pinned
            self.note(message)
        self.fetched_before = getattr(src, "bytes_fetched", None)
        self.requests_before = getattr(src, "requests", None)
        self.image = self._metadata(lambda: open_image(self.meter_source, self.format))
        img = self.image
        self.plan = self._metadata(lambda: survey(img))
        self.log(
            f"image: {img.format} {img.subformat}, virtual size {img.virtual_size}, file size "
            f"{img.file_size}, {self.plan.data_bytes} data bytes in {self.plan.extents} extents"
        )
        self.check_time()
        new_source = source_identity(self.source, src)

        available, exists = self._destination(img)
        # A disk must hold the virtual size and the image file's size. A file that is
        # created here has no capacity of its own: it is sized to the virtual size.
        needed = max(img.virtual_size, img.file_size) if exists else img.virtual_size
        if available < needed:
            raise ImageVerificationError(
                f"{self.dest} holds {available} bytes but needs at least {needed}: the image's "
                f"virtual size is {img.virtual_size} bytes and its file size {img.file_size} "
                f"bytes ({needed - available} bytes short)"
            )
        new_dest = dest_identity(self.dest, available) if exists else None
        self._plan_resume(previous, new_source, new_dest, img)

        st.source_identity = new_source
        st.dest_identity = new_dest
        st.format, st.subformat = img.format, img.subformat
        st.virtual_size, st.file_size = img.virtual_size, img.file_size
        if new_dest is None or (previous is not None and previous.dest_identity != new_dest):
            st.dest_created = False
        self.save()
        self.log(f"precheck passed: {self.dest} holds {available} bytes, {needed} needed")

    @property
    def meter_source(self) -> MeteredSource:
        assert self.meter is not None
        return self.meter

    def _metadata(self, read: Callable[[], Any]) -> Any:
        """Run a metadata read; what a driver fails with on a damaged image is a metadata error."""
        try:
            return read()
        except (RehostError, OSError):
            raise
        except Exception as e:
            self.log("metadata read failed:\n" + "".join(traceback.format_exception(e)))
            raise ImageMetadataError(
                f"the image's metadata could not be parsed ({type(e).__name__}: {e})"
            ) from e

    def _destination(self, img: DiskImage) -> tuple[int, bool]:
        """The destination's capacity in bytes, and whether it exists already."""
        if os.path.lexists(self.dest):
            if not is_url(self.source) and _same_file(self.source, self.dest):
                raise DestinationError(f"{self.dest} is the source image itself")
            self._claim_destination()
            if not stat.S_ISBLK(os.stat(self.dest).st_mode):  # O_EXCL covers a block device
                _refuse_attached(self.dest)
            self.disk = open_disk(self.dest)
            return self.disk.size, True
        parent = os.path.dirname(os.path.abspath(self.dest))
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            raise DestinationError(
                f"{self.dest} does not exist and cannot be created: {parent} is not a "
                "writable directory"
            )
        return img.virtual_size, False

    def _claim_destination(self) -> None:
        """Hold the destination for the whole import. A block device is opened exclusively:
        that fails while it is mounted or held, and keeps it from being mounted meanwhile. A
        file is flock-ed: another import into it (from another state dir) would write over
        segments this one has verified, and one of the two would report a disk that holds
        neither image."""
        try:
            if stat.S_ISBLK(os.stat(self.dest).st_mode):
                self._claim = os.open(self.dest, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
                return
            self._claim = os.open(self.dest, os.O_RDONLY | os.O_CLOEXEC)
            fcntl.flock(self._claim, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EBUSY, errno.EWOULDBLOCK):
                raise DestinationError(f"{self.dest}: {e.strerror}") from e
            raise DestinationError(
                f"{self.dest} is in use (mounted, claimed by another program, or the "
                "destination of another import)",
                hint="unmount the destination, or stop what holds it, and run it again",
            ) from e

    def _plan_resume(
        self,
        previous: ImportState | None,
        new_source: dict[str, Any],
        new_dest: dict[str, Any] | None,
        img: DiskImage,
    ) -> None:
        if previous is None:
            return
        if previous.status == "done":
            self.note(
                f"an earlier import into {self.dest} finished at {previous.updated_at}; "
                "importing again from offset 0"
            )
            return
        offset = previous.checkpoint.offset
        # The digest is saved when the write step finishes, and dropped when a new one starts.
        finished_write = previous.digest is not None and offset == previous.virtual_size
        if not finished_write and not 0 < offset < img.virtual_size:
            if previous.step == "writing":
                self.note("the earlier run stopped before its first checkpoint; starting at 0")
            return
        reasons = []
        if previous.source_identity != new_source:
            reasons.append(
                f"the source changed since the checkpoint ({_diff(previous.source_identity, new_source)})"
            )
        elif (previous.format, previous.virtual_size) != (img.format, img.virtual_size):
            reasons.append("the image's format or virtual size changed since the checkpoint")
        if new_dest is None:
            reasons.append(f"{self.dest} no longer exists")
        elif previous.dest_identity != new_dest:
            reasons.append(
                f"the destination is another device or file, or another size, than at the "
                f"checkpoint ({_diff(previous.dest_identity, new_dest)})"
            )
        if not finished_write and offset % SEGMENT:
            reasons.append(f"the checkpoint offset {offset} is not on a segment boundary")
        if reasons:
            self.restarted = "; ".join(reasons)
            self.note(f"starting over from offset 0: {self.restarted}")
            self.state.checkpoint = Checkpoint()
            self.state.digest = None
            return
        if finished_write:
            self.skip_write = True
            self.resume_from = img.virtual_size
            self.note("the write finished in an earlier run; verifying the destination")
            return
        self.resume_from = offset
        self.segments = dict(previous.checkpoint.segments)
        self.note(f"resuming from offset {offset} ({_human(offset)} already written)")

    def _write(self) -> None:
        st = self.state
        img = self.image
        assert img is not None
        st.checkpoint = Checkpoint(self.resume_from, dict(self.segments))
        st.digest = None
        self.sd.mark_incomplete(self.dest, self.shown)
        self.set_step("writing")
        if self.disk is None:
            self.disk = open_disk(self.dest, create_size=img.virtual_size)
            self._claim_destination()
            st.dest_created = True
            self.note(f"created {self.dest}: a sparse raw file of {img.virtual_size} bytes")
        st.dest_identity = dest_identity(self.dest, self.disk.size)
        self.save()
        self._saved_at = time.monotonic()
        # What earlier runs wrote is re-read while this run writes the rest.
        self.verifier = Verifier(self.dest, img.virtual_size)
        self.verifier.submit(self.resume_from)

        began = time.monotonic()
        total = img.virtual_size - self.resume_from
        with self.progress("writing", total) as advance:

            def on_progress(n: int) -> None:
                self.processed += n
                advance(n)
                self.check_time()

            result = convert(
                img,
                self.disk,
                progress=on_progress,
                workers=self.workers,
                resume_from=self.resume_from,
                segments=self.segments,
                checkpoint=self._checkpoint,
                plan=self.plan,
            )
        self.write_seconds = time.monotonic() - began
        self.written = result.written_bytes
        st.digest = result.digest
        st.checkpoint = Checkpoint(img.virtual_size)
        self._reported = None
        self.log(
            f"write finished: {self.processed} guest bytes from offset {self.resume_from}, "
            f"{result.written_bytes} bytes written in {self.write_seconds:.2f}s; "
            f"content digest {result.digest}"
        )

    def _checkpoint(self, offset: int, segments: dict[int, str]) -> None:
        """convert() calls this after flushing the disk: everything below `offset` is durable.

        Saving rewrites the whole state (segment digests included), so it is done at most
        once a second, and less often as the state grows; a checkpoint not saved is
        saved if the run stops early.
        """
        assert self.verifier is not None
        self.verifier.submit(offset)
        self._reported = Checkpoint(offset, dict(segments))
        interval = max(CHECKPOINT_INTERVAL, len(segments) / 2000)
        if time.monotonic() - self._saved_at >= interval:
            self._save_checkpoint()

    def _save_checkpoint(self) -> None:
        if self._reported is None:
            return
        self.state.checkpoint = self._reported
        self._reported = None
        self.save()
        self._saved_at = time.monotonic()
        self.log(f"checkpoint: offset {self.state.checkpoint.offset} written and flushed")

    def _verify(self) -> None:
        st = self.state
        assert st.digest is not None
        if self.skip_write:
            self.sd.mark_incomplete(self.dest, self.shown)
        self.set_step("verifying")
        self.check_time()
        if self.disk is not None:
            self.disk.flush()  # the segments not handed over yet are durable
        if self.verifier is None:  # the write finished in an earlier run
            self.verifier = Verifier(self.dest, st.virtual_size)
        began = time.monotonic()
        with self.progress("verifying", st.virtual_size) as bar:
            shown = 0

            def poll(done: int) -> None:
                nonlocal shown
                self.check_time()
                bar(done - shown)
                shown = done

            got = self.verifier.digest(poll)
        self.verify_seconds = time.monotonic() - began
        if got != st.digest:
            expected = st.digest
            st.digest = None
            st.checkpoint = Checkpoint()  # what is on the disk cannot be trusted: start over
            raise ImageVerificationError(
                f"{self.dest} reads back with content digest {got}, but the image's guest "
                f"bytes have content digest {expected}; the destination does not hold the image",
                hint="something wrote to the destination during or since the import, or it "
                "did not keep what was written (a failing disk); run the import again to "
                "rewrite it, and check the disk if this repeats",
            )
        self.log(f"verified: {self.dest} reads back with content digest {got}")

    def _done(self) -> ImportReport:
        st = self.state
        img = self.image
        meter = self.meter
        assert img is not None and meter is not None and st.digest is not None
        st.status = st.step = "done"
        st.error = None
        self.save()
        self.sd.clear_incomplete()
        fetched = getattr(meter.inner, "bytes_fetched", None)
        requests = getattr(meter.inner, "requests", None)
        report = ImportReport(
            source=self.shown,
            destination=self.dest,
            state_dir=str(self.sd.path),
            format=img.format,
            subformat=img.subformat,
            virtual_size=img.virtual_size,
            file_size=img.file_size,
            data_bytes=self.plan.data_bytes,
            zero_bytes=self.plan.zero_bytes,
            resumed_from=self.resume_from,
            processed_bytes=self.processed,
            written_bytes=self.written,
            source_bytes_read=meter.bytes_read,
            bytes_fetched=fetched - (self.fetched_before or 0) if fetched is not None else None,
            requests=requests - (self.requests_before or 0) if requests is not None else None,
            dest_created=st.dest_created,
            elapsed=time.monotonic() - self.began,
            write_seconds=self.write_seconds,
            verify_seconds=self.verify_seconds,
            digest=st.digest,
            verified=True,
            restarted=self.restarted,
            notes=list(self.notes),
        )
        self.log(
            f"done: {report.processed_bytes} guest bytes processed from offset "
            f"{report.resumed_from}, {report.written_bytes} written, {report.source_bytes_read} "
            f"read from the source, in {report.elapsed:.2f}s; verified"
        )
        return report

    def _fail(self, err: RehostError | None, code: str = "", reason: str = "") -> None:
        """Record the failure durably; name the state directory in a typed error's reason."""
        if err is not None:
            if not isinstance(err, SystemError_):
                err.reason = f"{err.reason} (import state and log: {self.sd.path})"
                err.args = (f"{err.message}: {err.reason}",)
            code, reason = err.code, err.reason
        st = self.state
        try:
            if st.step == "writing":
                self._save_checkpoint()
            if isinstance(err, StateDirInUse):
                return  # the state belongs to another import: leave it alone
            st.status = "failed"
            st.error = {"code": code, "reason": reason}
            self.save()
        except Exception as e:  # the failure being reported matters more than this one
            self.log("could not save the failed state:\n" + "".join(traceback.format_exception(e)))
        finally:
            self.log(f"failed in the {st.step} step: {code}: {reason}")
