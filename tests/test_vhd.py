"""VHD (vpc): fixed and dynamic images convert byte-exactly; damaged or chained ones are refused."""

from __future__ import annotations

import random
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import MemorySource, MiB, oracle_sha256, rehost_sha256, run, write_guest
from rehost.blob.source import LocalFile
from rehost.errors import SINGLE_FILE_HINT, ImageMetadataError
from rehost.image import ExtentKind, open_image, vhd
from rehost.image.vhd import vpc_checksum

GUEST_SIZE = 24 * MiB + 7 * 512  # not a multiple of the 2 MiB block, nor CHS-representable
DYN_HEADER_AT = 512

# -- fixtures ------------------------------------------------------------------------


def _sparse_raw(path: Path, size: int) -> None:
    """Data at the start, in the middle and at the very end; whole blocks of holes between."""
    rng = random.Random(5)
    with open(path, "wb") as f:
        f.truncate(size)
        for at, n in ((0, 3 * MiB + 1000), (17 * MiB + 4096, 700_000), (size - 5000, 5000)):
            f.seek(at)
            f.write(rng.randbytes(n))


@pytest.fixture(scope="session")
def vhds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("vhd")
    guest, sparse = d / "guest.raw", d / "sparse.raw"
    write_guest(guest, GUEST_SIZE, seed=3)
    _sparse_raw(sparse, 40 * MiB + 1536)
    out: dict[str, Path] = {}
    for name, src, opts in [
        ("dynamic-chs", guest, "subformat=dynamic"),
        ("dynamic-force-size", guest, "subformat=dynamic,force_size=on"),
        ("fixed-chs", guest, "subformat=fixed"),
        ("fixed-force-size", guest, "subformat=fixed,force_size=on"),
        ("dynamic-sparse", sparse, "subformat=dynamic,force_size=on"),
    ]:
        out[name] = d / f"{name}.vhd"
        run("qemu-img", "convert", "-O", "vpc", "-o", opts, src, out[name])
    out["dynamic-empty"] = d / "empty.vhd"
    run("qemu-img", "create", "-q", "-f", "vpc", out["dynamic-empty"], "10M")
    # Writes that fill blocks partially: the rest of an allocated block reads as zeros.
    out["dynamic-partial"] = d / "partial.vhd"
    run(
        "qemu-img", "create", "-q", "-f", "vpc", "-o", "force_size=on", out["dynamic-partial"], "9M"
    )
    run(
        "qemu-io", "-f", "vpc",
        "-c", "write -P 0x11 1536 5120",
        "-c", "write -P 0x22 4194304 512",
        "-c", "write -P 0x33 9436160 1024",
        out["dynamic-partial"],
    )  # fmt: skip
    return out


# -- byte patching -------------------------------------------------------------------

_FOOTER_FIELDS = {  # offset, struct format
    "data_offset": (16, ">Q"),
    "creator_app": (28, ">4s"),
    "current_size": (48, ">Q"),
    "cylinders": (56, ">H"),
    "heads": (58, ">B"),
    "sectors": (59, ">B"),
    "disk_type": (60, ">I"),
}
_HEADER_FIELDS = {
    "table_offset": (16, ">Q"),
    "max_entries": (28, ">I"),
    "block_size": (32, ">I"),
}


def _fix_footer(buf: bytearray, at: int) -> None:
    struct.pack_into(">I", buf, at + 64, vpc_checksum(bytes(buf[at : at + 512]), 64))


def _fix_header(buf: bytearray) -> None:
    at = DYN_HEADER_AT
    struct.pack_into(">I", buf, at + 36, vpc_checksum(bytes(buf[at : at + 1024]), 36))


def _footers(buf: bytearray) -> list[int]:
    return [at for at in (0, len(buf) - 512) if buf[at : at + 8] == b"conectix"]


def patch_footer(buf: bytearray, **fields: object) -> None:
    """Change footer fields in every footer copy, keeping their checksums valid."""
    for at in _footers(buf):
        for name, value in fields.items():
            off, fmt = _FOOTER_FIELDS[name]
            struct.pack_into(fmt, buf, at + off, value)
        _fix_footer(buf, at)


def patch_header(buf: bytearray, **fields: object) -> None:
    for name, value in fields.items():
        off, fmt = _HEADER_FIELDS[name]
        struct.pack_into(fmt, buf, DYN_HEADER_AT + off, value)
    _fix_header(buf)


def derive(src: Path, dst: Path, edit: Callable[[bytearray], object]) -> Path:
    buf = bytearray(src.read_bytes())
    edit(buf)
    dst.write_bytes(bytes(buf))
    return dst


def bat_entry(buf: bytearray, index: int) -> int:
    (table,) = struct.unpack_from(">Q", buf, DYN_HEADER_AT + 16)
    value: int = struct.unpack_from(">I", buf, table + 4 * index)[0]
    return value


