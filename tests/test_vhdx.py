"""VHDX: fixed and dynamic images convert byte-exactly, the log is replayed like qemu's
`check -r all` does, and damaged or chained images are refused."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import struct
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import google_crc32c
import pytest

from helpers import MemorySource, MiB, oracle_sha256, rehost_sha256, run, sha256_file, write_guest
from rehost.blob.source import LocalFile
from rehost.errors import SINGLE_FILE_HINT, ImageMetadataError
from rehost.image import ExtentKind, open_image, vhdx
from rehost.image.base import DiskImage, Extent

KiB = 1 << 10
GUEST_SIZE = 21 * MiB + 3 * 4096 + 512  # not a multiple of any block size, nor of 4 KiB
HEADERS = (64 * KiB, 128 * KiB)
REGION_TABLES = (192 * KiB, 256 * KiB)
LOG_AT = 1 * MiB  # where qemu-img puts the log (1 MiB long), the BAT and the metadata
BAT_AT = 2 * MiB
METADATA_AT = 3 * MiB

# -- fixtures ------------------------------------------------------------------------


def _sparse_raw(path: Path, size: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for at in (0, size // 3, size // 2 + 12345 * 512, size - 3 * MiB):
            f.seek(at)
            f.write(rng.randbytes(MiB + 4096))


@pytest.fixture(scope="session")
def vhdxs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("vhdx")
    guest, sparse, aligned = d / "guest.raw", d / "sparse.raw", d / "aligned.raw"
    write_guest(guest, GUEST_SIZE, seed=9)
    _sparse_raw(sparse, 300 * MiB + 64 * KiB, seed=4)  # a partial last 256 MiB block
    write_guest(aligned, 12 * MiB + 8 * KiB, seed=10)
    out: dict[str, Path] = {}
    for name, src, opts in [
        ("dynamic-1M", guest, "subformat=dynamic,block_size=1M"),
        ("dynamic-32M", guest, "subformat=dynamic"),
        ("fixed-1M", guest, "subformat=fixed,block_size=1M"),
        ("fixed-32M", guest, "subformat=fixed,block_size=32M"),
        ("dynamic-256M", sparse, "subformat=dynamic,block_size=256M"),
        ("fixed-256M", sparse, "subformat=fixed,block_size=256M"),
        ("aligned-1M", aligned, "subformat=dynamic,block_size=1M"),
    ]:
        out[name] = d / f"{name}.vhdx"
        run("qemu-img", "convert", "-O", "vhdx", "-o", opts, src, out[name])
    for name, opts in [
        ("created-dynamic", "subformat=dynamic"),
        ("created-fixed", "subformat=fixed"),
    ]:
        out[name] = d / f"{name}.vhdx"
        run("qemu-img", "create", "-q", "-f", "vhdx", "-o", opts, out[name], "9M")
    out["partial-writes"] = d / "partial.vhdx"
    run(
        "qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M", out["partial-writes"], "5M"
    )
    run(
        "qemu-io", "-f", "vhdx",
        "-c", "write -P 0x11 1536 5120",
        "-c", "write -P 0x22 3145728 512",
        "-c", "write -P 0x33 5241856 1024",
        out["partial-writes"],
    )  # fmt: skip
    # 5 GiB of 256 MiB blocks: chunk ratio 16, so BAT entry 16 is a sector bitmap entry.
    out["interleaved"] = d / "interleaved.vhdx"
    run("qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=256M", out["interleaved"], "5G")
    run(
        "qemu-io", "-f", "vhdx",
        "-c", "write -P 0xab 0 1M",
        "-c", "write -P 0xcd 4352M 3M",
        "-c", "write -P 0xef 4G 512",
        "-c", "write -P 0x5a 4863M 1M",
        out["interleaved"],
    )  # fmt: skip
    return out


# -- byte patching -------------------------------------------------------------------


def crc_fix(buf: bytearray, at: int, size: int) -> None:
    buf[at + 4 : at + 8] = bytes(4)
    struct.pack_into("<I", buf, at + 4, google_crc32c.value(bytes(buf[at : at + size])))


def current_header(buf: bytearray) -> int:
    seqs = [struct.unpack_from("<Q", buf, at + 8)[0] for at in HEADERS]
    return HEADERS[0] if seqs[0] > seqs[1] else HEADERS[1]


_HEADER_FIELDS = {  # offset, struct format
    "sequence": (8, "<Q"),
    "log_guid": (48, "<16s"),
    "log_version": (64, "<H"),
    "version": (66, "<H"),
    "log_length": (68, "<I"),
    "log_offset": (72, "<Q"),
}


def patch_header(buf: bytearray, **fields: object) -> None:
    """Change fields of the current header, keeping its CRC valid."""
    patch_header_at(buf, current_header(buf), **fields)


def patch_header_at(buf: bytearray, at: int, **fields: object) -> None:
    for name, value in fields.items():
        off, fmt = _HEADER_FIELDS[name]
        struct.pack_into(fmt, buf, at + off, value)
    crc_fix(buf, at, 4 * KiB)


def patch_region(buf: bytearray, index: int, **fields: object) -> None:
    """Change region table entry `index` (fields guid, offset, length, flags) in both copies."""
    at = REGION_TABLES[0] + 16 + 32 * index
    guid, offset, length, flags = struct.unpack_from("<16sQII", buf, at)
    values = {"guid": guid, "offset": offset, "length": length, "flags": flags, **fields}
    struct.pack_into("<16sQII", buf, at, *values.values())
    if index >= struct.unpack_from("<I", buf, REGION_TABLES[0] + 8)[0]:
        struct.pack_into("<I", buf, REGION_TABLES[0] + 8, index + 1)
    crc_fix(buf, REGION_TABLES[0], 64 * KiB)
    buf[REGION_TABLES[1] : REGION_TABLES[1] + 64 * KiB] = buf[
        REGION_TABLES[0] : REGION_TABLES[0] + 64 * KiB
    ]


ITEMS = ["file parameters", "virtual size", "page 83", "logical sector", "physical sector"]


def patch_item(buf: bytearray, index: int, **fields: object) -> None:
    """Change metadata table entry `index` (qemu writes them in the order of ITEMS)."""
    at = METADATA_AT + 32 + 32 * index
    guid, offset, length, flags = struct.unpack_from("<16sIII", buf, at)
    values = {"guid": guid, "offset": offset, "length": length, "flags": flags, **fields}
    struct.pack_into("<16sIII", buf, at, *values.values())
    if index >= struct.unpack_from("<H", buf, METADATA_AT + 10)[0]:
        struct.pack_into("<H", buf, METADATA_AT + 10, index + 1)


def item_value(buf: bytearray, index: int, fmt: str, *values: int) -> None:
    (offset,) = struct.unpack_from("<I", buf, METADATA_AT + 32 + 32 * index + 16)
    struct.pack_into(fmt, buf, METADATA_AT + offset, *values)


def bat(buf: bytearray, index: int) -> int:
    value: int = struct.unpack_from("<Q", buf, BAT_AT + 8 * index)[0]
    return value


def set_bat(buf: bytearray, index: int, value: int) -> None:
    struct.pack_into("<Q", buf, BAT_AT + 8 * index, value)


def derive(src: Path, dst: Path, edit: Callable[[bytearray], object]) -> Path:
    buf = bytearray(src.read_bytes())
    edit(buf)
    dst.write_bytes(bytes(buf))
    return dst


def derive_head(src: Path, dst: Path, edit: Callable[[bytearray], object]) -> Path:
    """`derive` for big sparse images: only their first 4 MiB (headers, log, BAT, metadata)."""
    run("cp", "--sparse=always", src, dst)
    with open(dst, "r+b") as f:
        head = bytearray(f.read(4 * MiB))
        edit(head)
        f.seek(0)
        f.write(head)
    return dst


def refused(path: Path, reason: str) -> ImageMetadataError:
    with (
        pytest.raises(ImageMetadataError) as info,
        LocalFile(path) as src,
        open_image(src) as img,
    ):
        img.check()
    assert reason in info.value.reason, info.value.reason
    return info.value


def replayed_oracle(image: Path, tmp: Path) -> str:
    """qemu-img refuses to read a dirty VHDX read-only: replay a copy with `check -r all`."""
    copy = tmp / "replayed-by-qemu.vhdx"
    shutil.copy(image, copy)
    run("qemu-img", "check", "-q", "-r", "all", copy)
    replayed = bytearray(copy.read_bytes())
    at = current_header(replayed)
    assert replayed[at + 48 : at + 64] == bytes(16), "qemu did not replay the log"
    return oracle_sha256(copy, tmp)


def window_sha(img: DiskImage, start: int, length: int) -> str:
    """sha256 of guest bytes [start, start + length), read through the extents."""
    h = hashlib.sha256()
    for ext in img.extents():
        lo, hi = max(ext.offset, start), min(ext.end, start + length)
        if lo >= hi:
            continue
        if ext.kind is ExtentKind.ZERO:
            h.update(bytes(hi - lo))
        else:
            h.update(
                img.read(Extent(lo, hi - lo, ExtentKind.DATA, ext.host_offset + lo - ext.offset))
            )
    return h.hexdigest()


def qemu_window_sha(image: Path, tmp: Path, start: int, length: int) -> str:
    out = tmp / "window.raw"
    opts = f"driver=raw,offset={start},size={length},file.driver=vhdx,file.file.driver=file,file.file.filename={image}"
    run("qemu-img", "convert", "--image-opts", opts, "-O", "raw", out)
    try:
        return sha256_file(out)
    finally:
        out.unlink()


# -- conversions match qemu-img ------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "dynamic-1M",
        "dynamic-32M",
        "fixed-1M",
        "fixed-32M",
        "dynamic-256M",
        "fixed-256M",
        "created-dynamic",
        "created-fixed",
        "partial-writes",
    ],
)
def test_matches_qemu(vhdxs: dict[str, Path], tmp_path: Path, name: str) -> None:
    assert rehost_sha256(vhdxs[name], tmp_path) == oracle_sha256(vhdxs[name], tmp_path)


def test_layout_facts(vhdxs: dict[str, Path]) -> None:
    with open_image(LocalFile(vhdxs["fixed-32M"])) as img:
        assert (img.format, img.subformat, img.cluster_size) == ("vhdx", "fixed", 32 * MiB)
        assert img.virtual_size == GUEST_SIZE
        assert img.details["chunk_ratio"] == 128 and img.details["log"] == "empty"
    with open_image(LocalFile(vhdxs["dynamic-256M"])) as img:
        assert img.details["bat_entries"] == 2
    with open_image(LocalFile(vhdxs["interleaved"])) as img:
        assert img.details["bat_entries"] == 21  # 20 blocks and one sector bitmap entry
        assert img.allocated_bytes() == 4 * 256 * MiB
        assert sum(e.kind is ExtentKind.ZERO for e in img.extents()) == 2


@pytest.mark.parametrize(
    ("start", "length"),
    [
        (0, 4 * MiB),
        (4095 * MiB, 4 * MiB),
        (4351 * MiB, 8 * MiB),
        (4862 * MiB, 4 * MiB),
        (5119 * MiB, MiB),
    ],
)
def test_sector_bitmap_entries_interleave(
    vhdxs: dict[str, Path], tmp_path: Path, start: int, length: int
) -> None:
    """Blocks 16 and up sit one BAT entry later than their index; compared in windows."""
    p = vhdxs["interleaved"]
    with open_image(LocalFile(p)) as img:
        assert img.details["chunk_ratio"] == 16
        assert window_sha(img, start, length) == qemu_window_sha(p, tmp_path, start, length)


def test_sector_bitmap_entries_are_ignored(vhdxs: dict[str, Path], tmp_path: Path) -> None:
    junk = 0xDEAD_0007  # PARTIALLY_PRESENT, past EOF: refused for a payload block
    p = derive_head(vhdxs["interleaved"], tmp_path / "junk.vhdx", lambda b: set_bat(b, 16, junk))
    with open_image(LocalFile(p)) as img:
        got = window_sha(img, 4095 * MiB, 4 * MiB)
    assert got == qemu_window_sha(p, tmp_path, 4095 * MiB, 4 * MiB)


def test_4k_logical_sectors(vhdxs: dict[str, Path], tmp_path: Path) -> None:
    """qemu 7.2 refuses 4 KiB logical sectors; the data path is the same, so compare with the 512 original."""
    src = vhdxs["aligned-1M"]
    p = derive(src, tmp_path / "4k.vhdx", lambda b: item_value(b, 3, "<I", 4096))
    with open_image(LocalFile(p)) as img:
        assert img.details["logical_sector_size"] == 4096
        assert img.details["chunk_ratio"] == 32768
    assert rehost_sha256(p, tmp_path) == oracle_sha256(src, tmp_path)


def test_stale_current_header_falls_back(vhdxs: dict[str, Path], tmp_path: Path) -> None:
    """A torn header update leaves one valid header: it is used, as the spec and qemu say."""
    p = derive(
        vhdxs["dynamic-1M"],
        tmp_path / "torn.vhdx",
        lambda b: b.__setitem__(current_header(b) + 200, 1),
    )
    with open_image(LocalFile(p)) as img:
        assert "header_problems" in img.details
    assert rehost_sha256(p, tmp_path) == oracle_sha256(p, tmp_path)


def test_optional_unknown_region_is_ignored(vhdxs: dict[str, Path], tmp_path: Path) -> None:
    guid = uuid.uuid4().bytes_le
    p = derive(
        vhdxs["dynamic-1M"],
        tmp_path / "extra-region.vhdx",
        lambda b: patch_region(b, 2, guid=guid, offset=4 * MiB, length=MiB, flags=0),
    )
    assert rehost_sha256(p, tmp_path) == oracle_sha256(p, tmp_path)


# -- the log ---------------------------------------------------------------------------

LOG_GUID = bytes(range(1, 17))
Write = tuple[int, bytes | int]
"""(file offset, 4096 bytes of data) or (file offset, length to zero)."""


def log_entry(
    seq: int, tail: int, writes: list[Write], flushed: int, guid: bytes = LOG_GUID
) -> bytes:
    """A log entry as MS-VHDX 2.3.1 lays it out, CRC-32C included."""
    count = len(writes)
    desc_sectors = -(-(64 + 32 * count) // 4096)
    data = [w for w in writes if isinstance(w[1], bytes)]
    buf = bytearray((desc_sectors + len(data)) * 4096)
    struct.pack_into(
        "<4sIIIQII16sQQ", buf, 0, b"loge", 0, len(buf), tail, seq, count, 0, guid, flushed, flushed
    )
    sector = desc_sectors
    for i, (offset, what) in enumerate(writes):
        at = 64 + 32 * i
        if isinstance(what, bytes):
            struct.pack_into("<4s4s8sQQ", buf, at, b"desc", what[4092:], what[:8], offset, seq)
            struct.pack_into(
                "<4sI4084sI", buf, sector * 4096, b"data", seq >> 32, what[8:4092], seq & 0xFFFFFFFF
            )
            sector += 1
        else:
            struct.pack_into("<4s4sQQQ", buf, at, b"zero", bytes(4), what, offset, seq)
    crc_fix(buf, 0, len(buf))
    return bytes(buf)


def install_log(buf: bytearray, entries: list[tuple[int, bytes]], guid: bytes = LOG_GUID) -> None:
    """Write entries at their log positions (wrapping around) and set the header's LogGuid."""
    for position, entry in entries:
        for i in range(0, len(entry), 4096):
            at = LOG_AT + (position + i) % MiB
            buf[at : at + 4096] = entry[i : i + 4096]
    patch_header(buf, log_guid=guid)


