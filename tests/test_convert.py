"""The converter: byte-exact, sparse, bounded, and never writing before it knows it can."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
from pathlib import Path

import pytest

from helpers import MiB, RemoteFile, oracle_sha256, rehost_sha256, run, sha256_file, write_guest
from rehost.blob.source import LocalFile
from rehost.disk.target import open_disk
from rehost.errors import ImageVerificationError
from rehost.image import open_image
from rehost.image.convert import _whole_blocks, convert
from rehost.image.digest import BLOCK, block_records, read_digest


def test_raw_round_trip(guest_raw: Path, tmp_path: Path) -> None:
    assert rehost_sha256(guest_raw, tmp_path) == sha256_file(guest_raw)


def test_digest_matches_reread_and_is_format_independent(guest_raw: Path, tmp_path: Path) -> None:
    qcow = tmp_path / "g.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", guest_raw, qcow)
    digests = []
    for src in (guest_raw, qcow):
        out = tmp_path / (src.name + ".out")
        with open_image(LocalFile(src)) as img, open_disk(out, create_size=img.virtual_size) as d:
            result = convert(img, d)
        with LocalFile(out) as landed:
            assert read_digest(landed.read, result.virtual_size) == result.digest
        digests.append(result.digest)
    assert digests[0] == digests[1]


def test_output_is_sparse(tmp_path: Path) -> None:
    src = tmp_path / "sparse.raw"
    with open(src, "wb") as f:
        f.truncate(64 * MiB)
        f.write(b"\x00" * 510 + b"\x55\xaa")
        f.seek(40 * MiB)
        f.write(os.urandom(MiB))
    out = tmp_path / "out.raw"
    with open_image(LocalFile(src)) as img, open_disk(out, create_size=img.virtual_size) as d:
        result = convert(img, d)
    assert sha256_file(out) == sha256_file(src)
    assert out.stat().st_blocks * 512 <= 2 * MiB
    assert result.written_bytes <= 2 * MiB


def test_destination_too_small_fails_before_writing(guest_raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "small.raw"
    size = guest_raw.stat().st_size - 1
    out.write_bytes(b"\xaa" * size)
    before = hashlib.sha256(out.read_bytes()).hexdigest()
    with (
        open_image(LocalFile(guest_raw)) as img,
        open_disk(out) as disk,
        pytest.raises(ImageVerificationError) as info,
    ):
        convert(img, disk)
    assert info.value.code == "IMAGE_VERIFICATION_FAILED"
    assert "1 bytes short" in info.value.reason
    assert hashlib.sha256(out.read_bytes()).hexdigest() == before


def test_existing_destination_is_fully_overwritten(guest_raw: Path, tmp_path: Path) -> None:
    """Zero regions must be zeroed on a disk that already holds data."""
    out = tmp_path / "dirty.raw"
    out.write_bytes(b"\xaa" * guest_raw.stat().st_size)
    with open_image(LocalFile(guest_raw)) as img, open_disk(out) as disk:
        convert(img, disk)
    assert sha256_file(out) == sha256_file(guest_raw)


def test_block_device_destination(
    guest_raw: Path, tmp_path: Path, loop_device: tuple[Path, Path]
) -> None:
    dev, _ = loop_device
    with open(dev, "r+b") as f:
        f.write(b"\xaa" * (64 * MiB))
    qcow = tmp_path / "g.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", guest_raw, qcow)
    with open_image(LocalFile(qcow)) as img, open_disk(dev) as disk:
        assert disk.is_block and disk.size == 64 * MiB
        result = convert(img, disk)
    n = guest_raw.stat().st_size
    with open(dev, "rb") as f:
        landed = f.read(n)
        rest = f.read()
    assert hashlib.sha256(landed).hexdigest() == sha256_file(guest_raw)
    assert rest == b"\xaa" * len(rest)  # nothing past the image was touched
    assert result.virtual_size == n


def test_resume_from_checkpoint_gives_the_same_digest(tmp_path: Path) -> None:
    src = tmp_path / "big.raw"
    write_guest(src, 200 * MiB + 4096, seed=5)
    out = tmp_path / "out.raw"
    marks: list[tuple[int, dict[int, str]]] = []
    with open_image(LocalFile(src)) as img, open_disk(out, create_size=img.virtual_size) as d:
        full = convert(img, d, checkpoint=lambda off, segs: marks.append((off, segs)))
    assert [m[0] for m in marks] == [64 * MiB, 128 * MiB, 192 * MiB]
    offset, segments = marks[1]
    with open(out, "r+b") as f:  # lose everything after the checkpoint
        f.seek(offset)
        f.write(b"\xaa" * (src.stat().st_size - offset))
    with open_image(LocalFile(src)) as img, open_disk(out) as d:
        resumed = convert(img, d, resume_from=offset, segments=segments)
    assert resumed.digest == full.digest
    assert resumed.data_bytes == full.data_bytes
    assert sha256_file(out) == sha256_file(src)


@pytest.fixture(scope="module")
def text_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 MiB of varied text: every cluster compresses, to a few KiB each."""
    rng = random.Random(3)
    words = [rng.randbytes(rng.randint(2, 9)).hex().encode() for _ in range(4000)]
    path = tmp_path_factory.mktemp("text") / "text.raw"
    path.write_bytes(b" ".join(rng.choices(words, k=1_100_000))[: 8 * MiB])
    return path


