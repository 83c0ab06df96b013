"""VMDK hosted sparse extents: monolithicSparse and streamOptimized.

Why our own reader: no library reads VMDK safely while streaming from a
RangeSource. qemu-img needs a local file, opens every extent file a descriptor
names (absolute paths included) and follows parentFileNameHint to a parent
disk; it also reads zeros past the end of a truncated file. Here only a single
self-contained sparse file is accepted, and every header field, table and
grain is checked before it is used.

Format quirks:
- The header is little-endian after a "KDMV" magic; every offset in it and in
  the tables counts 512-byte sectors, so alignment to sectors is built in.
- The grain directory (GD) points to grain tables (GTs) of 512 entries; a GT
  entry points to a grain. An unallocated GD entry covers a whole GT's range
  with zeros; GT entry 1 means "zeroed grain" when header flag bit 2 is set.
  The redundant GD (RGD) is a backup copy that readers ignore.
- monolithicSparse (qemu and VMware alike) puts the header, descriptor, RGD,
  GD and every GT before grainOffset, so a grain below grainOffset would be
  metadata. That layout is required here, and so are GTs in increasing file
  order (every writer allocates them so), which makes checking them against
  one another O(1) each.
- streamOptimized grains are zlib streams (RFC 1950, despite the "deflate"
  name) behind a 12-byte marker: guest LBA (u64) and stream size (u32). qemu
  writes a seekable variant: tables before grainOffset like monolithicSparse
  and no footer. A true stream (VMware, ovftool) sets gdOffset to
  0xffffffffffffffff and writes the GD and GTs after the grains; its last 1536
  bytes are a footer marker, a copy of the header with the real gdOffset, and
  an end-of-stream marker, and qemu reads that copy instead of the header.
- qemu compresses only the guest part of a partial final grain, so it decodes
  to less than a grain; a writer that pads it decodes to a whole grain. qemu
  reads both; so does this reader.
- The embedded descriptor's one extent line names the file itself by a bare
  name (RW, or RDONLY as ovftool writes); the name may differ from the
  upload's, as files get renamed, but a path means another file.
- qemu ignores the embedded descriptor's extent lines and reads CID and
  parentFileNameHint from sector 1 by substring search, comments included. So
  the descriptor must start at sector 1 and end in a NUL, and the text
  "parentFileNameHint" anywhere in it refuses the image.
"""

from __future__ import annotations

import bisect
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

from rehost.blob.source import RangeSource
from rehost.errors import SINGLE_FILE_HINT, ImageMetadataError
from rehost.image.base import (
    DiskImage,
    Extent,
    ExtentKind,
    TableHints,
    check_virtual_size,
    merge_extents,
    require,
)
from rehost.image.codecs import decompress
from rehost.image.signatures import VMDK_COWD_MAGIC, VMDK_MAGIC, is_vmdk_descriptor

SECTOR = 512
_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")  # 79 bytes; the rest of the sector is padding
_GRAIN_MARKER = struct.Struct("<QI")  # lba, size of the compressed stream that follows
_META_MARKER = struct.Struct("<QII")  # value, size (always 0), type

GD_AT_END = 0xFFFF_FFFF_FFFF_FFFF
FLAG_NL_DETECT = 1 << 0
FLAG_RGD = 1 << 1
FLAG_ZERO_GRAIN = 1 << 2
FLAG_COMPRESS = 1 << 16
FLAG_MARKER = 1 << 17
_FLAG_NAMES = {
    FLAG_NL_DETECT: "newline detection",
    FLAG_RGD: "redundant grain directory",
    FLAG_ZERO_GRAIN: "zeroed grains",
    FLAG_COMPRESS: "compressed grains",
    FLAG_MARKER: "markers",
}
KNOWN_FLAGS = sum(_FLAG_NAMES)
NL_CHECK_BYTES = b"\n \r\n"
COMPRESSION_NONE = 0
COMPRESSION_DEFLATE = 1
MARKER_EOS = 0
MARKER_FOOTER = 3
FOOTER_BYTES = 3 * SECTOR  # footer marker, footer header, end-of-stream marker