def _bat_sector_with(buf: bytearray, index: int, value: int) -> bytes:
    sector = bytearray(buf[BAT_AT : BAT_AT + 4096])
    struct.pack_into("<Q", sector, 8 * index, value)
    return bytes(sector)


def host(buf: bytearray, block: int) -> int:
    return bat(buf, block) & ~0xFFFFF


def present(buf: bytearray) -> list[int]:
    """Indexes of the FULLY_PRESENT blocks (no sector bitmap entries in these small images)."""
    entries = struct.unpack_from("<64Q", buf, BAT_AT)
    return [i for i, e in enumerate(entries) if e & 7 == 6]


def _one_entry(buf: bytearray) -> None:
    a, b, c = present(buf)[:3]
    entry = log_entry(
        7,
        0,
        [
            (host(buf, a) + 8192, b"\x5a" * 4096),
            (host(buf, b), 3 * 4096),
            (BAT_AT, _bat_sector_with(buf, c, 2)),  # block c now reads as zeros
        ],
        len(buf),
    )
    install_log(buf, [(0, entry)])


def _two_entries(buf: bytearray) -> None:
    a, b = present(buf)[:2]
    first = log_entry(
        41, 0, [(host(buf, a), b"\x01" * 4096), (host(buf, b), b"\x02" * 4096)], len(buf)
    )
    second = log_entry(42, 0, [(host(buf, a), b"\x03" * 4096)], len(buf))
    install_log(buf, [(0, first), (len(first), second)])


