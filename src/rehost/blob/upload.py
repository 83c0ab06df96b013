"""Upload a local file to S3: parallel, bounded in memory, resumable across processes.

Why not boto3's `TransferManager` (`upload_file`)? It parallelises a multipart
upload, but its state lives in the process: kill it (or lose the network for
longer than its retries) and the next run starts from byte zero, leaving the old
parts behind as an orphaned multipart upload. Images are tens to hundreds of GiB,
so an upload has to survive a kill, a reboot or a closed laptop. Here every
completed part is recorded in a small JSON state file, written atomically after
each part, and the next run with the same file and destination continues the same
multipart upload, sending only the parts the server does not have.

How a run goes:

1. The file's identity (size, mtime_ns, ctime_ns, inode, device) is taken. A saved
   state for the same file, destination and endpoint is resumed only if that identity
   is unchanged (ctime, because a write can restore the mtime but not the ctime);
   otherwise the old multipart upload is aborted and the upload starts over, and
   the reason is reported (`UploadResult.restarted_reason`, and `notify`).
2. A fresh upload asks for CRC32C checksums (`ChecksumAlgorithm`). A store that
   confirms it gets a CRC32C per part; one that does not (older S3-compatible
   stores) gets Content-MD5 per part instead. Either way the server refuses a
   corrupted body. CRC32C, not MD5, because MD5 runs at ~0.5 GB/s on one core
   against CRC32C's ~4 GB/s: for a 2 GiB image that is 4 s of CPU, competing with
   the network stack for the same cores (the file is never hashed as a whole
   beforehand for the same reason).
3. On resume, ListParts says what the server really has (server truth wins): a
   recorded part the server lacks, or holds with another ETag, is sent again; a
   part the server has that the state missed (the process died between the part's
   response and the state write) is adopted if its ETag equals the MD5 of the
   local bytes.
4. Parts are read with `os.pread` inside the worker threads, at most
   `threads + 1` parts are queued or in flight, and each part's checksum must come
   back confirmed (its CRC32C echoed, or its ETag equal to the MD5 sent).
5. After CompleteMultipartUpload the object is verified against the file (see
   `_verify`); a mismatch raises `UploadVerificationError`, never a success. On
   success the state file is deleted.

Files smaller than one part go up in a single PutObject with Content-MD5, verified
the same way.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import google_crc32c

from rehost.blob import s3, s3client
from rehost.blob.s3client import DENIED_CODES
from rehost.durable import atomic_write
from rehost.errors import AccessDenied, RehostError, SourceNotFound

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

log = logging.getLogger("rehost.upload")

MiB = 1 << 20
MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last
MAX_PART_SIZE = 5 * 1024 * MiB  # S3's maximum part size
MAX_PARTS = 10_000  # S3's maximum part count
DEFAULT_PART_SIZE = 16 * MiB
DEFAULT_THREADS = 4
STATE_VERSION = 3  # 3: ctime_ns and the endpoint
CRC32C = "crc32c"
MD5 = "md5"

# A progress reporter: `phase(description, total_bytes)` starts a phase ("uploading") and
# returns the callback that is then given byte counts as they finish.
PhaseProgress = Callable[[str, int], Callable[[int], None]]


class UploadError(RehostError):
    code = "UPLOAD_FAILED"
    message = "the upload failed"
    default_hint = (
        "run the same command again to resume; it sends only the parts the server does not have"
    )


class UploadVerificationError(RehostError):
    code = "UPLOAD_VERIFICATION_FAILED"
    message = "the uploaded object does not match the local file"
    default_hint = (
        "do not modify the file or the object while uploading; delete the object and upload again"
    )


@dataclass
class UploadResult:
    bucket: str
    key: str
    size: int
    part_size: int
    parts: int  # 1 for a single PutObject
    parts_uploaded_this_run: int
    bytes_uploaded_this_run: int
    bytes_skipped: int  # already on the server from an interrupted run
    resumed: bool
    restarted_reason: str | None
    etag: str
    checksum: str
    """How each part was checked on arrival: "crc32c" or "md5"."""
    verification: str  # how the object was checked against the file
    elapsed: float
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Bytes sent per second in this run."""
        return self.bytes_uploaded_this_run / self.elapsed if self.elapsed > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rate": self.rate}


# -- configuration -------------------------------------------------------------------------


def default_state_dir() -> Path:
    """`$REHOST_STATE_DIR/uploads`, or `~/.local/state/rehost/uploads` (XDG_STATE_HOME aware)."""
    base = os.environ.get("REHOST_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "rehost"
    )
    return Path(base) / "uploads"


