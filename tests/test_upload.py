"""`rehost upload`: parallel, resumable multipart upload against a real SeaweedFS."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest
import typer
from typer.testing import CliRunner

from helpers import MiB, s3_client, sha256_file
from rehost.blob.upload import (
    UploadError,
    UploadResult,
    UploadVerificationError,
    choose_part_size,
    composite_crc32c,
    crc32c_b64,
    default_state_dir,
    multipart_etag,
    parse_s3_url,
    state_path,
    upload_file,
)
from rehost.cli.upload import upload as upload_command
from rehost.errors import AccessDenied, SourceNotFound
from rehost.objectstore import StoreInfo

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

PART = 5 * MiB  # S3's minimum part size


def write_random(path: Path, size: int, seed: int) -> Path:
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def object_sha256(store: StoreInfo, bucket: str, key: str) -> str:
    h = hashlib.sha256()
    for chunk in s3_client(store).get_object(Bucket=bucket, Key=key)["Body"].iter_chunks(MiB):
        h.update(chunk)
    return h.hexdigest()


class Interrupted(Exception):
    pass


def interrupt_after(nbytes: int) -> Callable[[str, int], Callable[[int], None]]:
    """A progress reporter that stops the upload once `nbytes` were recorded as sent."""

    def phase(description: str, total: int) -> Callable[[int], None]:
        sent = 0

        def advance(n: int) -> None:
            nonlocal sent
            sent += n
            if description == "uploading" and sent >= nbytes:
                raise Interrupted

        return advance

    return phase


def upload(path: Path, bucket: str, state: Path, **kw: object) -> UploadResult:
    return upload_file(path, bucket, "img.raw", part_size=PART, threads=2, state_dir=state, **kw)  # type: ignore[arg-type]


def test_fresh_upload_is_byte_exact_and_verified(
    s3_env: StoreInfo, s3_bucket: str, tmp_path: Path
) -> None:
    src = write_random(tmp_path / "disk.raw", 40 * MiB + 12345, seed=1)
    messages: list[str] = []
    result = upload(src, s3_bucket, tmp_path / "state", notify=messages.append)
    assert result.size == src.stat().st_size
    assert result.parts == 9 and result.parts_uploaded_this_run == 9
    assert result.bytes_uploaded_this_run == result.size and result.bytes_skipped == 0
    assert not result.resumed and result.restarted_reason is None and not messages
    assert object_sha256(s3_env, s3_bucket, "img.raw") == sha256_file(src)
    head = s3_client(s3_env).head_object(Bucket=s3_bucket, Key="img.raw", ChecksumMode="ENABLED")
    assert head["ETag"].strip('"') == result.etag and result.etag.endswith("-9")
    # SeaweedFS takes CRC32C checksums, so each part was checked by the server on arrival
    # and the object's composite checksum is the one computed from the file's parts.
    data = src.read_bytes()
    crcs = [crc32c_b64(data[i : i + PART]) for i in range(0, len(data), PART)]
    assert result.checksum == "crc32c" and head["ChecksumCRC32C"] == composite_crc32c(crcs)
    assert result.verification.startswith(f"CRC32C {head['ChecksumCRC32C']} = the file's parts")
    assert f"ETag {result.etag}" in result.verification
    assert not list((tmp_path / "state").iterdir())  # state (and lock) removed on success


def test_small_file_single_put(s3_env: StoreInfo, s3_bucket: str, tmp_path: Path) -> None:
    src = write_random(tmp_path / "small.bin", 3 * MiB + 1, seed=2)
    result = upload(src, s3_bucket, tmp_path / "state")
    assert result.parts == 1 and result.bytes_uploaded_this_run == src.stat().st_size
    assert result.etag == hashlib.md5(src.read_bytes()).hexdigest()
    assert object_sha256(s3_env, s3_bucket, "img.raw") == sha256_file(src)
    assert result.checksum == "md5" and result.verification.startswith(f"ETag {result.etag} = MD5")
    empty = tmp_path / "empty"
    empty.touch()
    assert upload(empty, s3_bucket, tmp_path / "state").size == 0


def test_resume_reconciles_with_the_server(
    s3_env: StoreInfo, s3_bucket: str, tmp_path: Path
) -> None:
    """Server truth wins: a part changed on the server and a recorded part it lacks are re-sent."""
    src = write_random(tmp_path / "disk.raw", 40 * MiB, seed=3)
    state_dir = tmp_path / "state"
    with pytest.raises(Interrupted):
        upload(src, s3_bucket, state_dir, progress=interrupt_after(3 * PART))
    sfile = state_path(state_dir, s3_env.endpoint, s3_bucket, "img.raw", src)
    state = json.loads(sfile.read_text())
    assert {
        "endpoint",
        "bucket",
        "key",
        "upload_id",
        "part_size",
        "size",
        "mtime_ns",
        "ctime_ns",
        "inode",
        "device",
    } <= set(state)
    assert len(state["parts"]) >= 3 and {"number", "etag", "checksum"} <= set(state["parts"][0])
    client = s3_client(s3_env)
    uid = state["upload_id"]
    on_server = {
        p["PartNumber"]
        for p in client.list_parts(Bucket=s3_bucket, Key="img.raw", UploadId=uid)["Parts"]
    }
    assert {1, 2, 3} <= on_server and not on_server & {7, 8}
    # Part 7 holds other bytes on the server (and is not recorded); part 8 is recorded
    # but never reached the server; part 1 is recorded with a wrong ETag (the server's
    # copy is ours, so it is adopted, not re-sent).
    client.upload_part(
        Bucket=s3_bucket, Key="img.raw", UploadId=uid, PartNumber=7, Body=b"x" * PART,
        ChecksumCRC32C=crc32c_b64(b"x" * PART),
    )  # fmt: skip
    parts = {p["number"]: p for p in state["parts"]}
    parts[8] = {"number": 8, "etag": "0" * 32, "checksum": "AAAAAA=="}
    parts[1] = {"number": 1, "etag": "1" * 32, "checksum": "AAAAAA=="}
    state["parts"] = list(parts.values())
    sfile.write_text(json.dumps(state))

    messages: list[str] = []
    result = upload(src, s3_bucket, state_dir, notify=messages.append)
    assert result.resumed and result.restarted_reason is None
    assert result.parts_uploaded_this_run == 8 - len(on_server)
    assert result.bytes_uploaded_this_run == (8 - len(on_server)) * PART
    assert any("1 part(s) recorded as uploaded" in m for m in messages), messages
    assert object_sha256(s3_env, s3_bucket, "img.raw") == sha256_file(src)
    assert not sfile.exists()


def test_changed_file_starts_over_and_says_why(
    s3_env: StoreInfo, s3_bucket: str, tmp_path: Path
) -> None:
    src = write_random(tmp_path / "disk.raw", 20 * MiB, seed=4)
    state_dir = tmp_path / "state"
    with pytest.raises(Interrupted):
        upload(src, s3_bucket, state_dir, progress=interrupt_after(2 * PART))
    with open(src, "ab") as f:
        f.write(b"more")
    messages: list[str] = []
    result = upload(src, s3_bucket, state_dir, notify=messages.append)
    reason = result.restarted_reason
    assert reason and f"{src} changed since the interrupted upload" in reason
    assert f"size {20 * MiB} → {20 * MiB + 4}" in reason and reason.endswith("starting over")
    assert messages == [reason]
    assert not result.resumed and result.bytes_uploaded_this_run == 20 * MiB + 4
    assert object_sha256(s3_env, s3_bucket, "img.raw") == sha256_file(src)
    # The old multipart upload was aborted, not left behind.
    assert not s3_client(s3_env).list_multipart_uploads(Bucket=s3_bucket).get("Uploads")


def test_a_rewrite_that_puts_the_mtime_back_starts_over(
    s3_env: StoreInfo, s3_bucket: str, tmp_path: Path
) -> None:
    """A part already sent is rewritten in place and the mtime restored (as `touch -d` or
    a careful tool would): the ctime tells, so the object is not made of the old bytes."""
    src = write_random(tmp_path / "disk.raw", 20 * MiB, seed=14)
    state_dir = tmp_path / "state"
    with pytest.raises(Interrupted):
        upload(src, s3_bucket, state_dir, progress=interrupt_after(2 * PART))
    st = src.stat()
    with open(src, "r+b") as f:
        f.write(b"\0" * 4096)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    result = upload(src, s3_bucket, state_dir)
    assert result.restarted_reason and "ctime" in result.restarted_reason, result.restarted_reason
    assert not result.resumed and result.bytes_uploaded_this_run == 20 * MiB
    assert object_sha256(s3_env, s3_bucket, "img.raw") == sha256_file(src)


@pytest.mark.parametrize(
    "content",
    [
        b"\xff\xfe garbage",
        b"[]",
        b"null",
        b'{"part_size": 0}',
        b'{"part_size": 1048576}',
        b'{"part_size": -5}',
        b'{"parts": [{"number": 99, "etag": "x", "checksum": "y"}]}',
    ],
    ids=[
        "binary",
        "list",
        "null",
        "part-size-0",
        "part-size-1MiB",
        "part-size-negative",
        "part-99",
    ],
)
def test_a_damaged_state_starts_over(
    s3_env: StoreInfo, s3_bucket: str, tmp_path: Path, content: bytes
) -> None:
    """Whatever the state file holds, the next run says it cannot use it and starts over,
    rather than failing with a traceback or the same store error on every run."""
    src = write_random(tmp_path / "disk.raw", 12 * MiB, seed=15)
    state_dir = tmp_path / "state"
    with pytest.raises(Interrupted):
        upload(src, s3_bucket, state_dir, progress=interrupt_after(PART))
    sfile = state_path(state_dir, s3_env.endpoint, s3_bucket, "img.raw", src)
    if content.startswith(b"{"):
        content = json.dumps({**json.loads(sfile.read_text()), **json.loads(content)}).encode()
    sfile.write_bytes(content)
    result = upload(src, s3_bucket, state_dir)
    assert result.restarted_reason and "is unreadable" in result.restarted_reason
    assert object_sha256(s3_env, s3_bucket, "img.raw") == sha256_file(src)
    assert not list(state_dir.iterdir())


def test_a_larger_part_size_still_resumes(
    s3_env: StoreInfo, s3_bucket: str, tmp_path: Path
) -> None:
    """Run again with a part size larger than the file: the interrupted upload of the
    unchanged file goes on with its own part size instead of starting over."""
    src = write_random(tmp_path / "disk.raw", 20 * MiB, seed=16)
    state_dir = tmp_path / "state"
    with pytest.raises(Interrupted):
        upload(src, s3_bucket, state_dir, progress=interrupt_after(2 * PART))
    result = upload_file(src, s3_bucket, "img.raw", part_size=64 * MiB, state_dir=state_dir)
    assert result.resumed and result.restarted_reason is None and result.part_size == PART
    assert result.bytes_uploaded_this_run <= 20 * MiB - 2 * PART
    assert object_sha256(s3_env, s3_bucket, "img.raw") == sha256_file(src)


def test_a_fifo_or_refused_key_fails_at_once_with_its_own_hint(
    s3_env: StoreInfo, s3_bucket: str, tmp_path: Path
) -> None:
    """No hint to "run the same command again" where that cannot help; no lock left behind."""
    state_dir = tmp_path / "state"
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    began = time.monotonic()
    with pytest.raises(UploadError, match="not a regular file") as e:
        upload(fifo, s3_bucket, state_dir)  # opening it blocked until a writer came
    assert time.monotonic() - began < 10
    assert "image" in e.value.hint and "again" not in e.value.hint
    src = write_random(tmp_path / "disk.raw", 6 * MiB, seed=17)
    with pytest.raises(UploadError) as refused:
        upload_file(src, s3_bucket, "a/../b.raw", part_size=PART, state_dir=state_dir)
    assert "refused the request" in refused.value.hint, refused.value.to_dict()
    assert not list(state_dir.iterdir())


def test_upload_aborted_on_server_starts_over(
    s3_env: StoreInfo, s3_bucket: str, tmp_path: Path
) -> None:
    src = write_random(tmp_path / "disk.raw", 20 * MiB, seed=5)
    state_dir = tmp_path / "state"
    with pytest.raises(Interrupted):
        upload(src, s3_bucket, state_dir, progress=interrupt_after(2 * PART))
    uid = json.loads(state_path(state_dir, s3_env.endpoint, s3_bucket, "img.raw", src).read_text())[
        "upload_id"
    ]
    s3_client(s3_env).abort_multipart_upload(Bucket=s3_bucket, Key="img.raw", UploadId=uid)
    result = upload(src, s3_bucket, state_dir)
    assert result.restarted_reason and "no longer exists on the server" in result.restarted_reason
    assert result.bytes_uploaded_this_run == 20 * MiB
    assert object_sha256(s3_env, s3_bucket, "img.raw") == sha256_file(src)


def test_completed_but_state_left_behind(s3_env: StoreInfo, s3_bucket: str, tmp_path: Path) -> None:
    """Killed after CompleteMultipartUpload, before the state was removed: nothing is re-sent."""
    src = write_random(tmp_path / "disk.raw", 12 * MiB, seed=9)
    state_dir = tmp_path / "state"
    first = upload(src, s3_bucket, state_dir)
    data = src.read_bytes()
    chunks = [data[i : i + PART] for i in range(0, len(data), PART)]
    md5s = [hashlib.md5(c).hexdigest() for c in chunks]
    st = src.stat()
    state_path(state_dir, s3_env.endpoint, s3_bucket, "img.raw", src).write_text(
        json.dumps(
            {
                "version": 3, "endpoint": s3_env.endpoint, "bucket": s3_bucket,
                "key": "img.raw", "path": str(src), "upload_id": "gone", "part_size": PART,
                "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
                "inode": st.st_ino, "device": st.st_dev,
                "checksum": "crc32c",
                "parts": [{"number": i + 1, "etag": m, "checksum": crc32c_b64(c)}
                          for i, (m, c) in enumerate(zip(md5s, chunks, strict=True))],
            }
        )
    )  # fmt: skip
    again = upload(src, s3_bucket, state_dir)
    assert again.resumed and again.restarted_reason is None
    assert again.bytes_uploaded_this_run == 0 and again.bytes_skipped == st.st_size
    assert again.etag == first.etag == multipart_etag(md5s)
    assert not list(state_dir.iterdir())


class LyingHead:
    """A client whose HeadObject reports another ETag: verification must fail."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def head_object(self, **kw: Any) -> Any:
        head = self._client.head_object(**kw)
        head["ETag"] = '"' + "0" * 32 + '-2"'
        return head