def _wrapped_entry(buf: bytearray) -> None:
    tail = MiB - 8192  # header and descriptors, one data sector, then the second wraps to 0
    a, b = present(buf)[2:4]
    entry = log_entry(
        9, tail, [(host(buf, a), b"\x44" * 4096), (host(buf, b) + 4096, b"\x55" * 4096)], len(buf)
    )
    install_log(buf, [(tail, entry)])


def _newest_complete_wins(buf: bytearray) -> None:
    a, b = present(buf)[:2]
    old = log_entry(
        3, 0, [(host(buf, a), b"\x0a" * 4096), (host(buf, b), b"\x0b" * 4096)], len(buf)
    )
    new = log_entry(10, 64 * KiB, [(host(buf, a), b"\x0c" * 4096)], len(buf))
    install_log(buf, [(0, old), (64 * KiB, new)])


def _qemu_leftover(buf: bytearray) -> None:
    """qemu-img logs each BAT update, flushes it and clears the LogGuid: revive the last one."""
    guid = bytes(buf[LOG_AT + 32 : LOG_AT + 48])
    patch_header(buf, log_guid=guid)


@pytest.mark.parametrize(
    "edit",
    [_one_entry, _two_entries, _wrapped_entry, _newest_complete_wins, _qemu_leftover],
    ids=["data-zero-bat", "two-entries", "wrapped", "newest-wins", "qemu-leftover"],
)
def test_log_replay_matches_qemu_check(
    vhdxs: dict[str, Path], tmp_path: Path, edit: Callable[[bytearray], None]
) -> None:
    p = derive(vhdxs["dynamic-1M"], tmp_path / "dirty.vhdx", edit)
    with open_image(LocalFile(p)) as img:
        assert img.details["log"].startswith("replayed in memory")
    assert rehost_sha256(p, tmp_path) == replayed_oracle(p, tmp_path)