def state_path(
    state_dir: Path, endpoint: str, bucket: str, key: str, path: str | os.PathLike[str]
) -> Path:
    """The state file of one (file, destination) pair; the same bucket and key on another
    endpoint is another destination."""
    ident = f"{endpoint}\n{bucket}/{key}\n{os.path.abspath(path)}".encode()
    return state_dir / f"{hashlib.sha256(ident).hexdigest()}.json"


def parse_s3_url(url: str, filename: str | None = None) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key). A key that is empty or ends in "/" gets `filename`."""
    if url.startswith("s3://") and filename and (url.endswith("/") or url.count("/") == 2):
        url = url.rstrip("/") + "/" + filename if url.count("/") == 2 else url + filename
    try:
        return s3.parse_s3_url(url)
    except SourceNotFound as e:
        raise ValueError(e.reason) from e


def make_client(max_connections: int = 10) -> S3Client:
    return s3client.make_client(max_connections, botocore_retries=True, read_timeout=120)


# -- errors --------------------------------------------------------------------------------


def _error_code(e: BaseException) -> str:
    from botocore.exceptions import ClientError

    if isinstance(e, ClientError):
        return str(e.response.get("Error", {}).get("Code", ""))
    return ""


def _translate(e: Exception, what: str) -> RehostError:
    """A botocore failure as a typed error."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    if isinstance(e, RehostError):
        return e
    if isinstance(e, NoCredentialsError):
        return AccessDenied(f"{what}: no AWS credentials were found")
    if isinstance(e, ClientError):
        code = _error_code(e)
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        msg = e.response.get("Error", {}).get("Message", "")
        if code in DENIED_CODES or status == 403:
            return AccessDenied(f"{what}: {code or status}: {msg}".rstrip(": "))
        if code == "NoSuchBucket":
            return UploadError(f"{what}: the bucket does not exist", hint=_NO_BUCKET_HINT)
        error = UploadError(f"{what}: {code or status}: {msg}".rstrip(": "))
        if 400 <= status < 500 and status not in (408, 429) and code not in _PASSING_CODES:
            error.hint = _REFUSED_HINT  # running it again would only be refused again
        return error
    if isinstance(e, BotoCoreError):
        return UploadError(f"{what}: {e}")
    return UploadError(f"{what}: {type(e).__name__}: {e}")


_NO_BUCKET_HINT = "create the bucket first (or check its name and the endpoint/region)"
_PASSING_CODES = {"NoSuchUpload", "RequestTimeout", "SlowDown"}
"""4xx answers that another run may not get."""
_REFUSED_HINT = (
    "the store refused the request as given: check the key (S3 refuses some, such as "
    "ones with `..` parts), the bucket's settings and the options, then run it again"
)
_FILE_HINT = (
    "give the path of an image file; to upload a disk, pack it into an image first "
    "(rehost image pack DEVICE disk.qcow2)"
)


@contextlib.contextmanager
def _s3(what: str) -> Iterator[None]:
    try:
        yield
    except RehostError:
        raise
    except Exception as e:
        raise _translate(e, what) from e


# -- the file ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileIdentity:
    size: int
    mtime_ns: int
    ctime_ns: int
    """A write in place can put the mtime back (`touch -d`, `os.utime`); not the ctime."""
    inode: int
    device: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)

    def differences(self, other: FileIdentity) -> str:
        """What changed from `self` (before) to `other` (now), for a message."""
        out = []
        if self.size != other.size:
            out.append(f"size {self.size} → {other.size}")
        if self.mtime_ns != other.mtime_ns:
            out.append(f"mtime {_iso(self.mtime_ns)} → {_iso(other.mtime_ns)}")
        elif self.ctime_ns != other.ctime_ns:
            out.append(f"ctime {_iso(self.ctime_ns)} → {_iso(other.ctime_ns)}: written or chmod-ed")
        if self.inode != other.inode or self.device != other.device:
            out.append(f"inode {self.inode} → {other.inode} (replaced)")
        return ", ".join(out)


def _iso(ns: int) -> str:
    t = ns / 1e9
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) + f".{ns % 10**9:09d}"