SUPPORTED_VERSIONS = (1, 2, 3)  # qemu reads up to 3; 3 adds change tracking, read-compatible
GTES_PER_GT = 512  # the only value VMware and qemu write
GT_BYTES = GTES_PER_GT * 4
GTE_ZEROED = 1
MAX_GRAIN_SECTORS = 2048  # 1 MiB: VMware and qemu use 128; bounds a decoded grain's memory
DESCRIPTOR_SECTOR = 1
MAX_DESCRIPTOR_SECTORS = 2048  # qemu and VMware write 20
DESCRIPTOR_FILE_PEEK = 64 * 1024
MAX_GD_ENTRIES = 32 << 20  # qemu's limit on its L1 table
GD_SLICE_ENTRIES = 256 * 1024  # 1 MiB of grain directory at a time
GT_BATCH = 256  # contiguous grain tables read at once: 512 KiB

MONOLITHIC_SPARSE = "monolithicSparse"
STREAM_OPTIMIZED = "streamOptimized"
_MULTI_FILE_TYPES = {
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "vmfs",
    "vmfsSparse",
    "vmfsThin",
    "vmfsPreallocated",
    "vmfsEagerZeroedThick",
    "vmfsRaw",
    "vmfsRDM",
    "vmfsRDMP",
    "vmfsPassthroughRawDeviceMap",
    "seSparse",
    "fullDevice",
    "partitionedDevice",
    "custom",
}
_EXTENT_LINE = re.compile(
    r'(RW|RDONLY|NOACCESS)\s+(\d{1,20})\s+(\S+)(?:\s+"([^"]*)")?(?:\s+(\d+))?\s*', re.ASCII
)
_ACCESS_WORDS = ("RW", "RDONLY", "NOACCESS")
_HEX_ID = re.compile(r"[0-9a-fA-F]{1,8}", re.ASCII)
NO_PARENT = 0xFFFFFFFF
_NO_DESCRIPTOR = (
    "the sparse extent has no embedded descriptor: it is one extent of a multi-file disk, "
    "whose descriptor lives in another file"
)


@dataclass(frozen=True, slots=True)
class _Header:
    version: int
    flags: int
    capacity: int
    grain_sectors: int
    desc_offset: int
    desc_size: int
    gtes_per_gt: int
    rgd_offset: int
    gd_offset: int
    grain_offset: int
    unclean_shutdown: int
    check_bytes: bytes
    compress_algorithm: int

    @classmethod
    def parse(cls, sector: bytes, where: str) -> _Header:
        fields = _HEADER.unpack_from(sector)
        require(
            fields[0] == VMDK_MAGIC, f"{where}: bad magic {fields[0]!r}, expected {VMDK_MAGIC!r}"
        )
        return cls(*fields[1:])


@dataclass(frozen=True, slots=True)
class _Span:
    """A byte range of metadata in the file."""

    name: str
    start: int
    end: int

    def overlaps(self, other: _Span) -> bool:
        return self.start < other.end and other.start < self.end


@dataclass(frozen=True, slots=True)
class _ExtentLine:
    access: str
    sectors: int
    kind: str
    filename: str | None
    line: str


@dataclass
class _Descriptor:
    keys: dict[str, str] = field(default_factory=dict)
    duplicates: list[str] = field(default_factory=list)
    extents: list[_ExtentLine] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> _Descriptor:
        desc = cls()
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.split(None, 1)[0] in _ACCESS_WORDS:
                m = _EXTENT_LINE.fullmatch(line)
                if m is None:
                    desc.malformed.append(line)
                    continue
                access, sectors, kind, name, _ = m.groups()
                desc.extents.append(_ExtentLine(access, int(sectors), kind, name, line))
            elif "=" in line:
                key, value = (part.strip() for part in line.split("=", 1))
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                if key in desc.keys:
                    desc.duplicates.append(key)
                desc.keys[key] = value
        return desc


def _shown(name: str) -> str:
    return repr(name if len(name) <= 80 else name[:77] + "...")