def test_etag_mismatch_is_an_error(s3_env: StoreInfo, s3_bucket: str, tmp_path: Path) -> None:
    src = write_random(tmp_path / "disk.raw", 10 * MiB, seed=10)
    client = cast("S3Client", LyingHead(s3_client(s3_env)))
    with pytest.raises(UploadVerificationError) as failed:
        upload(src, s3_bucket, tmp_path / "state", client=client)
    assert failed.value.code == "UPLOAD_VERIFICATION_FAILED"
    assert "differs from the file's" in str(failed.value)


class NoChecksums:
    """A store that knows nothing of CRC32C (mocked: SeaweedFS supports it): it neither
    confirms the algorithm at CreateMultipartUpload nor echoes a part's checksum."""

    def __init__(self, client: Any, corrupt_part: int = 0) -> None:
        self._client = client
        self.corrupt_part = corrupt_part
        self.part_headers: list[set[str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def create_multipart_upload(self, **kw: Any) -> Any:
        kw.pop("ChecksumAlgorithm", None)
        return self._client.create_multipart_upload(**kw)

    def upload_part(self, **kw: Any) -> Any:
        self.part_headers.append(set(kw) & {"ContentMD5", "ChecksumCRC32C"})
        resp = self._client.upload_part(**kw)
        resp.pop("ChecksumCRC32C", None)
        if kw["PartNumber"] == self.corrupt_part:
            resp["ETag"] = '"' + "0" * 32 + '"'
        return resp


def test_store_without_crc32c_gets_content_md5(
    s3_env: StoreInfo, s3_bucket: str, tmp_path: Path
) -> None:
    src = write_random(tmp_path / "disk.raw", 12 * MiB, seed=11)
    client = NoChecksums(s3_client(s3_env))
    result = upload(src, s3_bucket, tmp_path / "state", client=cast("S3Client", client))
    assert result.checksum == "md5" and client.part_headers == [{"ContentMD5"}] * 3
    assert result.verification.startswith(f"ETag {result.etag} = its parts'")
    assert object_sha256(s3_env, s3_bucket, "img.raw") == sha256_file(src)


class SilentCrc(NoChecksums):
    """Confirms CRC32C at creation but drops the echo of every part."""

    def create_multipart_upload(self, **kw: Any) -> Any:
        return self._client.create_multipart_upload(**kw)


def test_unconfirmed_part_checksum_falls_back_to_its_md5(
    s3_env: StoreInfo, s3_bucket: str, tmp_path: Path
) -> None:
    src = write_random(tmp_path / "disk.raw", 12 * MiB, seed=12)
    ok = upload(
        src, s3_bucket, tmp_path / "state", client=cast("S3Client", SilentCrc(s3_client(s3_env)))
    )
    assert ok.checksum == "crc32c" and object_sha256(s3_env, s3_bucket, "img.raw") == sha256_file(
        src
    )
    lying = SilentCrc(s3_client(s3_env), corrupt_part=2)
    with pytest.raises(UploadVerificationError, match="part 2: the server neither confirmed"):
        upload(src, s3_bucket, tmp_path / "state2", client=cast("S3Client", lying))


def test_corrupted_part_is_refused_by_its_crc32c(
    s3_env: StoreInfo, s3_bucket: str, tmp_path: Path
) -> None:
    """The server checks each body against its CRC32C: bytes changed on the way are refused."""
    client = s3_client(s3_env)
    up = client.create_multipart_upload(Bucket=s3_bucket, Key="x", ChecksumAlgorithm="CRC32C")
    with pytest.raises(Exception, match="BadDigest"):
        client.upload_part(
            Bucket=s3_bucket, Key="x", UploadId=up["UploadId"], PartNumber=1,
            Body=b"y" * PART, ChecksumCRC32C=crc32c_b64(b"x" * PART),
        )  # fmt: skip
    client.abort_multipart_upload(Bucket=s3_bucket, Key="x", UploadId=up["UploadId"])


def test_errors_are_typed(
    s3_env: StoreInfo, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state_dir = tmp_path / "state"
    with pytest.raises(SourceNotFound) as missing:
        upload(tmp_path / "nope.raw", s3_bucket, state_dir)
    assert missing.value.code == "SOURCE_NOT_FOUND"
    src = write_random(tmp_path / "disk.raw", 6 * MiB, seed=6)
    with pytest.raises(UploadError, match="does not exist") as nobucket:
        upload(src, "no-such-bucket-here", state_dir)
    assert nobucket.value.code == "UPLOAD_FAILED"
    # A second run of the same upload while one is running is refused.
    lock = state_path(state_dir, s3_env.endpoint, s3_bucket, "img.raw", src).with_suffix(".lock")
    state_dir.mkdir(exist_ok=True)
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(UploadError, match="is running"):
            upload(src, s3_bucket, state_dir)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(AccessDenied) as denied:
        upload(src, s3_bucket, state_dir)
    assert denied.value.code == "ACCESS_DENIED"


def test_part_size_and_urls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert choose_part_size(100 * MiB, 16 * MiB) == 16 * MiB
    big = 1 << 40  # 1 TiB: 16 MiB parts would need 65536 of them
    assert choose_part_size(big, 16 * MiB) * 10_000 >= big
    assert choose_part_size(big, 16 * MiB) % MiB == 0
    with pytest.raises(UploadError):
        choose_part_size(MiB, 1 * MiB)
    md5s = [hashlib.md5(b"a").hexdigest(), hashlib.md5(b"b").hexdigest()]
    digest = hashlib.md5(hashlib.md5(b"a").digest() + hashlib.md5(b"b").digest()).hexdigest()
    assert multipart_etag(md5s) == f"{digest}-2"
    assert parse_s3_url("s3://b/dir/", "x.qcow2") == ("b", "dir/x.qcow2")
    assert parse_s3_url("s3://b/k/y", "x") == ("b", "k/y")
    with pytest.raises(ValueError):
        parse_s3_url("https://b/k")
    monkeypatch.setenv("REHOST_STATE_DIR", str(tmp_path))
    assert default_state_dir() == tmp_path / "uploads"
    a = state_path(tmp_path, "http://a", "b", "k", "/x")
    assert a != state_path(tmp_path, "http://a", "b", "k", "/y") and a.suffix == ".json"
    # The same bucket and key on another store is another upload, with its own state.
    assert a != state_path(tmp_path, "http://b", "b", "k", "/x")


def test_cli_help_and_json(s3_env: StoreInfo, s3_bucket: str, tmp_path: Path) -> None:
    app = typer.Typer()
    app.command()(upload_command)
    runner = CliRunner()
    help_text = " ".join(runner.invoke(app, ["--help"]).output.split())
    assert "rehost image pack" in help_text and "resume" in help_text
    src = write_random(tmp_path / "d.raw", 11 * MiB, seed=7)
    args = [str(src), f"s3://{s3_bucket}/dir/", "--part-size-mib", "5", "--json"]
    res = runner.invoke(app, [*args, "--state-dir", str(tmp_path / "st")])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["destination"] == f"s3://{s3_bucket}/dir/d.raw" and out["parts"] == 3
    assert out["checksum"] == "crc32c" and "sha256" not in out
    res = runner.invoke(app, [str(src), "s3://", "--json"])
    assert res.exit_code == 2  # a usage error


SCRIPT = """
import sys, typer
from rehost.cli.output import report_error
from rehost.cli.upload import upload
app = typer.Typer()
app.command()(upload)
try:
    app()
except Exception as e:
    sys.exit(report_error(e))
"""


def test_resume_after_kill_9(s3_env: StoreInfo, s3_bucket: str, tmp_path: Path) -> None:
    src = write_random(tmp_path / "disk.raw", 40 * MiB, seed=8)
    state_dir = tmp_path / "state"
    argv = [
        sys.executable, "-c", SCRIPT, str(src), f"s3://{s3_bucket}/img.raw",
        "--part-size-mib", "5", "--threads", "2", "--state-dir", str(state_dir),
    ]  # fmt: skip
    sfile = state_path(state_dir, s3_env.endpoint, s3_bucket, "img.raw", src)
    # 40 Mbit/s is one 5 MiB part per ~1.05 s: a wide window to kill it mid-way.
    proc = subprocess.Popen([*argv, "--limit-mbps", "40"], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the upload never recorded 3 parts"
            if sfile.exists() and len(json.loads(sfile.read_text())["parts"]) >= 3:
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    state = json.loads(sfile.read_text())
    assert 3 <= len(state["parts"]) < 8
    time.sleep(0.5)  # let the server settle any request the kill cut short
    listed = s3_client(s3_env).list_parts(
        Bucket=s3_bucket, Key="img.raw", UploadId=state["upload_id"]
    )["Parts"]
    remainder = src.stat().st_size - sum(p["Size"] for p in listed)
    assert remainder > 0

    done = subprocess.run([*argv, "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["resumed"] and result["restarted_reason"] is None
    assert abs(result["bytes_uploaded_this_run"] - remainder) <= 0.1 * remainder
    assert result["bytes_skipped"] == src.stat().st_size - result["bytes_uploaded_this_run"]
    assert object_sha256(s3_env, s3_bucket, "img.raw") == sha256_file(src)
    assert not sfile.exists()