def _pread_exact(fd: int, length: int, offset: int, name: str) -> bytes:
    try:
        data = os.pread(fd, length, offset)
        while len(data) < length:  # short reads happen on some filesystems
            more = os.pread(fd, length - len(data), offset + len(data))
            if not more:
                raise UploadError(f"{name} shrank while it was read (at byte {offset + len(data)})")
            data += more
    except OSError as e:
        raise UploadError(f"{name}: reading {length} bytes at {offset}: {e.strerror}") from e
    return data


# -- the state file ------------------------------------------------------------------------


@dataclass
class _State:
    endpoint: str
    bucket: str
    key: str
    path: str
    upload_id: str
    part_size: int
    identity: FileIdentity
    checksum: str  # CRC32C or MD5
    parts: dict[int, tuple[str, str]]  # part number -> (ETag without quotes, checksum)
    completed: bool = False  # not saved: the object was found complete on resume

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "endpoint": self.endpoint,
            "bucket": self.bucket,
            "key": self.key,
            "path": self.path,
            "upload_id": self.upload_id,
            "part_size": self.part_size,
            "size": self.identity.size,
            "mtime_ns": self.identity.mtime_ns,
            "ctime_ns": self.identity.ctime_ns,
            "inode": self.identity.inode,
            "device": self.identity.device,
            "checksum": self.checksum,
            "parts": [
                {"number": n, "etag": etag, "checksum": value}
                for n, (etag, value) in sorted(self.parts.items())
            ],
        }

    @classmethod
    def from_json(cls, d: object) -> _State:
        """Raises ValueError for anything but a state this version wrote, with sane numbers:
        a resume trusts its part size and part numbers."""
        if not isinstance(d, dict):
            raise ValueError(f"a JSON {type(d).__name__}, not an object")
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"written by another version of rehost (state {d.get('version')!r})")
        state = cls(
            endpoint=str(d["endpoint"]),
            bucket=str(d["bucket"]),
            key=str(d["key"]),
            path=str(d["path"]),
            upload_id=str(d["upload_id"]),
            part_size=int(d["part_size"]),
            identity=FileIdentity(
                int(d["size"]),
                int(d["mtime_ns"]),
                int(d["ctime_ns"]),
                int(d["inode"]),
                int(d["device"]),
            ),
            checksum=_known_checksum(str(d["checksum"])),
            parts={int(p["number"]): (str(p["etag"]), str(p["checksum"])) for p in d["parts"]},
        )
        size, part_size = state.identity.size, state.part_size
        if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE or size < part_size:
            raise ValueError(f"part size {part_size} for a file of {size} bytes")
        nparts = math.ceil(size / part_size)
        if nparts > MAX_PARTS or not set(state.parts) <= set(range(1, nparts + 1)):
            raise ValueError(f"part numbers outside 1..{nparts}")
        return state


def _known_checksum(name: str) -> str:
    if name not in (CRC32C, MD5):
        raise ValueError(f"checksum {name!r}")
    return name


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(data, indent=1).encode())


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One process per (file, destination) at a time; the lock file goes with the state.

    (Removing the lock file on success lets a process that opened it just before
    lock a stale inode; that needs three runs of the same upload racing, and at
    worst one of them uploads the file again.)
    """
    lock = path.with_suffix(".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise UploadError(
                "another `rehost upload` of this file to this destination is running",
                hint="wait for it to finish, or stop it and run this command again to resume",
            ) from e
        try:
            yield
        finally:
            if not path.exists():
                lock.unlink(missing_ok=True)
    finally:
        os.close(fd)


# -- pacing --------------------------------------------------------------------------------


class _Pacer:
    """A bandwidth cap, enforced per part: parts start no faster than the rate allows.

    The average rate holds; within a part the bytes go at the link's speed (botocore
    reads the body more than once for payload signing, so throttling the stream
    itself would count bytes twice).
    """

    def __init__(self, limit_mbps: float) -> None:
        self._rate = limit_mbps * 1e6 / 8  # bytes per second
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def wait(self, nbytes: int) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + nbytes / self._rate
        if start > now:
            time.sleep(start - now)


# -- the upload ----------------------------------------------------------------------------


def choose_part_size(size: int, part_size: int) -> int:
    """`part_size`, raised (to a whole MiB) so that the file fits in 10000 parts."""
    if part_size < MIN_PART_SIZE:
        raise UploadError(
            f"part size {part_size} is below S3's minimum of 5 MiB", hint="use at least 5 MiB"
        )
    if size > part_size * MAX_PARTS:
        part_size = math.ceil(size / MAX_PARTS / MiB) * MiB
    if part_size > MAX_PART_SIZE:
        raise UploadError(f"the file is too large for one S3 object ({size} bytes)")
    return part_size


def _quoted_free(etag: str) -> str:
    return etag.strip().strip('"').lower()


def multipart_etag(md5s: list[str]) -> str:
    """The ETag S3 gives a multipart object: md5 of the parts' binary MD5s, then "-N"."""
    joined = b"".join(bytes.fromhex(m) for m in md5s)
    return f"{hashlib.md5(joined).hexdigest()}-{len(md5s)}"