def set_bat_entry(buf: bytearray, index: int, value: int) -> None:
    (table,) = struct.unpack_from(">Q", buf, DYN_HEADER_AT + 16)
    struct.pack_into(">I", buf, table + 4 * index, value)


def refused(path: Path, reason: str) -> ImageMetadataError:
    """Opening and walking the image must fail with a typed error naming `reason`."""
    with (
        pytest.raises(ImageMetadataError) as info,
        LocalFile(path) as src,
        open_image(src) as img,
    ):
        img.check()
    assert reason in info.value.reason, info.value.reason
    return info.value


# -- conversions match qemu-img --------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "dynamic-chs",
        "dynamic-force-size",
        "fixed-chs",
        "fixed-force-size",
        "dynamic-sparse",
        "dynamic-empty",
        "dynamic-partial",
    ],
)
def test_matches_qemu(vhds: dict[str, Path], tmp_path: Path, name: str) -> None:
    assert rehost_sha256(vhds[name], tmp_path) == oracle_sha256(vhds[name], tmp_path, "vpc")


def test_geometry_and_layout(vhds: dict[str, Path]) -> None:
    with open_image(LocalFile(vhds["dynamic-chs"])) as img:
        assert (img.format, img.subformat, img.cluster_size) == ("vhd", "dynamic", 2 * MiB)
        assert img.virtual_size > GUEST_SIZE  # rounded up to the CHS geometry, like qemu
        assert img.details["size_from"] == "CHS geometry"
        c, h, s = img.details["geometry_chs"]
        assert img.virtual_size == c * h * s * 512
    with open_image(LocalFile(vhds["fixed-force-size"])) as img:
        assert (img.subformat, img.virtual_size) == ("fixed", GUEST_SIZE)
        assert img.details["size_from"] == "footer current_size"
    with open_image(LocalFile(vhds["dynamic-sparse"])) as img:
        kinds = [e.kind for e in img.extents()]
        assert ExtentKind.ZERO in kinds and ExtentKind.DATA in kinds
        assert img.allocated_bytes() < 10 * MiB


def _smaller_chs(buf: bytearray) -> None:
    patch_footer(buf, creator_app=b"vpc ", cylinders=500, heads=4, sectors=17)


@pytest.mark.parametrize(
    ("base", "edit"),
    [
        # Hyper-V sizes by current_size, Virtual PC by the geometry: qemu's table decides.
        ("dynamic-force-size", lambda b: patch_footer(b, creator_app=b"win ")),
        ("dynamic-chs", lambda b: patch_footer(b, creator_app=b"vpc ")),
        ("fixed-force-size", lambda b: patch_footer(b, creator_app=b"tap\0")),
        ("fixed-chs", lambda b: patch_footer(b, creator_app=b"d2v ")),
        # The maximum geometry means "use current_size" whoever the creator.
        ("dynamic-force-size", lambda b: patch_footer(b, creator_app=b"vpc ")),
        # A geometry smaller than current_size: the tail of the disk is invisible to qemu.
        ("dynamic-force-size", _smaller_chs),
        # A current_size that is not a whole number of sectors is rounded down.
        ("dynamic-force-size", lambda b: patch_footer(b, current_size=GUEST_SIZE + 100)),
    ],
    ids=["win", "vpc-chs", "tap", "d2v", "vpc-max-geometry", "chs-smaller", "odd-current-size"],
)
def test_size_rules_match_qemu(
    vhds: dict[str, Path], tmp_path: Path, base: str, edit: Callable[[bytearray], None]
) -> None:
    p = derive(vhds[base], tmp_path / f"{base}-patched.vhd", edit)
    assert rehost_sha256(p, tmp_path) == oracle_sha256(p, tmp_path, "vpc")


def test_unallocated_extra_bat_entries_are_accepted(vhds: dict[str, Path], tmp_path: Path) -> None:
    """Xen preallocates the BAT for a maximum size: more entries than the disk needs."""

    def grow_bat(buf: bytearray) -> None:
        entries = struct.unpack_from(">I", buf, DYN_HEADER_AT + 28)[0]
        # The BAT sector has room for 128 entries; the unused ones are 0xFFFFFFFF.
        patch_header(buf, max_entries=entries + 5)

    p = derive(vhds["dynamic-force-size"], tmp_path / "bigbat.vhd", grow_bat)
    assert rehost_sha256(p, tmp_path) == oracle_sha256(p, tmp_path, "vpc")


# -- refusals ---------------------------------------------------------------------------


def _corrupt(at: int) -> Callable[[bytearray], None]:
    def edit(buf: bytearray) -> None:
        buf[at if at >= 0 else len(buf) + at] ^= 0x40

    return edit