def _bad_crc_entry(buf: bytearray) -> None:
    entry = bytearray(log_entry(7, 0, [(host(buf, present(buf)[0]), b"\x5a" * 4096)], len(buf)))
    entry[5000] ^= 1
    install_log(buf, [(0, bytes(entry))])


@pytest.mark.parametrize(
    "edit",
    [
        lambda b: patch_header(b, log_guid=LOG_GUID),  # only qemu's entries, with another GUID
        _bad_crc_entry,
    ],
    ids=["other-guid", "bad-crc"],
)
def test_log_without_valid_entries_is_not_replayed(
    vhdxs: dict[str, Path], tmp_path: Path, edit: Callable[[bytearray], None]
) -> None:
    """qemu opens these read-only without complaint: nothing is replayed."""
    p = derive(vhdxs["dynamic-1M"], tmp_path / "no-entries.vhdx", edit)
    with open_image(LocalFile(p)) as img:
        assert "nothing to replay" in img.details["log"]
    assert rehost_sha256(p, tmp_path) == oracle_sha256(p, tmp_path)


def _log_with(*writes: Write, flushed: int = 0) -> Callable[[bytearray], None]:
    """An edit installing one entry with these writes, claiming `flushed` (or the file size)."""

    def edit(buf: bytearray) -> None:
        install_log(buf, [(0, log_entry(5, 0, list(writes), flushed or len(buf)))])

    return edit