def crc32c_b64(data: bytes) -> str:
    """CRC32C as S3 carries it: big-endian, base64."""
    return base64.b64encode(int(google_crc32c.value(data)).to_bytes(4, "big")).decode()


def composite_crc32c(checksums: list[str]) -> str:
    """The checksum S3 gives a multipart object: CRC32C of the parts' binary CRC32Cs, "-N"."""
    joined = b"".join(base64.b64decode(c) for c in checksums)
    return f"{crc32c_b64(joined)}-{len(checksums)}"


def _part_checksum(kind: str, data: bytes) -> str:
    return crc32c_b64(data) if kind == CRC32C else hashlib.md5(data).hexdigest()


_AWS_MULTIPART_ETAG = re.compile(r"^[0-9a-f]{32}-\d+$")


class _Uploader:
    def __init__(
        self,
        path: Path,
        bucket: str,
        key: str,
        *,
        part_size: int,
        threads: int,
        state_dir: Path,
        limit_mbps: float | None,
        progress: PhaseProgress,
        notify: Callable[[str], None],
        client: S3Client,
    ) -> None:
        self.path = path
        self.name = str(path)
        self.bucket = bucket
        self.key = key
        self.requested_part_size = part_size
        self.threads = threads
        self.endpoint = str(client.meta.endpoint_url)
        self.state_file = state_path(state_dir, self.endpoint, bucket, key, path)
        self.pacer = _Pacer(limit_mbps) if limit_mbps else None
        self.progress = progress
        self.notes: list[str] = []
        self._notify = notify
        self.client = client
        self.restarted_reason: str | None = None
        self.t0 = time.monotonic()

    def notify(self, message: str) -> None:
        log.info("%s", message)
        self.notes.append(message)
        self._notify(message)

    # -- entry

    def run(self) -> UploadResult:
        try:
            # O_NONBLOCK: opening a FIFO would otherwise wait for a writer, forever.
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise SourceNotFound(f"{self.name}: no such file") from e
        except OSError as e:
            raise UploadError(f"{self.name}: {e.strerror}", hint=_FILE_HINT) from e
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UploadError(f"{self.name}: not a regular file", hint=_FILE_HINT)
            os.set_blocking(fd, True)
            ident = FileIdentity.of(st)
            with _s3(f"s3://{self.bucket}"):
                self._check_bucket()
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            with _locked(self.state_file):
                state = self._saved_state(ident)
                part_size = choose_part_size(ident.size, self.requested_part_size)
                if state is None and ident.size < part_size:
                    return self._put_single(fd, ident)
                return self._multipart(fd, ident, part_size, state)
        finally:
            os.close(fd)

    def _check_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if status == 404 or _error_code(e) in ("404", "NoSuchBucket", "NotFound"):
                raise UploadError(
                    f"bucket {self.bucket!r} does not exist", hint=_NO_BUCKET_HINT
                ) from e
            if status == 403:
                self._check_credentials()
                return
            raise

    def _check_credentials(self) -> None:
        """HEAD was refused (403, no body to say why): bad credentials, or no s3:ListBucket?

        Credentials that may write but not list are refused HEAD, so a 403 alone must
        not stop the upload. A GET carries an error code: a bad key or signature fails
        now, before the whole file is hashed; a plain AccessDenied lets the upload try.
        """
        from botocore.exceptions import ClientError

        try:
            self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=self.key, MaxUploads=1)
        except ClientError as e:
            if _error_code(e) not in ("AccessDenied", "AllAccessDisabled"):
                raise
            log.info("listing %s is refused; trying the upload anyway", self.bucket)

    # -- small files

    def _put_single(self, fd: int, ident: FileIdentity) -> UploadResult:
        data = _pread_exact(fd, ident.size, 0, self.name)
        md5 = hashlib.md5(data)
        advance = self.progress("uploading", ident.size)
        if self.pacer:
            self.pacer.wait(len(data))
        with _s3(f"PutObject s3://{self.bucket}/{self.key}"):
            resp = self.client.put_object(
                Bucket=self.bucket,
                Key=self.key,
                Body=data,
                ContentMD5=base64.b64encode(md5.digest()).decode(),
            )
        advance(ident.size)
        self._check_unchanged(ident)
        etag, verification = self._verify(
            ident.size, md5.hexdigest(), None, 1, _quoted_free(resp.get("ETag", ""))
        )
        return self._result(ident, ident.size, 1, 1, ident.size, False, etag, MD5, verification)

    # -- multipart

    def _load_state(self) -> _State | None:
        try:
            state = _State.from_json(json.loads(self.state_file.read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:  # UnicodeDecodeError is one
            self._restart(f"the saved upload state {self.state_file} is unreadable ({e})")
            try:
                self.state_file.unlink()
            except OSError as gone:
                raise UploadError(
                    f"cannot remove the unreadable upload state {self.state_file}: {gone.strerror}",
                    hint="remove it by hand, then run the command again",
                ) from gone
            return None
        here = (self.endpoint, self.bucket, self.key, self.name)
        if (state.endpoint, state.bucket, state.key, state.path) != here:
            self._restart(f"the saved upload state {self.state_file} is for another upload")
            return None
        return state

    def _restart(self, reason: str) -> None:
        reason = f"{reason}; starting over"
        self.restarted_reason = reason
        self.notify(reason)

    def _abort(self, state: _State) -> None:
        with _s3(f"AbortMultipartUpload s3://{self.bucket}/{self.key}"):
            try:
                self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=self.key, UploadId=state.upload_id
                )
            except Exception as e:
                if _error_code(e) != "NoSuchUpload":
                    raise

    def _server_parts(self, upload_id: str) -> dict[int, set[tuple[str, int]]] | None:
        """Part number -> {(ETag, size)} as the server has them; None if the upload is gone.

        A set, because SeaweedFS keeps (and lists) every version of a part sent more
        than once, and CompleteMultipartUpload then takes the one whose ETag it is
        given; S3 keeps only the last. Either way a part is usable if the server has
        it with the ETag we will name.
        """
        parts: dict[int, set[tuple[str, int]]] = {}
        marker = 0
        with _s3(f"ListParts s3://{self.bucket}/{self.key}"):
            while True:
                try:
                    resp = self.client.list_parts(
                        Bucket=self.bucket,
                        Key=self.key,
                        UploadId=upload_id,
                        PartNumberMarker=marker,
                    )
                except Exception as e:
                    if _error_code(e) == "NoSuchUpload":
                        return None
                    raise
                for p in resp.get("Parts", []):
                    entry = (_quoted_free(p["ETag"]), p["Size"])
                    parts.setdefault(p["PartNumber"], set()).add(entry)
                if not resp.get("IsTruncated"):
                    return parts
                marker = int(resp.get("NextPartNumberMarker", 0))
                if marker <= 0:
                    return parts

    def _saved_state(self, ident: FileIdentity) -> _State | None:
        """The state of an interrupted upload of this very file, if any; a state for the
        file as it was before a change is dropped, and its upload aborted."""
        state = self._load_state()
        if state is None or state.identity == ident:
            return state
        self._abort(state)
        self._restart(
            f"{self.name} changed since the interrupted upload "
            f"({state.identity.differences(ident)})"
        )
        self.state_file.unlink(missing_ok=True)
        return None

    def _resume(self, fd: int, ident: FileIdentity, part_size: int, state: _State) -> _State | None:
        """The saved state, reconciled with the server; None to start over."""
        server = self._server_parts(state.upload_id)
        if server is None:
            if self._already_complete(state):
                state.completed = True
                return state
            self._restart(
                f"the interrupted upload of {self.name} (upload ID {state.upload_id[:16]}…) "
                "no longer exists on the server (aborted, expired or cleaned up)"
            )
            return None
        if state.part_size != part_size:
            self.notify(
                f"resuming with the interrupted upload's part size of {state.part_size} bytes"
            )
        nparts = math.ceil(ident.size / state.part_size)
        reconciled: dict[int, tuple[str, str]] = {}
        resend = 0
        for n in range(1, nparts + 1):
            length = min(state.part_size, ident.size - (n - 1) * state.part_size)
            recorded = state.parts.get(n)
            etags = {etag for etag, size in server.get(n, ()) if size == length}
            if recorded is not None and recorded[0] in etags:
                reconciled[n] = recorded
                continue
            if etags:
                # On the server but not recorded (the process died between the part's
                # response and the state write), or recorded with another ETag: adopt it
                # only if it holds exactly our bytes.
                data = _pread_exact(fd, length, (n - 1) * state.part_size, self.name)
                md5 = hashlib.md5(data).hexdigest()
                if md5 in etags:
                    reconciled[n] = (md5, _part_checksum(state.checksum, data))
                    continue
            resend += recorded is not None
        if resend:
            self.notify(
                f"{resend} part(s) recorded as uploaded are missing or different on the server; "
                "sending them again"
            )
        state.parts = reconciled
        _write_atomic(self.state_file, state.to_json())
        return state

    def _already_complete(self, state: _State) -> bool:
        """Did the interrupted run complete the object but die before removing its state?"""
        nparts = math.ceil(state.identity.size / state.part_size)
        if sorted(state.parts) != list(range(1, nparts + 1)):
            return False
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key)
        except ClientError:
            return False
        etags = [state.parts[n][0] for n in range(1, nparts + 1)]
        return (
            _quoted_free(head.get("ETag", "")) == multipart_etag(etags)
            and head.get("ContentLength") == state.identity.size
        )

    def _start(self, ident: FileIdentity, part_size: int) -> _State:
        where = f"CreateMultipartUpload s3://{self.bucket}/{self.key}"
        with _s3(where):
            try:
                resp = self.client.create_multipart_upload(
                    Bucket=self.bucket,
                    Key=self.key,
                    ContentType="application/octet-stream",
                    ChecksumAlgorithm="CRC32C",
                )
            except Exception as e:
                if _error_code(e) not in ("InvalidArgument", "InvalidRequest", "NotImplemented"):
                    raise
                log.info("%s: CRC32C refused (%s); using Content-MD5", where, _error_code(e))
                resp = self.client.create_multipart_upload(
                    Bucket=self.bucket, Key=self.key, ContentType="application/octet-stream"
                )
        checksum = CRC32C if resp.get("ChecksumAlgorithm") == "CRC32C" else MD5
        state = _State(
            self.endpoint,
            self.bucket,
            self.key,
            self.name,
            resp["UploadId"],
            part_size,
            ident,
            checksum,
            {},
        )
        _write_atomic(self.state_file, state.to_json())
        return state

    def _multipart(
        self, fd: int, ident: FileIdentity, part_size: int, saved: _State | None
    ) -> UploadResult:
        state = saved and self._resume(fd, ident, part_size, saved)
        resumed = state is not None
        if state is None:
            state = self._start(ident, part_size)
        part_size = state.part_size
        nparts = math.ceil(ident.size / part_size)

        def length_of(n: int) -> int:
            return min(part_size, ident.size - (n - 1) * part_size)

        todo = [n for n in range(1, nparts + 1) if n not in state.parts]
        skipped = ident.size - sum(length_of(n) for n in todo)
        advance = self.progress("uploading", ident.size - skipped)
        sent_bytes = 0
        if todo:
            sent_bytes = self._send_parts(fd, state, todo, length_of, advance)
        parts = [state.parts[n] for n in range(1, nparts + 1)]
        self._check_unchanged(ident)
        if not state.completed:
            self._complete(state, nparts, length_of)
        etag, verification = self._verify(
            ident.size,
            multipart_etag([etag for etag, _ in parts]),
            composite_crc32c([value for _, value in parts]) if state.checksum == CRC32C else None,
            nparts,
        )
        self.state_file.unlink(missing_ok=True)
        return self._result(
            ident, part_size, nparts, len(todo), sent_bytes, resumed, etag, state.checksum,
            verification, skipped=skipped,
        )  # fmt: skip

    def _send_parts(
        self,
        fd: int,
        state: _State,
        todo: list[int],
        length_of: Callable[[int], int],
        advance: Callable[[int], None],
    ) -> int:
        def send(n: int) -> tuple[int, str, str]:
            length = length_of(n)
            if self.pacer:
                self.pacer.wait(length)
            data = _pread_exact(fd, length, (n - 1) * state.part_size, self.name)
            value = _part_checksum(state.checksum, data)
            check: dict[str, str] = (
                {"ChecksumCRC32C": value}
                if state.checksum == CRC32C
                else {"ContentMD5": base64.b64encode(bytes.fromhex(value)).decode()}
            )
            with _s3(f"UploadPart {n} of s3://{self.bucket}/{self.key}"):
                try:
                    resp = self.client.upload_part(
                        Bucket=self.bucket,
                        Key=self.key,
                        UploadId=state.upload_id,
                        PartNumber=n,
                        Body=data,
                        **check,  # type: ignore[arg-type]
                    )
                except Exception as e:
                    if _error_code(e) == "NoSuchUpload":
                        raise UploadError(
                            f"the multipart upload of s3://{self.bucket}/{self.key} was aborted "
                            "on the server while it ran",
                            hint="run the same command again to start over",
                        ) from e
                    raise
            etag = _quoted_free(resp["ETag"])
            _check_part(n, state.checksum, value, etag, resp.get("ChecksumCRC32C"), data)
            return n, etag, value

        sent = 0
        pending = iter(todo)
        inflight: set[Future[tuple[int, str, str]]] = set()
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="rehost-upload")
        try:
            while True:
                while len(inflight) < self.threads + 1:
                    n = next(pending, None)
                    if n is None:
                        break
                    inflight.add(pool.submit(send, n))
                if not inflight:
                    break
                done, inflight = wait(inflight, return_when=FIRST_COMPLETED)
                for fut in done:
                    n, etag, value = fut.result()
                    state.parts[n] = (etag, value)
                    _write_atomic(self.state_file, state.to_json())
                    sent += length_of(n)
                    advance(length_of(n))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return sent

    def _complete(self, state: _State, nparts: int, length_of: Callable[[int], int]) -> None:
        # Server truth once more before completing: every part present, sized and tagged
        # as recorded (cheap, and it turns a silent server-side loss into a clear error).
        server = self._server_parts(state.upload_id)
        if server is None:
            raise UploadError(
                f"the multipart upload of s3://{self.bucket}/{self.key} disappeared from the "
                "server before it could be completed",
                hint="run the same command again to start over",
            )
        for n in range(1, nparts + 1):
            expected = (state.parts[n][0], length_of(n))
            if expected not in server.get(n, set()):
                raise UploadError(
                    f"part {n} (ETag {expected[0]}, {expected[1]} bytes) is not on the server; "
                    f"it has {sorted(server.get(n, set())) or 'nothing'} for that part",
                    hint="run the same command again; missing parts are sent again",
                )
        parts: list[CompletedPartTypeDef] = []
        for n in range(1, nparts + 1):
            etag, value = state.parts[n]
            part: CompletedPartTypeDef = {"PartNumber": n, "ETag": f'"{etag}"'}
            if state.checksum == CRC32C:
                part["ChecksumCRC32C"] = value
            parts.append(part)
        with _s3(f"CompleteMultipartUpload s3://{self.bucket}/{self.key}"):
            self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=self.key,
                UploadId=state.upload_id,
                MultipartUpload={"Parts": parts},
            )

    def _check_unchanged(self, ident: FileIdentity) -> None:
        try:
            now = FileIdentity.of(os.stat(self.path))
        except FileNotFoundError:
            raise UploadError(f"{self.name} was removed during the upload") from None
        if now != ident:
            raise UploadError(
                f"{self.name} changed during the upload ({ident.differences(now)})",
                hint="leave the file alone while it uploads; run the command again to start over",
            )

    def _verify(
        self, size: int, expected_etag: str, composite: str | None, nparts: int, etag: str = ""
    ) -> tuple[str, str]:
        """Check the stored object against the file; return its ETag and how it was checked.

        With CRC32C parts, the object's composite checksum (HeadObject with
        ChecksumMode) must equal the one computed from the file's parts. S3 (and
        SeaweedFS, checked against 4.48) gives a multipart object the ETag
        md5(concat(binary part MD5s)) + "-N" and a single PutObject the MD5 of its
        body, so that ETag, computed from the parts' ETags (which were checked as
        they arrived), must be the server's too. Some S3-compatible stores use other
        ETag formats (opaque IDs, or the MD5 of the whole object). For those the
        fallback is what still holds: HEAD size equals the file size, and every part's
        checksum was confirmed on arrival and its ETag again via ListParts before
        completing.
        """
        with _s3(f"HeadObject s3://{self.bucket}/{self.key}"):
            head = self.client.head_object(Bucket=self.bucket, Key=self.key, ChecksumMode="ENABLED")
        got_size = head.get("ContentLength")
        if got_size != size:
            raise UploadVerificationError(
                f"s3://{self.bucket}/{self.key} holds {got_size} bytes, the file {size}"
            )
        how = []
        stored = head.get("ChecksumCRC32C")
        if composite is not None and stored is not None:
            if stored != composite:
                raise UploadVerificationError(
                    f"the object's CRC32C {stored} differs from the file's {composite}"
                )
            how.append(f"CRC32C {stored} = the file's parts")
        etag = _quoted_free(head.get("ETag", etag))
        if "-" in expected_etag:
            comparable = _AWS_MULTIPART_ETAG.fullmatch(etag) is not None
        else:
            comparable = re.fullmatch(r"[0-9a-f]{32}", etag) is not None
        if comparable:
            if etag != expected_etag:
                raise UploadVerificationError(
                    f"the object's ETag {etag} differs from the file's {expected_etag}"
                )
            how.append(f"ETag {etag} = " + ("its parts'" if "-" in expected_etag else "MD5"))
        if not how:
            how.append(f"all {nparts} part checksums (the server's ETag {etag} is not MD5-based)")
        return etag, "; ".join([*how, f"size {size}"])

    def _result(
        self,
        ident: FileIdentity,
        part_size: int,
        parts: int,
        parts_sent: int,
        bytes_sent: int,
        resumed: bool,
        etag: str,
        checksum: str,
        verification: str,
        *,
        skipped: int = 0,
    ) -> UploadResult:
        return UploadResult(
            bucket=self.bucket,
            key=self.key,
            size=ident.size,
            part_size=part_size,
            parts=parts,
            parts_uploaded_this_run=parts_sent,
            bytes_uploaded_this_run=bytes_sent,
            bytes_skipped=skipped,
            resumed=resumed,
            restarted_reason=self.restarted_reason,
            etag=etag,
            checksum=checksum,
            verification=verification,
            elapsed=time.monotonic() - self.t0,
            notes=self.notes,
        )