def _differencing(buf: bytearray) -> None:
    patch_footer(buf, disk_type=4)


def _parent_locator(buf: bytearray) -> None:
    struct.pack_into(">4sIIIQ", buf, DYN_HEADER_AT + 576, b"W2ku", 512, 40, 0, 4096)
    _fix_header(buf)


def _tail_disagrees(buf: bytearray) -> None:
    at = len(buf) - 512
    struct.pack_into(">Q", buf, at + 48, 1 * MiB)
    _fix_footer(buf, at)


def _bat_entry(index: int, value: int) -> Callable[[bytearray], None]:
    return lambda buf: set_bat_entry(buf, index, value)


def _bat_into_footer(buf: bytearray) -> None:
    # A block whose data ends inside the footer at the end of the file.
    set_bat_entry(buf, 0, (len(buf) - 512 - 2 * MiB) // 512)


def _first_allocated_past_eof(buf: bytearray) -> None:
    set_bat_entry(buf, 0, len(buf) // 512 + 8)


def _truncate_keep_footer(buf: bytearray) -> None:
    footer = bytes(buf[-512:])
    del buf[len(buf) // 2 :]
    buf += footer


DYNAMIC_REFUSALS: list[tuple[str, Callable[[bytearray], object], str]] = [
    ("footer-copy-checksum", _corrupt(40), "copy at offset 0 has a bad checksum"),
    ("tail-footer-checksum", _corrupt(-470), "footer at the end has a bad checksum"),
    ("tail-footer-missing", lambda b: b.__delitem__(slice(-512, None)), "no VHD footer signature"),
    ("tail-disagrees", _tail_disagrees, "disagree on current_size"),
    ("header-checksum", _corrupt(DYN_HEADER_AT + 100), "dynamic header at offset 512 has a bad"),
    ("header-cookie", _corrupt(DYN_HEADER_AT), "no dynamic header signature"),
    ("header-offset-unaligned", lambda b: patch_footer(b, data_offset=700), "unaligned or outside"),
    ("header-offset-past-eof", lambda b: patch_footer(b, data_offset=1 << 40), "outside the file"),
    ("unknown-type", lambda b: patch_footer(b, disk_type=7), "unknown disk type 7"),
    ("fixed-with-copy", lambda b: patch_footer(b, disk_type=2), "ambiguous"),
    ("block-size-not-pow2", lambda b: patch_header(b, block_size=3 * MiB), "not a power of two"),
    ("block-size-absurd", lambda b: patch_header(b, block_size=1 << 30), "not a power of two"),
    ("block-size-tiny", lambda b: patch_header(b, block_size=2048), "not a power of two"),
    ("bat-too-small", lambda b: patch_header(b, max_entries=3), "needs 13 blocks"),
    ("bat-cannot-fit", lambda b: patch_header(b, max_entries=0xFFFFFFFF), "does not fit"),
    ("bat-past-eof", lambda b: patch_header(b, table_offset=1 << 40), "does not fit"),
    ("bat-unaligned", lambda b: patch_header(b, table_offset=1537), "unaligned"),
    (
        "bat-over-header",
        lambda b: patch_header(b, table_offset=1024),
        "overlaps the dynamic header",
    ),
    (
        "bat-over-footer-copy",
        lambda b: patch_header(b, table_offset=0),
        "unaligned or does not fit",
    ),
    ("entry-past-eof", _first_allocated_past_eof, "past the data area"),
    ("entry-into-header", _bat_entry(0, 1), "overlaps the dynamic header"),
    ("entry-into-bat", _bat_entry(0, 3), "overlaps the BAT"),
    ("entry-into-footer", _bat_into_footer, "past the data area"),
    ("truncated-keep-footer", _truncate_keep_footer, "past the data area"),
    ("too-large", lambda b: patch_footer(b, current_size=3 << 40), "2040 GiB limit"),
    ("zero-size", lambda b: patch_footer(b, current_size=0), "virtual size 0 is not positive"),
]


@pytest.mark.parametrize(
    ("edit", "reason"),
    [(e, r) for _, e, r in DYNAMIC_REFUSALS],
    ids=[n for n, _, _ in DYNAMIC_REFUSALS],
)
def test_dynamic_refusals(
    vhds: dict[str, Path],
    tmp_path: Path,
    edit: Callable[[bytearray], object],
    reason: str,
) -> None:
    refused(derive(vhds["dynamic-force-size"], tmp_path / "bad.vhd", edit), reason)


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (_differencing, "differencing disk (type 4)"),
        (_parent_locator, "parent locator 0"),
    ],
    ids=["differencing", "parent-locator"],
)
def test_parent_references_refused(
    vhds: dict[str, Path], tmp_path: Path, edit: Callable[[bytearray], object], reason: str
) -> None:
    err = refused(derive(vhds["dynamic-force-size"], tmp_path / "diff.vhd", edit), reason)
    assert err.hint == SINGLE_FILE_HINT


FIXED_REFUSALS: list[tuple[str, Callable[[bytearray], object], str]] = [
    ("footer-checksum", _corrupt(-500), "footer at the end has a bad checksum"),
    ("differencing", _differencing, "differencing disk"),
    ("dynamic-without-copy", lambda b: patch_footer(b, disk_type=3), "no copy of it"),
    ("size-past-data", lambda b: patch_footer(b, current_size=GUEST_SIZE + 512), "truncated"),
    ("too-large", lambda b: patch_footer(b, current_size=3 << 40), "2040 GiB limit"),
]


@pytest.mark.parametrize(
    ("edit", "reason"),
    [(e, r) for _, e, r in FIXED_REFUSALS],
    ids=[n for n, _, _ in FIXED_REFUSALS],
)
def test_fixed_refusals(
    vhds: dict[str, Path],
    tmp_path: Path,
    edit: Callable[[bytearray], object],
    reason: str,
) -> None:
    refused(derive(vhds["fixed-force-size"], tmp_path / "bad.vhd", edit), reason)


def test_repeated_block_refused(vhds: dict[str, Path], tmp_path: Path) -> None:
    """Every BAT entry naming the same block would expand a small file into the whole disk."""

    def repeat(buf: bytearray) -> None:
        first = bat_entry(buf, 0)
        patch_header(buf, max_entries=100)  # the BAT sector has room for 128 entries
        for i in range(100):
            set_bat_entry(buf, i, first)

    p = derive(vhds["dynamic-partial"], tmp_path / "repeat.vhd", repeat)
    refused(p, "blocks overlap")


def test_truncated_fixed_is_not_a_vhd(vhds: dict[str, Path], tmp_path: Path) -> None:
    """Cut anywhere, a fixed VHD loses its only header: it must not pass as some other format."""
    p = derive(
        vhds["fixed-force-size"], tmp_path / "cut.vhd", lambda b: b.__delitem__(slice(-700, None))
    )
    with pytest.raises(ImageMetadataError) as info:
        open_image(LocalFile(p))
    assert "unknown format" in info.value.reason


def test_polyglot_with_vhdx_refused(vhds: dict[str, Path], tmp_path: Path) -> None:
    vhdx = tmp_path / "x.vhdx"
    run("qemu-img", "create", "-q", "-f", "vhdx", vhdx, "8M")
    p = tmp_path / "poly.img"
    p.write_bytes(vhdx.read_bytes() + vhds["fixed-chs"].read_bytes()[-512:])
    with pytest.raises(ImageMetadataError) as info:
        open_image(LocalFile(p))
    assert "several formats (vhd, vhdx)" in info.value.reason


def test_guest_starting_with_a_footer_is_ambiguous(vhds: dict[str, Path], tmp_path: Path) -> None:
    """A fixed VHD whose guest disk starts with a VHD footer: qemu would read it as dynamic."""
    src = vhds["fixed-force-size"]
    p = tmp_path / "nested.vhd"
    shutil.copy(src, p)
    with open(p, "r+b") as f:
        f.write(src.read_bytes()[-512:])
    refused(p, "ambiguous")


def test_mutated_fields_only_raise_typed_errors(vhds: dict[str, Path]) -> None:
    """Random values planted in footer, header and BAT fields, checksums fixed: never a crash."""
    rng = random.Random(7)
    base = bytearray(vhds["dynamic-partial"].read_bytes())
    fields = [("f", k) for k in _FOOTER_FIELDS] + [("h", k) for k in _HEADER_FIELDS]
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(400):
        buf = bytearray(base)
        for _ in range(rng.randint(0, 3)):
            set_bat_entry(buf, rng.randrange(128), rng.choice([0, 1, rng.getrandbits(32)]))
        for kind, name in rng.sample(fields, rng.randint(1, 3)):
            off, fmt = (_FOOTER_FIELDS if kind == "f" else _HEADER_FIELDS)[name]
            size = struct.calcsize(fmt)
            value = rng.choice([0, 1, 512, (1 << (8 * size)) - 1, rng.getrandbits(8 * size)])
            raw = (value % (1 << (8 * size))).to_bytes(size, "big")
            if kind == "f":
                for at in _footers(buf):
                    buf[at + off : at + off + size] = raw
            else:
                buf[DYN_HEADER_AT + off : DYN_HEADER_AT + off + size] = raw
        for at in _footers(buf):
            _fix_footer(buf, at)
        _fix_header(buf)
        try:
            vhd.open(MemorySource(bytes(buf))).check()
            outcomes["ok"] += 1
        except ImageMetadataError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 100 and outcomes["ok"] > 10, outcomes