def _bad_descriptor(buf: bytearray) -> None:
    entry = bytearray(log_entry(5, 0, [(host(buf, present(buf)[0]), b"\x5a" * 4096)], len(buf)))
    entry[64:68] = b"dexc"
    crc_fix(entry, 0, len(entry))
    install_log(buf, [(0, bytes(entry))])


def _incomplete(buf: bytearray) -> None:
    install_log(
        buf, [(4096, log_entry(5, 0, [(host(buf, present(buf)[0]), b"\x5a" * 4096)], len(buf)))]
    )


LOG_REFUSALS: list[tuple[str, Callable[[bytearray], object], str]] = [
    (
        "flushed-past-eof",
        lambda b: _log_with((BAT_AT, bytes(4096)), flushed=len(b) + MiB)(b),
        "truncated",
    ),
    (
        "writes-header",
        _log_with((64 * KiB, bytes(4096))),
        "over the file identifier or the headers",
    ),
    ("writes-log", _log_with((LOG_AT + 8192, bytes(4096))), "in the log"),
    ("writes-past-eof", lambda b: _log_with((len(b), bytes(4096)))(b), "past the end"),
    ("zeroes-too-much", _log_with((BAT_AT, 200 * MiB)), "past the end"),
    ("bad-descriptor", _bad_descriptor, "unknown signature"),
    ("incomplete", _incomplete, "incomplete"),
    (
        "log-too-large",
        lambda b: patch_header(b, log_guid=LOG_GUID, log_length=64 * MiB),
        "replays in memory",
    ),
    ("log-version", lambda b: patch_header(b, log_version=1), "log version 1"),
    ("log-unaligned", lambda b: patch_header(b, log_offset=LOG_AT + 4096), "not 1 MiB aligned"),
    ("log-in-header", lambda b: patch_header(b, log_offset=0), "not 1 MiB aligned"),
]