def _check_part(n: int, kind: str, value: str, etag: str, echoed: str | None, data: bytes) -> None:
    """A part counts as sent only once the server has confirmed its bytes.

    With Content-MD5 the server checked them, and its ETag (unless opaque) must be
    that MD5. With CRC32C it must echo the checksum; a store that drops the header
    without checking it is caught by the MD5 of the part, computed only then.
    """
    if kind == MD5:
        if etag != value and not _looks_opaque(etag):
            raise UploadVerificationError(
                f"part {n}: the server's ETag {etag} is not the MD5 {value} of the bytes sent"
            )
        return
    if echoed == value:
        return
    if echoed is not None:
        raise UploadVerificationError(
            f"part {n}: the server stored CRC32C {echoed}, the bytes sent have {value}"
        )
    if etag != hashlib.md5(data).hexdigest():
        raise UploadVerificationError(
            f"part {n}: the server neither confirmed its CRC32C nor returned the MD5 of the "
            f"bytes sent as its ETag ({etag})",
            hint="this store cannot prove what it received; report it with the store's name",
        )


def _looks_opaque(etag: str) -> bool:
    """An ETag that is not an MD5 at all (some S3-compatible stores); see `_verify`."""
    return re.fullmatch(r"[0-9a-f]{32}", etag) is None