def _refuse_descriptor_file(src: RangeSource) -> NoReturn:
    """A text descriptor keeps the disk in other files: name them, then refuse."""
    head = src.read(0, min(src.size, DESCRIPTOR_FILE_PEEK))
    desc = _Descriptor.parse(head.split(b"\0", 1)[0].decode("latin-1"))
    create_type = desc.keys.get("createType", "unknown")
    names = [e.filename for e in desc.extents if e.filename is not None]
    named = ", ".join(_shown(n) for n in names[:3]) + (" ..." if len(names) > 3 else "")
    raise ImageMetadataError(
        f"this is a VMDK descriptor file (createType {_shown(create_type)}): the disk's data "
        f"lives in the {len(names)} extent file(s) it names ({named or 'none'}), not in this file",
        hint=SINGLE_FILE_HINT,
    )


class VmdkImage(DiskImage):
    format = "vmdk"

    def __init__(self, src: RangeSource) -> None:
        super().__init__(src)
        magic = src.read(0, min(src.size, 4))
        if magic == VMDK_COWD_MAGIC:
            raise ImageMetadataError(
                "ESX sparse extents (COWD magic, vmfsSparse) are not supported: such a file "
                "is one extent or a snapshot delta of a multi-file VMFS disk",
                hint=SINGLE_FILE_HINT,
            )
        if magic != VMDK_MAGIC and is_vmdk_descriptor(src.read(0, min(src.size, 2048))):
            _refuse_descriptor_file(src)
        require(
            magic == VMDK_MAGIC,
            f"bad magic {magic!r} at offset 0: not a VMDK sparse extent (expected {VMDK_MAGIC!r})",
        )
        head = _Header.parse(self.read_exact(0, SECTOR, "the VMDK header"), "VMDK header")
        self.footer: _Span | None = None
        hdr = self._read_footer(head) if head.gd_offset == GD_AT_END else head
        self._check_header(hdr)
        self.grain_size = hdr.grain_sectors * SECTOR
        self.gt_coverage = GTES_PER_GT * self.grain_size
        self.compressed = hdr.compress_algorithm == COMPRESSION_DEFLATE
        self.zero_grains = bool(hdr.flags & FLAG_ZERO_GRAIN)
        self.virtual_size = hdr.capacity * SECTOR
        check_virtual_size(self.virtual_size)
        self.data_start = hdr.grain_offset * SECTOR
        self.gd_entries = -(-self.virtual_size // self.gt_coverage)
        require(
            self.gd_entries <= MAX_GD_ENTRIES,
            f"the grain directory would need {self.gd_entries} entries; qemu refuses more than "
            f"{MAX_GD_ENTRIES} (grainSize {hdr.grain_sectors} sectors is too small for the capacity)",
        )
        desc = self._read_descriptor(hdr)
        create_type = self._check_descriptor(desc, hdr)
        self.gd = _Span(
            "grain directory", hdr.gd_offset * SECTOR, hdr.gd_offset * SECTOR + 4 * self.gd_entries
        )
        self.spans = self._check_layout(hdr, self._descriptor_span(hdr))

        self.subformat = create_type
        self.cluster_size = self.grain_size
        self.compression = "zlib" if self.compressed else None
        self.checks = [
            "header magic, version and flags valid",
            *(
                ["newline check bytes intact (no text-mode transfer)"]
                if hdr.flags & FLAG_NL_DETECT
                else []
            ),
            *(["stream footer and end-of-stream marker valid"] if self.footer else []),
            "embedded descriptor names only this file, no parent disk",
            "grain directory inside the file, clear of the header and descriptor",
            "grain tables and grains inside the file and clear of metadata (checked as walked)",
            *(["every grain marker's LBA matches its grain"] if self.compressed else []),
        ]
        self.details = {
            "version": hdr.version,
            "create_type": create_type,
            "grain_size": self.grain_size,
            "num_gtes_per_gt": hdr.gtes_per_gt,
            "gd_offset": hdr.gd_offset * SECTOR,
            "gd_entries": self.gd_entries,
            "rgd_offset": hdr.rgd_offset * SECTOR if hdr.flags & FLAG_RGD else None,
            "grain_offset": self.data_start,
            "flags": hdr.flags,
            "flag_names": [name for bit, name in _FLAG_NAMES.items() if hdr.flags & bit],
            "compress_algorithm": "deflate (zlib)" if self.compressed else "none",
            "footer": self.footer is not None,
            "unclean_shutdown": bool(hdr.unclean_shutdown),
            "cid": desc.keys["CID"].lower(),
            "parent_cid": desc.keys["parentCID"].lower(),
        }

    # -- open-time validation ---------------------------------------------------

    def _read_footer(self, head: _Header) -> _Header:
        """A true stream's real header is the copy in its footer (as qemu reads it)."""
        size = self.file_size
        require(
            size % SECTOR == 0 and size >= SECTOR + FOOTER_BYTES,
            f"gdOffset is GD_AT_END (the grain directory follows the stream), but the "
            f"{size}-byte file cannot end in a 1536-byte footer; the stream is truncated",
        )
        start = size - FOOTER_BYTES
        data = self.read_exact(start, FOOTER_BYTES, "the stream footer")
        _, msize, mtype = _META_MARKER.unpack_from(data, 0)
        require(
            msize == 0 and mtype == MARKER_FOOTER,
            f"no footer marker at offset {start} (found size {msize}, type {mtype}; expected "
            f"size 0, type {MARKER_FOOTER}): the stream is truncated or its footer is missing",
        )
        eos = _META_MARKER.unpack_from(data, 2 * SECTOR)
        require(
            eos == (0, 0, MARKER_EOS),
            f"no end-of-stream marker at offset {start + 2 * SECTOR} (found {eos}): the stream "
            "is truncated or corrupt",
        )
        footer = _Header.parse(
            data[SECTOR : 2 * SECTOR], f"footer header at offset {start + SECTOR}"
        )
        require(
            footer.gd_offset != GD_AT_END,
            f"the footer header at offset {start + SECTOR} has gdOffset GD_AT_END too",
        )
        for name in ("capacity", "grain_sectors", "gtes_per_gt", "compress_algorithm"):
            a, b = getattr(head, name), getattr(footer, name)
            require(a == b, f"the header and the footer disagree on {name}: {a} vs {b}")
        self.footer = _Span("footer", start, size)
        return footer

    def _check_header(self, hdr: _Header) -> None:
        require(
            hdr.version in SUPPORTED_VERSIONS,
            f"unsupported VMDK version {hdr.version} (versions 1-3 are known)",
        )
        unknown = hdr.flags & ~KNOWN_FLAGS
        require(unknown == 0, f"unknown header flags {unknown:#x} (flags {hdr.flags:#x})")
        if hdr.flags & FLAG_NL_DETECT:
            require(
                hdr.check_bytes == NL_CHECK_BYTES,
                f"the newline check bytes are {hdr.check_bytes.hex(' ')}, not 0a 20 0d 0a: the "
                "file was corrupted by a text-mode (ASCII) transfer",
            )
        require(
            hdr.compress_algorithm in (COMPRESSION_NONE, COMPRESSION_DEFLATE),
            f"unknown compressAlgorithm {hdr.compress_algorithm} (only 1, deflate, is defined)",
        )
        stream_flags = hdr.flags & (FLAG_COMPRESS | FLAG_MARKER)
        if hdr.compress_algorithm == COMPRESSION_DEFLATE:
            require(
                stream_flags == FLAG_COMPRESS | FLAG_MARKER,
                f"compressAlgorithm is deflate but flags {hdr.flags:#x} lack the compressed-"
                "grain and marker bits; compressed grains without markers are not supported",
            )
        else:
            require(
                stream_flags == 0,
                f"flags {hdr.flags:#x} announce compressed grains or markers, but "
                "compressAlgorithm is 0 (none)",
            )
            require(
                self.footer is None,
                "gdOffset is GD_AT_END (a streamed footer), but the grains are not compressed",
            )
        g = hdr.grain_sectors
        require(
            0 < g <= MAX_GRAIN_SECTORS and g & (g - 1) == 0,
            f"grainSize {g} sectors is not a power of two between 1 and {MAX_GRAIN_SECTORS}",
        )
        require(
            hdr.gtes_per_gt == GTES_PER_GT,
            f"numGTEsPerGT is {hdr.gtes_per_gt}; VMware and qemu always write {GTES_PER_GT}",
        )

    def _descriptor_span(self, hdr: _Header) -> _Span:
        start = hdr.desc_offset * SECTOR
        return _Span("embedded descriptor", start, start + hdr.desc_size * SECTOR)

    def _read_descriptor(self, hdr: _Header) -> _Descriptor:
        require(hdr.desc_offset != 0 and hdr.desc_size != 0, _NO_DESCRIPTOR, hint=SINGLE_FILE_HINT)
        require(
            hdr.desc_offset == DESCRIPTOR_SECTOR,
            f"the embedded descriptor is at sector {hdr.desc_offset}, but qemu reads it from "
            f"sector {DESCRIPTOR_SECTOR}; such an image reads differently in different tools",
        )
        require(
            hdr.desc_size <= MAX_DESCRIPTOR_SECTORS,
            f"the embedded descriptor's size {hdr.desc_size} sectors is implausible "
            f"(at most {MAX_DESCRIPTOR_SECTORS})",
        )
        span = self._descriptor_span(hdr)
        raw = self.read_exact(span.start, span.end - span.start, "the embedded descriptor")
        nul = raw.find(b"\0")
        require(
            nul >= 0,
            f"the embedded descriptor fills all {hdr.desc_size} sectors without a terminating "
            "NUL; qemu would read on past it",
        )
        text = raw[:nul].decode("latin-1")
        require(bool(text.strip()), _NO_DESCRIPTOR, hint=SINGLE_FILE_HINT)
        require(
            "parentFileNameHint" not in text,
            "the embedded descriptor has a parentFileNameHint: this is a delta disk whose "
            "unallocated grains come from a parent file",
            hint=SINGLE_FILE_HINT,
        )
        return _Descriptor.parse(text)

    def _check_descriptor(self, desc: _Descriptor, hdr: _Header) -> str:
        require(
            not desc.duplicates,
            f"the embedded descriptor sets {', '.join(sorted(set(desc.duplicates)))} more than once",
        )
        if desc.malformed:
            raise ImageMetadataError(
                f"the embedded descriptor has a malformed extent line: {_shown(desc.malformed[0])}"
            )
        ct = desc.keys.get("createType")
        if ct is None:
            raise ImageMetadataError("the embedded descriptor has no createType")
        require(
            ct not in _MULTI_FILE_TYPES,
            f"createType {_shown(ct)} keeps the disk's data in other files",
            hint=SINGLE_FILE_HINT,
        )
        require(
            ct in (MONOLITHIC_SPARSE, STREAM_OPTIMIZED),
            f"unsupported createType {_shown(ct)} (only monolithicSparse and streamOptimized)",
        )
        expected = STREAM_OPTIMIZED if self.compressed else MONOLITHIC_SPARSE
        require(
            ct == expected,
            f"createType is {ct} but the header {'has' if self.compressed else 'has no'} "
            f"compressed grains, which makes it {expected}",
        )
        for key in ("CID", "parentCID"):
            value = desc.keys.get(key)
            require(
                value is not None and _HEX_ID.fullmatch(value) is not None,
                f"the embedded descriptor's {key} is {_shown(value) if value else 'missing'}, "
                "not a hexadecimal ID (qemu cannot open it either)",
            )
        parent = int(desc.keys["parentCID"], 16)
        require(
            parent == NO_PARENT,
            f"parentCID is {parent:08x}, not ffffffff: this is a delta disk linked to a parent",
            hint=SINGLE_FILE_HINT,
        )
        require(
            len(desc.extents) == 1,
            f"the embedded descriptor names {len(desc.extents)} extents; a single-file sparse "
            "disk has exactly one, itself",
            hint=SINGLE_FILE_HINT if len(desc.extents) > 1 else None,
        )
        ext = desc.extents[0]
        name = ext.filename or ""
        require(
            bool(name) and not any(c in name for c in "/\\:") and name not in (".", ".."),
            f"the extent line {_shown(ext.line)} does not name this file by a bare file name "
            "(it names another file by path, or none)",
            hint=SINGLE_FILE_HINT,
        )
        require(
            ext.kind == "SPARSE" and ext.access in ("RW", "RDONLY"),
            f"the extent line {_shown(ext.line)} is not a readable SPARSE extent (this file)",
            hint=SINGLE_FILE_HINT,
        )
        require(
            ext.sectors == hdr.capacity,
            f"the extent line says {ext.sectors} sectors but the header's capacity is "
            f"{hdr.capacity} sectors",
        )
        return ct

    def _check_layout(self, hdr: _Header, desc_span: _Span) -> list[_Span]:
        """Place the fixed metadata: inside the file, before the grains, disjoint."""
        gd_bytes = self.gd_entries * 4
        spans = [_Span("header", 0, SECTOR), desc_span, self.gd]
        if hdr.flags & FLAG_RGD:
            require(
                hdr.rgd_offset != 0,
                "rgdOffset is 0: the redundant grain directory would overlap the header",
            )
            rgd = hdr.rgd_offset * SECTOR
            spans.append(_Span("redundant grain directory", rgd, rgd + gd_bytes))
        if self.footer is not None:
            spans.append(self.footer)
        for span in spans:
            require(
                span.end <= self.file_size,
                f"the {span.name} at offset {span.start} (+{span.end - span.start} bytes) lies "
                f"beyond the end of the {self.file_size}-byte file; the image is truncated or corrupt",
            )
        for i, a in enumerate(spans):
            for b in spans[i + 1 :]:
                require(
                    not a.overlaps(b),
                    f"the {a.name} [{a.start}, {a.end}) overlaps the {b.name} [{b.start}, {b.end})",
                )
        require(
            desc_span.end <= self.data_start <= self.file_size,
            f"grainOffset {self.data_start} is not between the descriptor's end "
            f"({desc_span.end}) and the end of the {self.file_size}-byte file",
        )
        if not self.compressed:
            for span in spans[2:]:
                require(
                    span.end <= self.data_start,
                    f"the {span.name} [{span.start}, {span.end}) lies past grainOffset "
                    f"{self.data_start}, among the grains",
                )
        return spans

    # -- walking the tables -----------------------------------------------------

    def extents(self) -> Iterator[Extent]:
        return merge_extents(self._walk())

    def _walk(self) -> Iterator[Extent]:
        prev_gt_end = 0
        # Every grain needs a place of its own: grain table entries that share grains would
        # let a small file describe terabytes of data.
        room, spent = self.file_size - self.data_start, 0
        for first, entries in self._gd_slices():
            if not any(entries):
                yield self._zero_range(first, first + len(entries))
                continue
            runs = list(_gt_runs(entries))
            hints = TableHints(
                self, [(entries[i] * SECTOR, (j - i) * GT_BYTES) for i, j in runs if entries[i]]
            )
            for i, j in runs:
                if entries[i] == 0:
                    yield self._zero_range(first + i, first + j)
                    continue
                hints.reading()
                gts = [self._gt_span(first + k, entries[k], prev_gt_end) for k in range(i, j)]
                prev_gt_end = gts[-1].end
                block = self.read_exact(
                    gts[0].start,
                    gts[-1].end - gts[0].start,
                    f"grain tables {first + i}-{first + j - 1}",
                )
                for k, gt in enumerate(gts):
                    for extent in self._walk_gt(
                        first + i + k, block[k * GT_BYTES : (k + 1) * GT_BYTES], gt
                    ):
                        if extent.kind is ExtentKind.DATA:
                            spent += extent.length
                            require(
                                spent <= room,
                                f"more grains are referenced than fit in the {self.file_size}-"
                                "byte file; grain table entries must be sharing grains",
                            )
                        yield extent

    def _gd_slices(self) -> Iterator[tuple[int, Sequence[int]]]:
        for first in range(0, self.gd_entries, GD_SLICE_ENTRIES):
            n = min(GD_SLICE_ENTRIES, self.gd_entries - first)
            data = self.read_exact(
                self.gd.start + 4 * first, 4 * n, f"grain directory entries {first}-{first + n - 1}"
            )
            yield first, struct.unpack(f"<{n}I", data)

    def _zero_range(self, gd_first: int, gd_end: int) -> Extent:
        start = gd_first * self.gt_coverage
        return Extent(
            start, min(gd_end * self.gt_coverage, self.virtual_size) - start, ExtentKind.ZERO
        )

    def _gt_span(self, index: int, sector: int, prev_end: int) -> _Span:
        gt = _Span(f"grain table {index}", sector * SECTOR, sector * SECTOR + GT_BYTES)
        where = f"grain table {index} (grain directory entry {index} = sector {sector})"
        require(
            gt.end <= self.file_size,
            f"{where} at offset {gt.start} lies beyond the end of the {self.file_size}-byte "
            "file; the image is truncated or corrupt",
        )
        for span in self.spans:
            require(
                not gt.overlaps(span),
                f"{where} [{gt.start}, {gt.end}) overlaps the {span.name} [{span.start}, {span.end})",
            )
        require(
            gt.start >= prev_end,
            f"{where} at offset {gt.start} is out of order or overlaps the previous grain table "
            f"(which ends at {prev_end}); grain tables must follow one another",
        )
        if not self.compressed:
            require(
                gt.end <= self.data_start,
                f"{where} [{gt.start}, {gt.end}) lies past grainOffset {self.data_start}, among the grains",
            )
        return gt

    def _walk_gt(self, index: int, table: bytes, gt: _Span) -> Iterator[Extent]:
        base = index * self.gt_coverage
        n = min(GTES_PER_GT, -(-(self.virtual_size - base) // self.grain_size))
        used = table[: 4 * n]  # entries past the end of the disk are never read
        if used.count(0) == len(used):
            yield self._zero_range(index, index + 1)
            return
        entries = struct.unpack(f"<{n}I", used)
        if self.compressed:
            # Each grain's stream ends before the next grain or metadata in the file; that
            # bound is read with the grain, whose marker is checked then (see decompress):
            # reading markers here would cost a request per grain on remote sources.
            markers = sorted(
                gte * SECTOR
                for gte in entries
                if gte and not (gte == GTE_ZEROED and self.zero_grains)
            )
            for k, gte in enumerate(entries):
                offset = base + k * self.grain_size
                length = min(self.grain_size, self.virtual_size - offset)
                if gte == 0 or (gte == GTE_ZEROED and self.zero_grains):
                    yield Extent(offset, length, ExtentKind.ZERO)
                else:
                    yield self._compressed_grain(offset, length, gte, gt, k, markers)
            return
        # Runs of unallocated grains, and of grains that follow one another in the file,
        # each become one extent: this loop is the hot path of a large image.
        step = self.grain_size // SECTOR
        k = 0
        while k < n:
            first = entries[k]
            j = k + 1
            if first == 0 or (first == GTE_ZEROED and self.zero_grains):
                while j < n and (
                    entries[j] == 0 or (entries[j] == GTE_ZEROED and self.zero_grains)
                ):
                    j += 1
                kind = ExtentKind.ZERO
            else:
                while j < n and entries[j] == entries[j - 1] + step:
                    j += 1
                kind = ExtentKind.DATA
            start = base + k * self.grain_size
            length = min(base + j * self.grain_size, self.virtual_size) - start
            host = first * SECTOR
            if kind is ExtentKind.DATA and not (
                self.data_start <= host and host + length <= self.file_size
            ):
                raise self._bad_grains(gt, k, j, start, host, length)
            yield Extent(start, length, kind, host if kind is ExtentKind.DATA else 0)
            k = j

    def _bad_grains(
        self, gt: _Span, k: int, j: int, start: int, host: int, length: int
    ) -> ImageMetadataError:
        where = (
            f"{gt.name} entries {k}-{j - 1} (guest offset {start}) point to file offsets "
            f"[{host}, {host + length})"
        )
        if host < self.data_start:
            return ImageMetadataError(
                f"{where}, inside the metadata before grainOffset {self.data_start}"
            )
        return ImageMetadataError(
            f"{where}, beyond the end of the {self.file_size}-byte file; the image is truncated "
            "or corrupt"
        )

    def _compressed_grain(
        self, offset: int, length: int, gte: int, gt: _Span, k: int, markers: list[int]
    ) -> Extent:
        marker_at = gte * SECTOR
        where = (
            f"{gt.name} entry {k} (guest offset {offset}) points to a grain marker at {marker_at}"
        )
        require(
            marker_at >= self.data_start,
            f"{where}, inside the metadata before grainOffset {self.data_start}",
        )
        bound = min(self.file_size, marker_at + _GRAIN_MARKER.size + 2 * self.grain_size)
        later = bisect.bisect_right(markers, marker_at)
        if later < len(markers):
            bound = min(bound, markers[later])
        for span in (*self.spans, gt):
            if span.start > marker_at:
                bound = min(bound, span.start)
        grain = _Span("grain", marker_at, bound)
        require(
            grain.end > marker_at + _GRAIN_MARKER.size,
            f"{where} whose stream would run beyond the end of the {self.file_size}-byte file; "
            "the image is truncated or corrupt"
            if grain.end == self.file_size
            else f"{where} with no room for a compressed stream before offset {grain.end}, "
            "where the next grain or metadata starts",
        )
        for span in (*self.spans, gt):
            require(
                not grain.overlaps(span),
                f"{where}: the grain [{grain.start}, {grain.end}) overlaps the {span.name} "
                f"[{span.start}, {span.end})",
            )
        return Extent(
            offset,
            length,
            ExtentKind.COMPRESSED,
            marker_at + _GRAIN_MARKER.size,
            grain.end - marker_at - _GRAIN_MARKER.size,
            codec="zlib",
        )

    # -- reading ----------------------------------------------------------------

    def decompress(self, extent: Extent) -> bytes:
        marker_at = extent.host_offset - _GRAIN_MARKER.size
        data = self.read_buffer(
            marker_at,
            _GRAIN_MARKER.size + extent.host_length,
            f"compressed grain at offset {marker_at}",
        )
        lba, size = _GRAIN_MARKER.unpack_from(data)
        require(
            lba * SECTOR == extent.offset,
            f"the grain marker at offset {marker_at} is for guest sector {lba}, but the grain "
            f"table maps it to guest sector {extent.offset // SECTOR}",
        )
        require(
            0 < size <= extent.host_length,
            f"the grain marker at offset {marker_at} gives a stream of {size} bytes, but only "
            f"{extent.host_length} bytes lie before the next grain, metadata or the end of the "
            "file (a metadata marker, garbage, or a truncated image)",
        )
        stream = data[_GRAIN_MARKER.size : _GRAIN_MARKER.size + size]
        where = f"compressed grain at guest offset {extent.offset} (file offset {marker_at})"
        if extent.length == self.grain_size:
            return decompress("zlib", stream, extent.length, where)
        # The disk's partial final grain: qemu compresses only its guest part, others pad it.
        try:
            return decompress("zlib", stream, extent.length, where)
        except ImageMetadataError:
            return decompress("zlib", stream, self.grain_size, where)[: extent.length]


def open(src: RangeSource) -> VmdkImage:
    return VmdkImage(src)


def _gt_runs(entries: Sequence[int]) -> Iterator[tuple[int, int]]:
    """[i, j) runs of a GD slice: one unallocated entry, or up to GT_BATCH tables that lie
    back to back in the file (read with one request)."""
    i = 0
    while i < len(entries):
        j = i + 1
        if entries[i]:
            step = GT_BYTES // SECTOR
            while (
                j < len(entries) and j - i < GT_BATCH and entries[j] == entries[i] + (j - i) * step
            ):
                j += 1
        yield i, j
        i = j