@pytest.mark.parametrize(
    ("edit", "reason"), [(e, r) for _, e, r in LOG_REFUSALS], ids=[n for n, _, _ in LOG_REFUSALS]
)
def test_log_refusals(
    vhdxs: dict[str, Path], tmp_path: Path, edit: Callable[[bytearray], object], reason: str
) -> None:
    refused(derive(vhdxs["dynamic-1M"], tmp_path / "bad-log.vhdx", edit), reason)


def test_log_search_is_bounded(vhdxs: dict[str, Path], tmp_path: Path) -> None:
    """An entry header at every sector, each claiming the whole log: refused, not searched."""

    def edit(buf: bytearray) -> None:
        for at in range(LOG_AT, LOG_AT + MiB, 4096):
            struct.pack_into("<4sIIIQII16s", buf, at, b"loge", 1, MiB, 0, 1, 0, 0, LOG_GUID)
        patch_header(buf, log_guid=LOG_GUID)

    refused(derive(vhdxs["dynamic-1M"], tmp_path / "dos.vhdx", edit), "too many overlapping")


def test_too_many_log_sectors_refused(vhdxs: dict[str, Path], tmp_path: Path) -> None:
    """Zero descriptors are cheap to write but each sector costs overlay memory: bounded."""
    src = vhdxs["fixed-256M"]  # big enough to zero 80 MiB inside the file

    def edit(buf: bytearray) -> None:
        install_log(buf, [(0, log_entry(5, 0, [(host(buf, present(buf)[0]), 80 * MiB)], len(buf)))])

    refused(
        derive_head(src, tmp_path / "huge-log.vhdx", edit), "more than rehost replays in memory"
    )


# -- refusals -----------------------------------------------------------------------------


def _both_headers_bad(buf: bytearray) -> None:
    for at in HEADERS:
        buf[at + 300] ^= 1


def _version_2(buf: bytearray) -> None:
    for at in HEADERS:
        patch_header_at(buf, at, version=2)


def _equal_sequences(buf: bytearray) -> None:
    at = current_header(buf)
    other = HEADERS[1] if at == HEADERS[0] else HEADERS[0]
    patch_header_at(
        buf, other, sequence=struct.unpack_from("<Q", buf, at + 8)[0], log_guid=LOG_GUID
    )


def _region_tables_differ(buf: bytearray) -> None:
    buf[REGION_TABLES[1] + 16 + 28] ^= 1  # the BAT's "required" flag, in the second copy only
    crc_fix(buf, REGION_TABLES[1], 64 * KiB)


def _corrupt(at: int) -> Callable[[bytearray], None]:
    def edit(buf: bytearray) -> None:
        buf[at] ^= 0x10

    return edit


def _truncate(size: int) -> Callable[[bytearray], None]:
    return lambda buf: buf.__delitem__(slice(size, None))


