"""qcow2 images: versions 2 and 3, zlib/zstd compression, extended L2, internal snapshots.

Why our own reader: no library reads qcow2 safely while streaming from a
RangeSource. qemu-img needs a local file, follows backing files and external
data files, and quietly reads zeros wherever a table or cluster lies past the
end of the file: it converts an image truncated in half, or one whose L1 table
points past EOF, with exit status 0. Here every header field, table and entry
is checked before it is used, and anything doubtful is refused.

Format quirks:
- A compressed cluster's descriptor splits at x = 62 - (cluster_bits - 8): the
  low x bits are an unaligned byte offset, the rest count extra 512-byte
  sectors. That length includes slack and may run past EOF for the last
  stream in the file; decompression stops after one cluster. The stream is raw
  deflate (no zlib header), or a zstd frame when compression_type is 1. With
  extended L2 the layout is the same and the bitmap must be 0.
- The last guest cluster may be partial; qemu pads a compressed one to a whole
  cluster before compressing, so it still decodes to exactly one cluster.
- The v3 zero flag (bit 0) may carry a preallocated host offset that is never
  read. Version 2 has no zero flag.
- Extended L2 entries are 128 bits: the descriptor, then 32 allocation bits and
  32 zero bits, one per subcluster. With no backing file, unallocated reads as
  zero.
- Refcounts are not needed to read, so a dirty image (lazy refcounts) is fine.
  An image qemu marked corrupt is refused: qemu reads it only to salvage data.
- Only the active L1 table is converted; internal snapshots are validated but
  otherwise ignored.

Bounds: the L1 table is read in 512 KiB slices as the walk advances and each L2
table is read once (the walk is linear, so no cache is needed). Every L2 table
and data byte must have its own place in the file, so the walk is at most
file_size / 8 entries however the tables alias one another. Overlap checks
cover the header cluster, the L1, refcount and snapshot tables, every refcount
block and the L2 table being walked; a data cluster inside some other L2
table, or two data clusters sharing a host cluster, is not detected (qemu-img
check finds those through the refcounts, which reading does not need).
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from collections.abc import Iterator
from itertools import compress, pairwise
from typing import NamedTuple

from rehost.blob.source import RangeSource
from rehost.errors import ENCRYPTED_HINT, SINGLE_FILE_HINT, ImageMetadataError
from rehost.image.base import (
    DiskImage,
    Extent,
    ExtentKind,
    TableHints,
    check_virtual_size,
    merge_extents,
    printable,
    require,
)
from rehost.image.codecs import decompress
from rehost.image.signatures import QCOW2_MAGIC

_HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # the 72 bytes common to v2 and v3
_HEADER_V3 = struct.Struct(">QQQII")  # features, refcount_order, header_length at 72
_EXT_HEADER = struct.Struct(">II")
_SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")  # 40 bytes
_FEATURE_ENTRY = 48

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21  # qemu's limit: 2 MiB
MIN_EXTL2_CLUSTER_BITS = 14  # subclusters must be at least 512 bytes
MAX_L1_BYTES = 32 << 20  # qemu's QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 << 20  # qemu's QCOW_MAX_REFTABLE_SIZE
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_TABLE = 1024 * MAX_SNAPSHOTS
MAX_SNAPSHOT_EXTRA = 1024
MAX_BACKING_NAME = 1023
MAX_EXTENSIONS = 64  # qemu defines 5 types; each may appear once
L1_SLICE_ENTRIES = 65536  # 512 KiB of L1 read at a time
SNAPSHOT_NAMES_SHOWN = 16

EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441
_EXT_NAMES = {
    EXT_BACKING_FORMAT: "backing file format",
    EXT_FEATURE_NAMES: "feature name table",
    EXT_BITMAPS: "bitmaps",
    EXT_CRYPTO: "full disk encryption header",
    EXT_DATA_FILE: "external data file name",
}

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
_FEATURE_NAMES = {
    0: {0: "dirty", 1: "corrupt", 2: "external data file", 3: "compression type", 4: "extended L2"},
    1: {0: "lazy refcounts"},
    2: {0: "bitmaps", 1: "raw external data"},
}
_KNOWN_INCOMPAT = (1 << len(_FEATURE_NAMES[0])) - 1

CRYPT_METHODS = {1: "AES", 2: "LUKS"}
COMPRESSION_TYPES = {0: ("zlib", "deflate"), 1: ("zstd", "zstd")}

OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # bits 9-55 of L1, L2 and refcount table entries
L1_RESERVED = 0x7F00_0000_0000_01FF
L2_COPIED = 1 << 63
L2_COMPRESSED = 1 << 62
L2_ZERO = 1
L2_STD_RESERVED = 0x3F00_0000_0000_01FE
L2_EXT_RESERVED = L2_STD_RESERVED | L2_ZERO  # extended L2 keeps zero status in the bitmap
SUBCLUSTERS = 32
ALL_ALLOCATED = (1 << SUBCLUSTERS) - 1
MAX_HOST_OFFSET = 1 << 56
COMPRESSED_SECTOR = 512
SECTOR = 512
_LANE_MAX = (1 << 64) - 1


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def _feature_list(bits: int, kind: int, names: dict[tuple[int, int], str]) -> list[str]:
    out = []
    for bit in range(64):
        if bits >> bit & 1:
            name = _FEATURE_NAMES[kind].get(bit) or names.get((kind, bit))
            out.append(name if name else f"bit {bit}")
    return out


class _Region(NamedTuple):
    start: int
    end: int
    name: str


def _overlap(start: int, end: int, regions: list[_Region]) -> _Region | None:
    for r in regions:
        if start < r.end and r.start < end:
            return r
    return None


class Qcow2Image(DiskImage):
    format = "qcow2"

    def __init__(self, src: RangeSource) -> None:
        super().__init__(src)
        self._feature_names: dict[tuple[int, int], str] = {}
        self._extension_types: set[int] = set()
        self._parse_header()

    # -- open: header, extensions, features, tables ---------------------------

    def _parse_header(self) -> None:
        require(
            self.file_size >= _HEADER_V2.size,
            f"the file is {self.file_size} bytes, shorter than the {_HEADER_V2.size}-byte "
            "qcow2 header; it is truncated",
        )
        (
            magic,
            version,
            backing_offset,
            backing_size,
            cluster_bits,
            size,
            crypt_method,
            l1_size,
            l1_offset,
            rt_offset,
            rt_clusters,
            nb_snapshots,
            snapshots_offset,
        ) = _HEADER_V2.unpack(self.read_exact(0, _HEADER_V2.size, "qcow2 header"))
        require(magic == QCOW2_MAGIC, f"bad qcow2 magic {magic!r}")
        require(
            version != 1,
            "qcow version 1 is not supported",
            hint="convert it to qcow2 first: `qemu-img convert -O qcow2 old.qcow new.qcow2`",
        )
        require(version in (2, 3), f"unsupported qcow2 version {version} (only 2 and 3 exist)")
        require(
            MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS,
            f"cluster_bits {cluster_bits} is outside {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS} "
            "(512 bytes to 2 MiB)",
        )
        cs = 1 << cluster_bits
        self.cluster_size = cs
        self._version = version

        incompat = compat = autoclear = compression_type = 0
        refcount_order, header_length = 4, _HEADER_V2.size
        if version == 3:
            require(
                self.file_size >= _HEADER_V2.size + _HEADER_V3.size,
                f"the file is {self.file_size} bytes, shorter than the 104-byte qcow2 v3 "
                "header; it is truncated",
            )
            incompat, compat, autoclear, refcount_order, header_length = _HEADER_V3.unpack(
                self.read_exact(_HEADER_V2.size, _HEADER_V3.size, "qcow2 v3 header")
            )
            require(
                header_length >= 104 and header_length % 8 == 0,
                f"v3 header_length {header_length} is invalid (it must be at least 104 and a "
                "multiple of 8)",
            )
            require(
                header_length <= cs,
                f"v3 header_length {header_length} exceeds the {cs}-byte cluster",
            )
            if header_length > 104:
                compression_type = self.read_exact(104, 1, "qcow2 v3 header")[0]
        require(refcount_order <= 6, f"refcount_order {refcount_order} exceeds 6 (64 bits)")

        require(
            backing_offset == 0,
            f"the image has a backing file{self._backing_name(backing_offset, backing_size)}",
            hint=SINGLE_FILE_HINT,
        )
        extensions = self._read_extensions(header_length)
        self._check_features(incompat, autoclear)
        require(
            crypt_method == 0,
            f"the image is encrypted ({CRYPT_METHODS.get(crypt_method, 'unknown')} "
            f"encryption, crypt_method {crypt_method})",
            hint=ENCRYPTED_HINT,
        )
        require(
            compression_type in COMPRESSION_TYPES,
            f"unknown compression_type {compression_type}",
        )
        require(
            (compression_type != 0) == bool(incompat & INCOMPAT_COMPRESSION),
            f"compression_type {compression_type} disagrees with the compression-type "
            f"incompatible feature bit ({'set' if incompat & INCOMPAT_COMPRESSION else 'clear'})",
        )
        extended_l2 = bool(incompat & INCOMPAT_EXTL2)
        require(
            not extended_l2 or cluster_bits >= MIN_EXTL2_CLUSTER_BITS,
            f"extended L2 entries need clusters of at least 16 KiB; cluster_bits is {cluster_bits}",
        )

        # qemu's block layer sees whole sectors, so it floors the size (but sizes the L1
        # table from the header's).
        self.virtual_size = size // SECTOR * SECTOR
        check_virtual_size(self.virtual_size)
        self._extended_l2 = extended_l2
        self._entry_bytes = width = 16 if extended_l2 else 8
        self._l2_entries = cs // width
        self._l2_coverage = cs * self._l2_entries
        self._l1_needed = -(-size // self._l2_coverage)
        self._l2_struct = struct.Struct(f">{cs // 8}Q")
        # Masks over a whole L2 table read as one integer, for _reads_as_zero.
        self._zero_flags = ones = int.from_bytes(
            (1).to_bytes(width, "big") * self._l2_entries, "big"
        )
        self._copied_flags = ones * L2_COPIED
        if extended_l2:  # a plain descriptor, and no subcluster allocated
            slow = L2_COMPRESSED | L2_EXT_RESERVED | (cs - 1)
            self._not_zero = ones * ((slow << 64) | ALL_ALLOCATED)
        else:  # no compressed, reserved or misaligned bits
            self._not_zero = ones * ((L2_COMPRESSED | L2_STD_RESERVED | (cs - 1)) & ~L2_ZERO)
        name, codec = COMPRESSION_TYPES[compression_type]
        self.compression = name
        self._codec = codec
        self._csize_shift = 62 - (cluster_bits - 8)

        self._check_l1(l1_offset, l1_size)
        self._regions = [_Region(0, cs, "header cluster")]
        self._regions.append(
            _Region(l1_offset, l1_offset + _round_up(l1_size * 8, cs), "active L1 table")
        )
        self._refblocks = self._check_reftable(rt_offset, rt_clusters)
        snapshot_names = self._check_snapshots(snapshots_offset, nb_snapshots)

        self.subformat = "v2 (compat=0.10)" if version == 2 else "v3 (compat=1.1)"
        self.checks = [
            f"qcow2 version {version}, cluster size {cs} bytes",
            "no backing file",
            "no external data file",
            "not encrypted",
            "no unknown incompatible features, image not marked corrupt",
            "header extensions bounded and inside the header cluster",
            "L1 table consistent with the virtual size, aligned and inside the file",
            "refcount table and blocks aligned and inside the file",
            "header, L1, refcount and snapshot tables do not overlap",
            f"snapshot table valid ({nb_snapshots} snapshots)",
            "L2 tables and clusters validated as they are walked",
        ]
        names = self._feature_names
        self.details = {
            "version": version,
            "compat": "0.10" if version == 2 else "1.1",
            "cluster_bits": cluster_bits,
            "refcount_bits": 1 << refcount_order,
            "l1_size": l1_size,
            "l1_table_offset": l1_offset,
            "refcount_table_offset": rt_offset,
            "refcount_table_clusters": rt_clusters,
            "refcount_blocks": len(self._refblocks),
            "header_length": header_length,
            "header_extensions": extensions,
            "incompatible_features": _feature_list(incompat, 0, names),
            "compatible_features": _feature_list(compat, 1, names),
            "autoclear_features": _feature_list(autoclear, 2, names),
            "compression_type": name,
            "extended_l2": extended_l2,
            "lazy_refcounts": bool(compat & COMPAT_LAZY_REFCOUNTS),
            "dirty": bool(incompat & INCOMPAT_DIRTY),
            "snapshots": nb_snapshots,
            "snapshot_names": snapshot_names,
        }
        if EXT_BITMAPS in self._extension_types:
            self.details["bitmaps_consistent"] = bool(autoclear & AUTOCLEAR_BITMAPS)

    def _backing_name(self, offset: int, size: int) -> str:
        """The backing file's name for the refusal message, when it is readable."""
        if 0 < size <= MAX_BACKING_NAME and offset + size <= min(self.cluster_size, self.file_size):
            name = self.src.read(offset, size).decode("utf-8", "replace")
            return f" {name!r}"
        return f" (name at offset {offset}, {size} bytes)"

    def _read_extensions(self, start: int) -> list[str]:
        """Walk the header extensions, bounded by the header cluster; return their names."""
        cs = self.cluster_size
        found: list[str] = []
        off = start
        while off < cs:  # off stays a multiple of 8, so a whole extension header fits
            ext_type, length = _EXT_HEADER.unpack(
                self.read_exact(off, _EXT_HEADER.size, "header extension")
            )
            # Even the end marker's length is bounded: qemu refuses the image otherwise.
            require(
                length <= cs - off - _EXT_HEADER.size,
                f"header extension {ext_type:#x} at offset {off} claims {length} bytes, "
                "more than is left of the header cluster",
            )
            if ext_type == EXT_END:
                break
            require(
                len(found) < MAX_EXTENSIONS,
                f"more than {MAX_EXTENSIONS} header extensions; the header is implausible",
            )
            known = _EXT_NAMES.get(ext_type)
            if known:
                require(
                    ext_type not in self._extension_types,
                    f"the {known} header extension appears twice",
                )
                self._extension_types.add(ext_type)
            found.append(known or f"unknown {ext_type:#x}")
            data_at = off + _EXT_HEADER.size
            if ext_type == EXT_DATA_FILE:
                name = self.read_exact(data_at, min(length, MAX_BACKING_NAME), "data file name")
                raise ImageMetadataError(
                    f"the image keeps its data in an external data file "
                    f"{name.decode('utf-8', 'replace')!r}",
                    hint=SINGLE_FILE_HINT,
                )
            if ext_type == EXT_FEATURE_NAMES:
                table = self.read_exact(data_at, length, "feature name table")
                for pos in range(0, length - _FEATURE_ENTRY + 1, _FEATURE_ENTRY):
                    kind, bit = table[pos], table[pos + 1]
                    text = table[pos + 2 : pos + _FEATURE_ENTRY].split(b"\0", 1)[0]
                    self._feature_names[(kind, bit)] = printable(text.decode("utf-8", "replace"))
            else:
                self.read_exact(data_at, length, f"{known or 'unknown'} header extension")
            off = data_at + _round_up(length, 8)
        return found

    def _check_features(self, incompat: int, autoclear: int) -> None:
        unknown = incompat & ~_KNOWN_INCOMPAT
        require(
            unknown == 0,
            "unknown incompatible features: "
            + ", ".join(_feature_list(unknown, 0, self._feature_names)),
            hint="the image was written by a newer qemu; convert it with that version to a "
            "plain qcow2 (e.g. `qemu-img convert -O qcow2 -o compat=1.1 SRC flat.qcow2`)",
        )
        require(
            not incompat & INCOMPAT_CORRUPT,
            "qemu marked the image corrupt (incompatible feature bit 1): its metadata is "
            "inconsistent",
            hint="repair it with `qemu-img check -r all IMAGE`, or salvage the data with "
            "`qemu-img convert`, and upload the result",
        )
        require(
            not incompat & INCOMPAT_DATA_FILE,
            "the image keeps its data in an external data file (incompatible feature bit 2)",
            hint=SINGLE_FILE_HINT,
        )
        require(
            not autoclear & AUTOCLEAR_DATA_FILE_RAW,
            "autoclear feature bit 1 (raw external data) is set but the image has no external "
            "data file; qemu refuses such an image",
        )

    def _check_table(self, what: str, offset: int, length: int) -> None:
        cs = self.cluster_size
        require(
            offset % cs == 0,
            f"{what} offset {offset} is not aligned to the {cs}-byte cluster",
        )
        require(offset >= cs, f"{what} at offset {offset} overlaps the header cluster")
        require(
            offset + length <= self.file_size,
            f"{what} at offset {offset} (+{length} bytes) lies beyond the end of the "
            f"{self.file_size}-byte file; the image is truncated or corrupt",
        )

    def _check_l1(self, offset: int, size: int) -> None:
        require(
            self._l1_needed <= MAX_L1_BYTES // 8,
            f"the virtual size {self.virtual_size} needs {self._l1_needed} L1 entries with "
            f"{self.cluster_size}-byte clusters, more than qemu's limit of {MAX_L1_BYTES // 8}",
        )
        require(
            size <= MAX_L1_BYTES // 8,
            f"l1_size {size} exceeds qemu's limit of {MAX_L1_BYTES // 8} entries",
        )
        require(
            size >= self._l1_needed,
            f"l1_size {size} is too small for the virtual size {self.virtual_size} "
            f"({self._l1_needed} entries needed)",
        )
        self._check_table("active L1 table", offset, size * 8)
        self._l1_offset = offset

    def _check_reftable(self, offset: int, clusters: int) -> list[int]:
        """Validate the refcount table; return its refcount blocks' offsets, sorted."""
        cs = self.cluster_size
        require(clusters > 0, "the refcount table is empty (refcount_table_clusters is 0)")
        require(
            clusters * cs <= MAX_REFTABLE_BYTES,
            f"refcount_table_clusters {clusters} exceeds qemu's 8 MiB refcount table limit",
        )
        self._check_table("refcount table", offset, clusters * cs)
        region = _Region(offset, offset + clusters * cs, "refcount table")
        hit = _overlap(region.start, region.end, self._regions)
        require(hit is None, f"the refcount table overlaps the {hit and hit.name}")
        self._regions.append(region)

        raw = self.read_exact(offset, clusters * cs, "refcount table")
        blocks: list[int] = []
        for index, (block,) in enumerate(struct.iter_unpack(">Q", raw)):
            if block == 0:
                continue
            what = f"refcount block at offset {block} (refcount table entry {index})"
            require(block % cs == 0, f"{what} is not aligned to the {cs}-byte cluster")
            require(block >= cs, f"{what} overlaps the header cluster")
            require(
                block + cs <= self.file_size,
                f"{what} lies beyond the end of the {self.file_size}-byte file; the image is "
                "truncated or corrupt",
            )
            hit = _overlap(block, block + cs, self._regions)
            require(hit is None, f"{what} overlaps the {hit and hit.name}")
            blocks.append(block)
            require(
                len(blocks) <= self.file_size // cs,
                "the refcount table lists more refcount blocks than the file has clusters",
            )
        blocks.sort()
        for a, b in pairwise(blocks):
            require(a != b, f"refcount block at offset {a} is listed twice")
        return blocks

    def _check_snapshots(self, offset: int, count: int) -> list[str]:
        """Validate the snapshot table and each snapshot's L1 table; return some names."""
        require(
            count <= MAX_SNAPSHOTS,
            f"nb_snapshots {count} exceeds qemu's limit of {MAX_SNAPSHOTS}",
        )
        if count == 0:
            return []
        self._check_table("snapshot table", offset, _SNAPSHOT_HEADER.size)
        names: list[str] = []
        l1_tables: list[tuple[int, int, int]] = []
        pos = offset
        for i in range(count):
            pos = _round_up(pos, 8)
            header = self.read_exact(pos, _SNAPSHOT_HEADER.size, f"snapshot table entry {i}")
            l1_offset, l1_size, id_len, name_len, *_, extra = _SNAPSHOT_HEADER.unpack(header)
            require(
                extra <= MAX_SNAPSHOT_EXTRA,
                f"snapshot table entry {i} has {extra} bytes of extra data (limit "
                f"{MAX_SNAPSHOT_EXTRA})",
            )
            pos += _SNAPSHOT_HEADER.size
            variable = self.read_exact(pos, extra + id_len + name_len, f"snapshot table entry {i}")
            pos += len(variable)
            require(
                pos - offset <= MAX_SNAPSHOT_TABLE,
                f"the snapshot table exceeds {MAX_SNAPSHOT_TABLE} bytes at entry {i}",
            )
            if len(names) < SNAPSHOT_NAMES_SHOWN:
                names.append(printable(variable[extra + id_len :].decode("utf-8", "replace")))
            l1_tables.append((i, l1_offset, l1_size))
        table = _Region(offset, _round_up(pos, self.cluster_size), "snapshot table")
        hit = self.metadata_hit(table.start, table.end)
        require(hit is None, f"the snapshot table overlaps the {hit}")
        self._regions.append(table)
        for i, l1_offset, l1_size in l1_tables:
            require(
                l1_size <= MAX_L1_BYTES // 8,
                f"snapshot {i}'s l1_size {l1_size} exceeds qemu's limit of "
                f"{MAX_L1_BYTES // 8} entries",
            )
            if l1_size:
                self._check_table(f"snapshot {i}'s L1 table", l1_offset, l1_size * 8)
                hit = self.metadata_hit(l1_offset, l1_offset + l1_size * 8)
                require(hit is None, f"snapshot {i}'s L1 table overlaps the {hit}")
        return names

    # -- the walk --------------------------------------------------------------

    def extents(self) -> Iterator[Extent]:
        return merge_extents(self._walk())

    def _walk(self) -> Iterator[Extent]:
        cov, size = self._l2_coverage, self.virtual_size
        needed = -(-size // cov)
        budget = _Budget(self.file_size, self.cluster_size)
        for first in range(0, needed, L1_SLICE_ENTRIES):
            n = min(L1_SLICE_ENTRIES, needed - first)
            raw = self.read_exact(self._l1_offset + first * 8, n * 8, "active L1 table")
            entries = struct.unpack(f">{n}Q", raw)
            # Only the non-zero entries are visited, found at C speed: the slice may hold
            # 65535 zeros around one table, and the L1 table 4M entries.
            used = list(compress(range(n), entries))
            tables = (entries[j] & OFFSET_MASK for j in used)
            hints = TableHints(self, [(t, self.cluster_size) for t in tables if t])
            done = first  # the L1 entries before this index are yielded
            for j in used:
                index, entry = first + j, entries[j]
                l2_offset = entry & OFFSET_MASK
                require(
                    not entry & L1_RESERVED,
                    f"L1 entry {index} ({entry:#x}) has reserved bits set",
                )
                if l2_offset == 0:
                    continue  # the copied flag alone: unallocated
                if index > done:
                    yield Extent(done * cov, (index - done) * cov, ExtentKind.ZERO)
                hints.reading()
                yield from self._l2_extents(index, l2_offset, index * cov, budget)
                done = index + 1
            end = min((first + n) * cov, size)
            if end > done * cov:
                yield Extent(done * cov, end - done * cov, ExtentKind.ZERO)

    def _l2_extents(self, index: int, l2_offset: int, base: int, budget: _Budget) -> list[Extent]:
        cs = self.cluster_size
        what = f"L2 table at offset {l2_offset} (L1 entry {index})"
        require(l2_offset % cs == 0, f"{what} is not aligned to the {cs}-byte cluster")
        require(
            l2_offset + cs <= self.file_size,
            f"{what} lies beyond the end of the {self.file_size}-byte file; the image is "
            "truncated or corrupt",
        )
        hit = self.metadata_hit(l2_offset, l2_offset + cs)
        require(hit is None, f"{what} overlaps the {hit}")
        budget.l2_table()
        table = self.read_exact(l2_offset, cs, what)
        count = min(self._l2_entries, -(-(self.virtual_size - base) // cs))
        limit = min(base + count * cs, self.virtual_size)
        runs = _Runs(self, _Region(l2_offset, l2_offset + cs, what), limit, budget)
        if self._reads_as_zero(table, count):
            runs.zero(base, count * cs)
        elif self._extended_l2:
            self._extended_entries(self._l2_struct.unpack(table), count, base, runs)
        else:
            self._standard_entries(self._l2_struct.unpack(table), count, base, runs)
        runs.flush()
        return runs.out

    def _reads_as_zero(self, table: bytes, count: int) -> bool:
        """Whether a table's first `count` entries are all valid and all read as zeros.

        Why: zero entries need no host cluster, so the budget does not bound them, and a
        128 MiB file holds 16M of them: judged one by one in Python, that took 15 s. Read
        as one integer, a table is judged by a few masks at C speed (each mask repeats one
        entry's bits, so it fits a table of any `count`). On False the entry-by-entry walk
        judges the table again and names the entry at fault.
        """
        value = int.from_bytes(table[: count * self._entry_bytes], "big")
        if value & self._not_zero:
            return False
        if self._extended_l2:
            return True
        flagged = value & self._zero_flags
        if flagged and self._version < 3:
            return False
        # An entry without the zero flag must have no host offset (the copied flag aside);
        # flagged * _LANE_MAX sets every bit of each entry with the flag.
        return not value & ~(self._copied_flags | flagged * _LANE_MAX)

    def _contiguous(self, descriptors: tuple[int, ...], slow: int) -> bool:
        """Whether a table's descriptors map its clusters to one host-contiguous run."""
        cs, first = self.cluster_size, descriptors[0]
        last = first + (len(descriptors) - 1) * cs
        return (
            not first & slow
            and not last & slow
            and bool(first & OFFSET_MASK)
            and descriptors == tuple(range(first, last + 1, cs))
        )

    def _standard_entries(
        self, entries: tuple[int, ...], count: int, base: int, runs: _Runs
    ) -> None:
        cs = self.cluster_size
        # Anything but a plain aligned offset: compressed, zero flag, reserved or misaligned.
        slow = L2_COMPRESSED | L2_STD_RESERVED | (cs - 1)
        used = entries[:count]
        if self._contiguous(used, slow):
            runs.data(base, used[0] & OFFSET_MASK, count * cs)
            return
        for i in range(count):
            entry = used[i]
            if entry & slow:
                self._special_standard(entry, base + i * cs, runs)
                continue
            host = entry & OFFSET_MASK
            if host:
                runs.data(base + i * cs, host, cs)
            else:
                runs.zero(base + i * cs, cs)

    def _special_standard(self, entry: int, guest: int, runs: _Runs) -> None:
        if entry & L2_COMPRESSED:
            runs.compressed(self._compressed(entry, guest))
            return
        require(
            not entry & L2_STD_RESERVED,
            f"L2 entry for guest offset {guest} ({entry:#x}) has reserved bits set",
        )
        host = entry & OFFSET_MASK
        require(
            host % self.cluster_size == 0,
            f"cluster for guest offset {guest} at host offset {host} is not aligned",
        )
        require(
            self._version >= 3,
            f"L2 entry for guest offset {guest} has the zero flag, which version 2 lacks",
        )
        runs.zero(guest, self.cluster_size)  # any host offset is preallocation, never read

    def _extended_entries(
        self, entries: tuple[int, ...], count: int, base: int, runs: _Runs
    ) -> None:
        cs = self.cluster_size
        slow = L2_COMPRESSED | L2_EXT_RESERVED | (cs - 1)
        descriptors, bitmaps = entries[0 : 2 * count : 2], entries[1 : 2 * count : 2]
        if bitmaps.count(ALL_ALLOCATED) == count and self._contiguous(descriptors, slow):
            runs.data(base, descriptors[0] & OFFSET_MASK, count * cs)
            return
        for i in range(count):
            entry, bitmap, guest = descriptors[i], bitmaps[i], base + i * cs
            if entry & slow:
                if entry & L2_COMPRESSED:
                    require(
                        bitmap == 0,
                        f"compressed cluster for guest offset {guest} has a non-zero "
                        f"subcluster bitmap {bitmap:#x}",
                    )
                    runs.compressed(self._compressed(entry, guest))
                    continue
                require(
                    not entry & L2_EXT_RESERVED,
                    f"L2 entry for guest offset {guest} ({entry:#x}) has reserved bits set",
                )
                raise ImageMetadataError(
                    f"cluster for guest offset {guest} at host offset "
                    f"{entry & OFFSET_MASK} is not aligned"
                )
            host = entry & OFFSET_MASK
            if host and bitmap == ALL_ALLOCATED:
                runs.data(guest, host, cs)
            elif bitmap == 0:
                runs.zero(guest, cs)
            else:
                self._subclusters(host, bitmap, guest, runs)

    def _subclusters(self, host: int, bitmap: int, guest: int, runs: _Runs) -> None:
        allocated, zero = bitmap & ALL_ALLOCATED, bitmap >> SUBCLUSTERS
        require(
            not allocated & zero,
            f"L2 entry for guest offset {guest}: subclusters {allocated & zero:#x} are marked "
            "both allocated and zero",
        )
        require(
            host != 0 or allocated == 0,
            f"L2 entry for guest offset {guest} marks subclusters allocated but has no host offset",
        )
        if not allocated:
            runs.zero(guest, self.cluster_size)
            return
        sub = self.cluster_size // SUBCLUSTERS
        for s in range(SUBCLUSTERS):
            at = s * sub
            if allocated >> s & 1:
                runs.data(guest + at, host + at, sub)
            else:
                runs.zero(guest + at, sub)  # zero, or unallocated with no backing file

    def _compressed(self, entry: int, guest: int) -> Extent:
        what = f"compressed cluster for guest offset {guest}"
        require(not entry & L2_COPIED, f"{what} has the copied flag set")
        descriptor = entry & (L2_COMPRESSED - 1)
        shift = self._csize_shift
        host = descriptor & ((1 << shift) - 1)
        sectors = (descriptor >> shift) + 1
        stored = sectors * COMPRESSED_SECTOR - host % COMPRESSED_SECTOR
        require(host < MAX_HOST_OFFSET, f"{what} has host offset {host} beyond 2^56")
        require(
            host < self.file_size,
            f"{what} at host offset {host} lies beyond the end of the {self.file_size}-byte "
            "file; the image is truncated or corrupt",
        )
        hit = self.metadata_hit(host, host + stored)
        require(hit is None, f"{what} at host offset {host} (+{stored} bytes) overlaps the {hit}")
        # The sector count rounds up, so the last stream in the file may claim bytes past EOF.
        return Extent(
            guest,
            min(self.cluster_size, self.virtual_size - guest),
            ExtentKind.COMPRESSED,
            host,
            min(stored, self.file_size - host),
            self._codec,
        )

    def metadata_hit(self, start: int, end: int) -> str | None:
        """Name the fixed table or refcount block that [start, end) overlaps, if any."""
        hit = _overlap(start, end, self._regions)
        if hit:
            return hit.name
        blocks = self._refblocks
        i = bisect_right(blocks, end - 1) - 1
        if i >= 0 and blocks[i] + self.cluster_size > start:
            return f"refcount block at offset {blocks[i]}"
        return None

    def decompress(self, extent: Extent) -> bytes:
        where = f"compressed cluster for guest offset {extent.offset} at host offset " + str(
            extent.host_offset
        )
        data = self.read_buffer(extent.host_offset, extent.host_length, where)
        out = decompress(extent.codec, data, self.cluster_size, where)
        return out[: extent.length] if extent.length < len(out) else out


class _Budget:
    """Bounds the walk by the file size: every L2 table and data byte needs its own place.

    Without it, L1 entries sharing one L2 table, or L2 entries sharing host
    clusters or compressed streams, would let a small file describe terabytes of work.
    """

    __slots__ = ("cluster_size", "data_bytes", "file_size", "l2_tables")

    def __init__(self, file_size: int, cluster_size: int) -> None:
        self.file_size = file_size
        self.cluster_size = cluster_size
        self.l2_tables = 0
        self.data_bytes = 0

    def l2_table(self) -> None:
        self.l2_tables += 1
        require(
            self.l2_tables * self.cluster_size <= self.file_size,
            f"more L2 tables are referenced than fit in the {self.file_size}-byte file; "
            "L1 entries must be sharing L2 tables",
        )

    def data(self, n: int) -> None:
        self.data_bytes += n
        require(
            self.data_bytes <= self.file_size,
            f"more data is referenced than fits in the {self.file_size}-byte file; "
            "L2 entries must be sharing host clusters",
        )


class _Runs:
    """Coalesces one L2 table's clusters into extents, validating each DATA run once."""

    __slots__ = ("budget", "host", "image", "kind", "l2", "length", "limit", "out", "start")

    def __init__(self, image: Qcow2Image, l2: _Region, limit: int, budget: _Budget) -> None:
        self.image = image
        self.l2 = l2
        self.limit = limit
        """The guest end of this table's clusters: the last one may pass the virtual size."""
        self.budget = budget
        self.out: list[Extent] = []
        self.kind: ExtentKind | None = None
        self.start = self.host = self.length = 0

    def zero(self, guest: int, n: int) -> None:
        if self.kind is ExtentKind.ZERO:
            self.length += n
            return
        self.flush()
        self.kind, self.start, self.length = ExtentKind.ZERO, guest, n

    def data(self, guest: int, host: int, n: int) -> None:
        if self.kind is ExtentKind.DATA and self.host + self.length == host:
            self.length += n
            return
        self.flush()
        self.kind, self.start, self.host, self.length = ExtentKind.DATA, guest, host, n

    def compressed(self, extent: Extent) -> None:
        self.flush()
        # Streams are packed at byte offsets, so one may claim up to a sector's slack
        # that the next one starts in; the rest of it is its own.
        self.budget.data(max(1, extent.host_length - (COMPRESSED_SECTOR - 1)))
        self.out.append(extent)

    def flush(self) -> None:
        kind, self.kind = self.kind, None
        length = min(self.length, self.limit - self.start)
        if kind is None or length <= 0:
            return
        if kind is ExtentKind.DATA:
            self._check_data(length)
            self.out.append(Extent(self.start, length, ExtentKind.DATA, self.host))
        else:
            self.out.append(Extent(self.start, length, ExtentKind.ZERO))

    def _check_data(self, length: int) -> None:
        image, host, end = self.image, self.host, self.host + length
        if end > image.file_size:
            guest = self.start + max(0, image.file_size - host)
            raise ImageMetadataError(
                f"data for guest offset {guest} lies beyond the end of the {image.file_size}-byte "
                "file; the image is truncated or corrupt"
            )
        hit = image.metadata_hit(host, end)
        if not hit and host < self.l2.end and self.l2.start < end:
            hit = self.l2.name
        if hit:
            raise ImageMetadataError(
                f"data for guest offsets {self.start}..{self.start + length} "
                f"(host offsets {host}..{end}) overlaps the {hit}"
            )
        self.budget.data(length)


def open(src: RangeSource) -> Qcow2Image:
    return Qcow2Image(src)