@pytest.mark.parametrize(
    "fmt",
    [
        ["-O", "qcow2"],
        ["-O", "vpc", "-o", "subformat=dynamic"],
        ["-O", "raw"],
        ["-c", "-O", "qcow2", "-o", "compression_type=zstd"],
        ["-c", "-O", "qcow2"],
        ["-O", "vmdk", "-o", "subformat=streamOptimized"],
    ],
)
def test_data_read_in_pieces_lands_byte_exact(
    fmt: list[str], guest_raw: Path, text_raw: Path, tmp_path: Path
) -> None:
    """Data runs come from the cache as pieces, unjoined; blocks that span two are joined.
    Compressed clusters and grains, read a batch's window at a time, span chunks too."""
    img_path, out = tmp_path / "image", tmp_path / "out.raw"
    guest = text_raw if "-c" in fmt or "vmdk" in fmt else guest_raw
    run("qemu-img", "convert", "-f", "raw", *fmt, guest, img_path)
    # Chunks that end inside 64 KiB blocks and inside compressed clusters.
    src = RemoteFile(img_path, chunk_size=100 * 1024 + 333, readahead=4, cache_bytes=4 * MiB)
    with open_image(src) as img, open_disk(out, create_size=img.virtual_size) as d:
        result = convert(img, d)
    assert src.split_reads > 0 or guest is text_raw  # compressed: windows, not data runs
    oracle = tmp_path / "oracle.raw"  # a VHD's size is rounded to its geometry
    run("qemu-img", "convert", "-O", "raw", img_path, oracle)
    assert sha256_file(out) == sha256_file(oracle)
    with LocalFile(out) as landed:
        assert read_digest(landed.read, result.virtual_size) == result.digest


def test_whole_blocks_from_any_cut_of_a_batch() -> None:
    """Blocks come out aligned and in order, hashed as the joined bytes would be, however
    the batch's bytes are cut into parts (bytes or views, some ending inside blocks)."""
    rng = random.Random(7)
    for _ in range(500):
        total = rng.randint(1, 6 * BLOCK)
        data = bytearray(rng.randbytes(total))
        for b in range(0, total, BLOCK):
            if rng.random() < 0.3:
                data[b : b + BLOCK] = bytes(len(data[b : b + BLOCK]))
        if rng.random() < 0.2:
            data[:16] = bytes(16)  # a data block that starts with zeros
        whole = bytes(data)
        cuts = sorted(rng.sample(range(1, total), min(total - 1, rng.randint(0, 8))))
        parts: list[bytes | memoryview] = []
        for lo, hi in zip([0, *cuts], [*cuts, total], strict=True):
            parts.append(whole[lo:hi] if rng.random() < 0.5 else memoryview(whole)[lo:hi])
        start = rng.randint(0, 100) * BLOCK
        pos = start
        for offset, buf in _whole_blocks(start, parts):
            assert offset == pos and offset % BLOCK == 0
            assert bytes(buf) == whole[offset - start : offset - start + len(buf)]
            assert block_records(offset, buf) == block_records(offset, bytes(buf))
            pos += len(buf)
            assert pos % BLOCK == 0 or pos == start + total
        assert pos == start + total


def test_a_scattered_images_runs_are_fetched_ahead(tmp_path: Path) -> None:
    """Guest-adjacent clusters 2 MiB apart in the file: each batch's short runs are hinted
    to the source when it is queued, so more requests are in flight than the two workers
    would have, and the image lands byte-exact."""
    img_path, out = tmp_path / "scattered.qcow2", tmp_path / "out.raw"
    run("qemu-img", "create", "-f", "qcow2", img_path, "64M")
    order = sorted(range(1024), key=lambda c: (c % 32, c // 32))
    writes = "".join(f"write -P {c % 251 + 1} {c * 65536} 65536\n" for c in order)
    subprocess.run(["qemu-io", "-f", "qcow2", img_path], input=writes.encode(), check=True)
    src = RemoteFile(img_path, delay=0.01)
    with open_image(src) as img, open_disk(out, create_size=img.virtual_size) as d:
        convert(img, d)
    assert src.max_in_flight > 2
    assert src.bytes_fetched <= 1.5 * img_path.stat().st_size
    assert sha256_file(out) == oracle_sha256(img_path, tmp_path)