REFUSALS: list[tuple[str, Callable[[bytearray], object], str]] = [
    ("too-small", _truncate(100 * KiB), "smaller than the 1 MiB"),
    ("no-file-id", _corrupt(0), "unknown format"),
    ("both-headers-bad", _both_headers_bad, "no valid VHDX header"),
    ("header-version", _version_2, "version 2"),
    ("equal-sequences", _equal_sequences, "cannot be chosen"),
    (
        "region-table-1-crc",
        _corrupt(REGION_TABLES[0] + 100),
        "region table 1 at offset 196608 has a bad CRC-32C",
    ),
    (
        "region-table-2-crc",
        _corrupt(REGION_TABLES[1] + 100),
        "region table 2 at offset 262144 has a bad CRC-32C",
    ),
    ("region-tables-differ", _region_tables_differ, "region tables differ"),
    ("bat-unaligned", lambda b: patch_region(b, 0, offset=BAT_AT + 4096), "not 1 MiB aligned"),
    ("bat-past-eof", lambda b: patch_region(b, 0, offset=1 << 40), "extends past the end"),
    ("bat-in-header", lambda b: patch_region(b, 0, offset=0), "overlaps the header section"),
    ("bat-over-log", lambda b: patch_region(b, 0, offset=LOG_AT), "overlaps the log"),
    ("bat-over-metadata", lambda b: patch_region(b, 0, length=2 * MiB), "overlaps the BAT region"),
    ("bat-missing", lambda b: patch_region(b, 0, guid=uuid.uuid4().bytes_le), "has no BAT region"),
    (
        "unknown-required-region",
        lambda b: patch_region(
            b, 2, guid=uuid.uuid4().bytes_le, offset=4 * MiB, length=MiB, flags=1
        ),
        "marked required",
    ),
    (
        "truncated-regions",
        _truncate(3 * MiB + 4096),
        "metadata region [3145728, 4194304) extends past the end",
    ),
    ("truncated-blocks", _truncate(12 * MiB), "lies past the end"),
    ("metadata-signature", _corrupt(METADATA_AT), "no VHDX metadata table signature"),
    (
        "metadata-count",
        lambda b: struct.pack_into("<H", b, METADATA_AT + 10, 5000),
        "claims 5000 entries",
    ),
    ("has-parent", lambda b: item_value(b, 0, "<II", MiB, 2), "differencing disk"),
    (
        "parent-locator",
        lambda b: patch_item(
            b,
            5,
            guid=uuid.UUID("a8d35f2d-b30b-454d-abf7-d3d84834ab0c").bytes_le,
            offset=0,
            length=0,
            flags=4,
        ),
        "parent locator",
    ),
    (
        "unknown-required-item",
        lambda b: patch_item(b, 5, guid=uuid.uuid4().bytes_le, offset=0, length=0, flags=4),
        "marked required",
    ),
    (
        "missing-page83",
        lambda b: patch_item(b, 2, guid=uuid.uuid4().bytes_le, flags=0),
        "has no page 83 data",
    ),
    ("item-length", lambda b: patch_item(b, 1, length=4), "is 4 bytes, not 8"),
    ("item-outside", lambda b: patch_item(b, 1, offset=MiB - 4), "outside the metadata region"),
    ("item-over-table", lambda b: patch_item(b, 1, offset=4096), "over its table"),
    ("items-overlap", lambda b: patch_item(b, 1, offset=65536 + 4), "overlap"),
    ("block-size-odd", lambda b: item_value(b, 0, "<I", 3 * MiB), "not a power of two"),
    ("block-size-huge", lambda b: item_value(b, 0, "<I", 512 * MiB), "not a power of two"),
    ("block-size-tiny", lambda b: item_value(b, 0, "<I", 64 * KiB), "not a power of two"),
    ("logical-sector", lambda b: item_value(b, 3, "<I", 1024), "logical sector size 1024"),
    ("physical-sector", lambda b: item_value(b, 4, "<I", 2048), "physical sector size 2048"),
    ("size-zero", lambda b: item_value(b, 1, "<Q", 0), "not positive"),
    ("size-absurd", lambda b: item_value(b, 1, "<Q", 1 << 50), "64 TiB"),
    ("size-unaligned", lambda b: item_value(b, 1, "<Q", GUEST_SIZE + 100), "not a multiple"),
    ("bat-too-small", lambda b: item_value(b, 1, "<Q", 60 << 40), "too small for"),
    ("block-past-eof", lambda b: set_bat(b, 0, (1 << 40) | 6), "lies past the end"),
    ("block-in-header", lambda b: set_bat(b, 0, 6), "overlaps the header section"),
    ("block-over-log", lambda b: set_bat(b, 0, LOG_AT | 6), "overlaps the log"),
    ("block-over-bat", lambda b: set_bat(b, 0, BAT_AT | 6), "overlaps the BAT region"),
    (
        "block-over-metadata",
        lambda b: set_bat(b, 3, METADATA_AT | 6),
        "overlaps the metadata region",
    ),
    (
        "blocks-overlap",
        lambda b: set_bat(b, present(b)[1], bat(b, present(b)[0])),
        "overlaps another payload block",
    ),
    ("partially-present", lambda b: set_bat(b, 0, bat(b, 0) | 7), "PARTIALLY_PRESENT"),
    ("invalid-state", lambda b: set_bat(b, 1, (bat(b, 1) & ~7) | 4), "invalid state 4"),
]