def _no_progress(description: str, total: int) -> Callable[[int], None]:
    return lambda n: None


def upload_file(
    path: str | os.PathLike[str],
    bucket: str,
    key: str,
    *,
    part_size: int = DEFAULT_PART_SIZE,
    threads: int = DEFAULT_THREADS,
    state_dir: Path | None = None,
    limit_mbps: float | None = None,
    progress: PhaseProgress | None = None,
    notify: Callable[[str], None] | None = None,
    client: S3Client | None = None,
) -> UploadResult:
    """Upload `path` to s3://bucket/key, resuming an interrupted upload of the same file.

    `state_dir` defaults to `default_state_dir()`. `limit_mbps` caps the average rate
    in megabits per second. `notify` receives human messages (why an upload started
    over, parts sent again). Raises SourceNotFound, AccessDenied, UploadError or
    UploadVerificationError.
    """
    if threads < 1:
        raise UploadError(f"threads must be at least 1, not {threads}")
    if limit_mbps is not None and limit_mbps <= 0:
        raise UploadError(f"the bandwidth limit must be positive, not {limit_mbps}")
    if client is None:
        client = make_client(max_connections=threads + 2)
    uploader = _Uploader(
        Path(os.path.abspath(path)),
        bucket,
        key,
        part_size=part_size,
        threads=threads,
        state_dir=state_dir or default_state_dir(),
        limit_mbps=limit_mbps,
        progress=progress or _no_progress,
        notify=notify or (lambda message: None),
        client=client,
    )
    return uploader.run()