@pytest.mark.parametrize(
    ("edit", "reason"), [(e, r) for _, e, r in REFUSALS], ids=[n for n, _, _ in REFUSALS]
)
def test_refusals(
    vhdxs: dict[str, Path], tmp_path: Path, edit: Callable[[bytearray], object], reason: str
) -> None:
    err = refused(derive(vhdxs["dynamic-1M"], tmp_path / "bad.vhdx", edit), reason)
    if reason in ("differencing disk", "parent locator", "PARTIALLY_PRESENT"):
        assert err.hint == SINGLE_FILE_HINT


def test_huge_sparse_image_walks_fast(tmp_path: Path) -> None:
    """2 TiB of 1 MiB blocks is a 16 MiB BAT of ZERO entries: walked at C speed, not per entry."""
    p = tmp_path / "huge.vhdx"
    run("qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M", p, "2T")
    start = time.monotonic()
    with open_image(LocalFile(p)) as img:
        assert list(img.extents()) == [Extent(0, 2 << 40, ExtentKind.ZERO)]
    assert time.monotonic() - start < 2


def test_file_identifier_required(vhdxs: dict[str, Path], tmp_path: Path) -> None:
    p = derive(vhdxs["dynamic-1M"], tmp_path / "noid.vhdx", _corrupt(3))
    with pytest.raises(ImageMetadataError) as info:
        vhdx.open(LocalFile(p))
    assert "no VHDX file identifier" in info.value.reason


def test_partial_last_block_tolerated_like_qemu(vhdxs: dict[str, Path], tmp_path: Path) -> None:
    """The last 256 MiB block may end past EOF as long as its guest-visible part is inside."""
    src = vhdxs["dynamic-256M"]
    with open(src, "rb") as f:
        last = host(bytearray(f.read(4 * MiB)), 1)
    visible = 300 * MiB + 64 * KiB - 256 * MiB
    assert src.stat().st_size >= last + visible
    p = tmp_path / "partial-last.vhdx"
    run("cp", "--sparse=always", src, p)
    os.truncate(p, last + visible)
    assert rehost_sha256(p, tmp_path) == oracle_sha256(p, tmp_path)
    os.truncate(p, last + visible - 512)
    refused(p, "lies past the end")


def test_mutated_tables_only_raise_typed_errors(vhdxs: dict[str, Path]) -> None:
    """Random values in region entries, metadata entries and items, BAT entries and log
    fields, checksums fixed: only typed errors, never a crash."""
    rng = random.Random(11)
    base = bytearray(vhdxs["partial-writes"].read_bytes())
    outcomes = {"ok": 0, "refused": 0}

    def value(bits: int) -> int:
        return rng.choice([0, 1, 6, 4096, MiB, (1 << bits) - 1, rng.getrandbits(bits)]) % (
            1 << bits
        )

    for _ in range(300):
        buf = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            target = rng.randrange(5)
            if target == 0:
                patch_region(
                    buf, rng.randrange(3), **{rng.choice(["offset", "length", "flags"]): value(32)}
                )
            elif target == 1:
                patch_item(
                    buf, rng.randrange(6), **{rng.choice(["offset", "length", "flags"]): value(32)}
                )
            elif target == 2:
                item_value(buf, rng.randrange(5), "<I", value(32))
            elif target == 3:
                set_bat(buf, rng.randrange(8), value(64))
            else:
                field = rng.choice(["log_length", "log_offset", "log_version"])
                bits = 16 if field == "log_version" else 32
                patch_header(buf, **{field: value(bits), "log_guid": LOG_GUID})
        try:
            vhdx.open(MemorySource(bytes(buf))).check()
            outcomes["ok"] += 1
        except ImageMetadataError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 100 and outcomes["ok"] > 10, outcomes
