"""VHDX (Hyper-V) images: fixed and dynamic; differencing disks are refused.

Why our own reader: no library reads VHDX safely from a streamed `RangeSource`;
qemu-img needs a local file and, opened read-only as `qemu-img convert` does, refuses
an image whose log needs replaying. This reader validates every structure before use,
replays the log in memory, and walks the block allocation table (BAT) lazily in
bounded slices.

Format notes (MS-VHDX, and qemu 7.2's block/vhdx.c where they differ):
- Two 4 KiB headers at 64 and 128 KiB (CRC-32C, checksum field zeroed): the valid one
  with the higher sequence number is current; equal sequence numbers are accepted only
  for identical headers (Disk2vhd writes those). Two region tables at 192 and 256 KiB
  (CRC-32C over 64 KiB) locate the BAT and metadata regions; qemu reads only the first,
  we also require the second to be valid and identical.
- The BAT interleaves one sector-bitmap entry after every `chunk_ratio` payload
  entries, chunk_ratio = 2^23 * logical_sector_size / block_size. Sector bitmaps only
  matter to differencing disks and are ignored, as qemu does (qemu 7.2's own BAT
  update bug can leave junk in them).
- Payload states NOT_PRESENT, UNDEFINED, ZERO, UNMAPPED (and 0.95's UNMAPPED, 5) read
  as zeros, FULLY_PRESENT as data, exactly as qemu; PARTIALLY_PRESENT is only valid in
  a differencing disk and is refused. qemu-img's fixed images are not all
  FULLY_PRESENT: blocks it never wrote stay in the ZERO state.
- qemu tolerates a last payload block that is only partly inside the file (it once
  wrote such files), so only the guest-visible part must be present.
- Logical sectors of 4096 bytes are supported per the spec; qemu 7.2 refuses them.
- The log: a non-zero LogGuid means the image was not closed cleanly and the active
  log sequence (MS-VHDX 2.3.3: the complete run of valid entries with the highest
  sequence number, replayed from its head's tail) must be applied before anything
  else is read. We replay it into an in-memory overlay of 4 KiB file sectors instead
  of writing the file; a log with no valid entry for the current LogGuid has nothing
  to replay (qemu agrees). qemu-img itself refuses such an image read-only; its
  `check -r all` replays it in place, the same way for well-formed logs. We differ
  where the log is damaged: an incomplete newest sequence (its tail entry missing),
  which qemu would replay regardless, is refused. Log writes beyond the end of the
  file or onto the headers or the log itself are refused, as is a log larger than
  `MAX_LOG`.
- Payload blocks overlapping one another are refused (qemu does not check): a small
  file cannot expand into terabytes of repeated data, and the walk is bounded by the
  data. The check costs one byte per MiB of file.
"""

from __future__ import annotations

import bisect
import itertools
import struct
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import google_crc32c

from rehost.blob.source import RangeSource
from rehost.errors import SINGLE_FILE_HINT
from rehost.image.base import (
    DiskImage,
    Extent,
    ExtentKind,
    check_virtual_size,
    merge_extents,
    printable,
    require,
)
from rehost.image.signatures import VHDX_FILE_ID

KiB = 1 << 10
MiB = 1 << 20
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
HEADER_SIZE = 4 * KiB
REGION_TABLE_OFFSETS = (192 * KiB, 256 * KiB)
REGION_TABLE_SIZE = 64 * KiB
HEADER_SECTION = 1 * MiB
METADATA_TABLE_SIZE = 64 * KiB
MAX_ENTRIES = 2047
MIN_BLOCK = 1 * MiB
MAX_BLOCK = 256 * MiB
LOG_SECTOR = 4 * KiB
MAX_LOG = 32 * MiB
"""The largest log replayed: it is read whole into memory."""
MAX_OVERLAY_SECTORS = 16 * KiB
"""Distinct 4 KiB sectors the replayed log may override (64 MiB of overlay)."""
BAT_SLICE_ENTRIES = 128 * KiB  # 1 MiB of BAT per read
FILE_OFFSET_MASK = 0xFFFFFFFFFFF00000

BAT_GUID = uuid.UUID("2dc27766-f623-4200-9d64-115e9bfd4a08").bytes_le
METADATA_GUID = uuid.UUID("8b7ca206-4790-4b9a-b8fe-575f050f886e").bytes_le
FILE_PARAMETERS = uuid.UUID("caa16737-fa36-4d43-b3b6-33f0aa44e76b").bytes_le
VIRTUAL_DISK_SIZE = uuid.UUID("2fa54224-cd1b-4876-b211-5dbed83bf4b8").bytes_le
PAGE83_DATA = uuid.UUID("beca12ab-b2e6-4523-93ef-c309e000c746").bytes_le
LOGICAL_SECTOR_SIZE = uuid.UUID("8141bf1d-a96f-4709-ba47-f233a8faab5f").bytes_le
PHYSICAL_SECTOR_SIZE = uuid.UUID("cda348c7-445d-4471-9cc9-e9885251c556").bytes_le
PARENT_LOCATOR = uuid.UUID("a8d35f2d-b30b-454d-abf7-d3d84834ab0c").bytes_le
_REQUIRED_ITEMS = {
    FILE_PARAMETERS: ("file parameters", 8),
    VIRTUAL_DISK_SIZE: ("virtual disk size", 8),
    PAGE83_DATA: ("page 83 data", 16),
    LOGICAL_SECTOR_SIZE: ("logical sector size", 4),
    PHYSICAL_SECTOR_SIZE: ("physical sector size", 4),
}

# NOT_PRESENT, UNDEFINED, ZERO, UNMAPPED (1.0) and UNMAPPED (0.95) all read as zeros.
PAYLOAD_ZERO_STATES = frozenset({0, 1, 2, 3, 5})
PAYLOAD_FULLY_PRESENT = 6
_READS_NONZERO = bytes(b & 7 not in PAYLOAD_ZERO_STATES for b in range(256))
"""Maps an entry's low byte to 1 unless its state reads as zeros: tests a slice at C speed."""
PAYLOAD_PARTIALLY_PRESENT = 7

_HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")
_REGION_HEADER = struct.Struct("<4sIII")
_REGION_ENTRY = struct.Struct("<16sQII")
_METADATA_HEADER = struct.Struct("<8sHH20x")
_METADATA_ENTRY = struct.Struct("<16sIII4x")
_LOG_HEADER = struct.Struct("<4sIIIQII16sQQ")
_LOG_DESCRIPTOR = struct.Struct("<4s4s8sQQ")
_LOG_DATA = struct.Struct("<4sI4084sI")
_ZERO_SECTOR = bytes(LOG_SECTOR)
_NO_GUID = bytes(16)


def crc32c_valid(data: bytes, checksum_at: int) -> bool:
    """CRC-32C of `data` with its checksum field taken as zero, against the stored value."""
    stored = int.from_bytes(data[checksum_at : checksum_at + 4], "little")
    crc = google_crc32c.value(data[:checksum_at])
    crc = google_crc32c.extend(crc, bytes(4))
    return int(google_crc32c.extend(crc, data[checksum_at + 4 :])) == stored


@dataclass(frozen=True)
class _Header:
    index: int
    raw: bytes
    sequence: int
    log_guid: bytes
    log_version: int
    version: int
    log_length: int
    log_offset: int


@dataclass(frozen=True)
class _Region:
    start: int
    end: int
    name: str


@dataclass(frozen=True)
class _LogWrite:
    file_offset: int
    sectors: int
    data_at: int
    """Log offset of the data sector, or -1 for a zero descriptor."""
    leading: bytes = b""
    trailing: bytes = b""


@dataclass(frozen=True)
class _LogEntry:
    position: int
    length: int
    tail: int
    sequence: int
    flushed_file_offset: int
    writes: tuple[_LogWrite, ...]


class VhdxImage(DiskImage):
    format = "vhdx"

    def __init__(self, src: RangeSource) -> None:
        super().__init__(src)
        self._overlay: dict[int, bytes] = {}
        self._overlay_keys: list[int] = []
        self._regions: list[_Region] = [_Region(0, HEADER_SECTION, "header section")]
        self.block_size = 0
        self.logical_sector_size = 0
        self.chunk_ratio = 0
        self.bat_offset = 0
        self.data_blocks = 0
        self.bat_entries = 0

        require(
            self.file_size >= HEADER_SECTION,
            f"the {self.file_size}-byte file is smaller than the 1 MiB VHDX header section; "
            "it is truncated",
        )
        ident = self.read_exact(0, 520, "VHDX file identifier")
        require(ident[:8] == VHDX_FILE_ID, "no VHDX file identifier (vhdxfile) at offset 0")
        creator = ident[8:].decode("utf-16-le", "replace").split("\0")[0].strip()
        self.details["creator"] = printable(creator)
        header = self._current_header()
        self._open_log(header)
        bat, metadata = self._open_region_tables()
        self._open_metadata(metadata)
        self._open_bat(bat)

    # -- headers and log -----------------------------------------------------------

    def _current_header(self) -> _Header:
        valid: list[_Header] = []
        problems: list[str] = []
        for index, offset in enumerate(HEADER_OFFSETS, 1):
            raw = self.read_exact(offset, HEADER_SIZE, f"VHDX header {index}")
            fields = _HEADER.unpack_from(raw)
            if fields[0] != b"head":
                problems.append(f"header {index} at offset {offset} has no signature")
            elif not crc32c_valid(raw, 4):
                problems.append(f"header {index} at offset {offset} has a bad CRC-32C")
            elif fields[7] != 1:
                problems.append(f"header {index} at offset {offset} has version {fields[7]}")
            else:
                valid.append(_Header(index, raw, fields[2], *fields[5:]))
        require(bool(valid), f"no valid VHDX header: {'; '.join(problems)}")
        if len(valid) == 2 and valid[0].sequence == valid[1].sequence:
            require(
                valid[0].raw == valid[1].raw,
                f"both VHDX headers have sequence number {valid[0].sequence} but differ; "
                "the current one cannot be chosen",
            )
        header = max(valid, key=lambda h: h.sequence)
        self.checks.append(f"header CRC-32C valid (header {header.index} is current)")
        if problems:
            self.details["header_problems"] = problems
        self.details.update({"current_header": header.index, "header_sequence": header.sequence})
        return header

    def _open_log(self, header: _Header) -> None:
        offset, length = header.log_offset, header.log_length
        require(header.log_version == 0, f"unsupported VHDX log version {header.log_version}")
        require(
            offset >= HEADER_SECTION and offset % MiB == 0 and length % MiB == 0,
            f"the VHDX log at offset {offset} ({length} bytes) is not 1 MiB aligned or lies in "
            "the header section",
        )
        if length:
            self._claim(offset, length, "log")
        self.details.update({"log_offset": offset, "log_length": length})
        if header.log_guid == _NO_GUID or length == 0:
            self.details["log"] = "empty"
            self.checks.append("log empty (image closed cleanly)")
            return
        require(
            length <= MAX_LOG,
            f"the VHDX log is not empty and is {length} bytes, more than the "
            f"{MAX_LOG >> 20} MiB rehost replays in memory",
            hint="open the image once with Hyper-V, or run `qemu-img check -r all` on it",
        )
        require(
            offset + length <= self.file_size,
            f"the VHDX log at offset {offset} ({length} bytes) extends past the end of the "
            f"{self.file_size}-byte file; the image is truncated",
        )
        log = self.read_exact(offset, length, "VHDX log")
        sequence = _LogScan(log, header.log_guid).active_sequence()
        if not sequence:
            self.details["log"] = "log GUID set but no valid entries: nothing to replay"
            self.checks.append("log holds no valid entries (nothing to replay)")
            return
        self._replay(log, sequence, offset, length)
        self.details["log"] = (
            f"replayed in memory: {len(sequence)} entries, sequence numbers "
            f"{sequence[0].sequence}-{sequence[-1].sequence}, {len(self._overlay)} sectors"
        )
        self.checks.append("log replayed in memory (the image was not closed cleanly)")

    def _replay(self, log: bytes, sequence: list[_LogEntry], log_at: int, log_len: int) -> None:
        overlay: dict[int, bytes] = {}
        for entry in sequence:
            require(
                entry.flushed_file_offset <= self.file_size,
                f"VHDX log entry {entry.sequence} was written when the file had at least "
                f"{entry.flushed_file_offset} bytes, but it has {self.file_size}; the image is "
                "truncated",
            )
            for w in entry.writes:
                end = w.file_offset + w.sectors * LOG_SECTOR
                where = f"VHDX log entry {entry.sequence} writes [{w.file_offset}, {end}),"
                require(
                    w.file_offset >= REGION_TABLE_OFFSETS[0],
                    f"{where} over the file identifier or the headers",
                )
                require(end <= log_at or w.file_offset >= log_at + log_len, f"{where} in the log")
                require(
                    end <= self.file_size,
                    f"{where} past the end of the {self.file_size}-byte file",
                )
                require(
                    len(overlay) + w.sectors <= MAX_OVERLAY_SECTORS,
                    f"the VHDX log rewrites more than {MAX_OVERLAY_SECTORS} sectors, more "
                    "than rehost replays in memory",
                    hint="open the image once with Hyper-V, or run `qemu-img check -r all` on it",
                )
                if w.data_at < 0:
                    for i in range(w.sectors):
                        overlay[w.file_offset + i * LOG_SECTOR] = _ZERO_SECTOR
                else:
                    middle = log[w.data_at + 8 : w.data_at + LOG_SECTOR - 4]
                    overlay[w.file_offset] = w.leading + middle + w.trailing
        self._overlay = overlay
        self._overlay_keys = sorted(overlay)

    def read_parts(self, extent: Extent) -> Sequence[bytes | memoryview]:
        # Replayed sectors patch what the file holds, so reads go through read_buffer.
        return [self.read(extent)] if self._overlay_keys else super().read_parts(extent)

    def read_buffer(self, offset: int, length: int, what: str) -> bytes | memoryview:
        data = super().read_buffer(offset, length, what)
        if not self._overlay_keys:
            return data
        keys = self._overlay_keys
        i = bisect.bisect_left(keys, offset - LOG_SECTOR + 1)
        end = offset + length
        if i == len(keys) or keys[i] >= end:
            return data
        buf = bytearray(data)
        while i < len(keys) and keys[i] < end:
            sector = self._overlay[keys[i]]
            lo, hi = max(keys[i], offset), min(keys[i] + LOG_SECTOR, end)
            buf[lo - offset : hi - offset] = sector[lo - keys[i] : hi - keys[i]]
            i += 1
        return bytes(buf)

    # -- regions and metadata ------------------------------------------------------

    def _claim(self, start: int, length: int, name: str) -> None:
        """Register a file range, refusing it if it overlaps one already registered."""
        end = start + length
        for r in self._regions:
            require(
                end <= r.start or start >= r.end,
                f"the VHDX {name} [{start}, {end}) overlaps the {r.name} [{r.start}, {r.end})",
            )
        self._regions.append(_Region(start, end, name))

    def _open_region_tables(self) -> tuple[tuple[int, int], tuple[int, int]]:
        tables: list[bytes] = []
        for index, offset in enumerate(REGION_TABLE_OFFSETS, 1):
            raw = self.read_exact(offset, REGION_TABLE_SIZE, f"VHDX region table {index}")
            signature, _crc, count, _reserved = _REGION_HEADER.unpack_from(raw)
            require(
                signature == b"regi",
                f"VHDX region table {index} at offset {offset} has no signature",
            )
            require(
                crc32c_valid(raw, 4),
                f"VHDX region table {index} at offset {offset} has a bad CRC-32C; the image is "
                "damaged",
            )
            require(
                count <= MAX_ENTRIES,
                f"VHDX region table {index} claims {count} entries (at most {MAX_ENTRIES})",
            )
            tables.append(raw[: _REGION_HEADER.size + count * _REGION_ENTRY.size])
        # Compared without their checksums, which also cover the reserved space.
        require(tables[0][8:] == tables[1][8:], "the two VHDX region tables differ")
        self.checks.append("region tables CRC-32C valid, both copies identical")

        found: dict[bytes, tuple[int, int]] = {}
        names = {BAT_GUID: "BAT region", METADATA_GUID: "metadata region"}
        other: list[str] = []
        for i in range(_REGION_HEADER.size, len(tables[0]), _REGION_ENTRY.size):
            guid, offset, length, flags = _REGION_ENTRY.unpack_from(tables[0], i)
            name = names.get(guid, f"region {uuid.UUID(bytes_le=guid)}")
            require(
                offset % MiB == 0 and length % MiB == 0 and length > 0,
                f"the VHDX {name} at offset {offset} ({length} bytes) is not 1 MiB aligned",
            )
            self._claim(offset, length, name)
            if guid in names:
                require(guid not in found, f"the VHDX region table lists the {name} twice")
                require(
                    offset + length <= self.file_size,
                    f"the VHDX {name} [{offset}, {offset + length}) extends past the end of the "
                    f"{self.file_size}-byte file; the image is truncated",
                )
                found[guid] = (offset, length)
            else:
                require(
                    not flags & 1,
                    f"the VHDX {name} is marked required but is unknown to rehost",
                )
                other.append(name)
        for guid, name in names.items():
            require(guid in found, f"the VHDX region table has no {name}")
        self.checks.append("regions 1 MiB aligned, inside the file, not overlapping")
        if other:
            self.details["optional_regions"] = other
        return found[BAT_GUID], found[METADATA_GUID]

    def _open_metadata(self, region: tuple[int, int]) -> None:
        base, region_len = region
        table = self.read_exact(base, METADATA_TABLE_SIZE, "VHDX metadata table")
        signature, _reserved, count = _METADATA_HEADER.unpack_from(table)
        require(signature == b"metadata", f"no VHDX metadata table signature at offset {base}")
        require(count <= MAX_ENTRIES, f"the VHDX metadata table claims {count} entries")
        items: dict[bytes, bytes] = {}
        spans: list[tuple[int, int]] = []
        for i in range(count):
            guid, offset, length, flags = _METADATA_ENTRY.unpack_from(
                table, _METADATA_HEADER.size + i * _METADATA_ENTRY.size
            )
            name = _REQUIRED_ITEMS.get(guid, (f"item {uuid.UUID(bytes_le=guid)}", 0))[0]
            require(guid not in items, f"the VHDX metadata table lists the {name} twice")
            require(
                guid != PARENT_LOCATOR,
                "the VHDX metadata has a parent locator: this is a differencing disk",
                hint=SINGLE_FILE_HINT,
            )
            if length:
                require(
                    offset >= METADATA_TABLE_SIZE
                    and length <= MiB
                    and offset + length <= region_len,
                    f"the VHDX metadata {name} at region offset {offset} ({length} bytes) lies "
                    "outside the metadata region or over its table",
                )
                spans.append((offset, offset + length))
            if guid in _REQUIRED_ITEMS:
                size = _REQUIRED_ITEMS[guid][1]
                require(
                    length == size,
                    f"the VHDX metadata {name} is {length} bytes, not {size}",
                )
                items[guid] = self.read_exact(base + offset, length, f"VHDX metadata {name}")
            else:
                require(
                    not flags & 4,
                    f"the VHDX metadata {name} is marked required but is unknown to rehost",
                )
                items[guid] = b""
        spans.sort()
        for (_, prev_end), (start, _) in itertools.pairwise(spans):
            require(
                start >= prev_end,
                f"VHDX metadata items overlap at region offset {start}",
            )
        for guid, (name, _size) in _REQUIRED_ITEMS.items():
            require(guid in items, f"the VHDX metadata has no {name}")

        block_size, flags = struct.unpack("<II", items[FILE_PARAMETERS])
        (virtual_size,) = struct.unpack("<Q", items[VIRTUAL_DISK_SIZE])
        (logical,) = struct.unpack("<I", items[LOGICAL_SECTOR_SIZE])
        (physical,) = struct.unpack("<I", items[PHYSICAL_SECTOR_SIZE])
        require(
            not flags & 2,
            "the VHDX file parameters say it has a parent: this is a differencing disk",
            hint=SINGLE_FILE_HINT,
        )
        self.checks.append("no parent disk (not a differencing VHDX)")
        require(
            block_size & (block_size - 1) == 0 and MIN_BLOCK <= block_size <= MAX_BLOCK,
            f"the VHDX block size {block_size} is not a power of two between 1 and 256 MiB",
        )
        require(
            logical in (512, 4096), f"the VHDX logical sector size {logical} is not 512 or 4096"
        )
        require(
            physical in (512, 4096), f"the VHDX physical sector size {physical} is not 512 or 4096"
        )
        check_virtual_size(virtual_size)
        require(
            virtual_size % logical == 0,
            f"the VHDX virtual size {virtual_size} is not a multiple of its {logical}-byte "
            "logical sector",
        )
        self.checks.append("metadata complete and consistent")
        self.virtual_size = virtual_size
        self.block_size = self.cluster_size = block_size
        self.logical_sector_size = logical
        self.chunk_ratio = (1 << 23) * logical // block_size
        self.subformat = "fixed" if flags & 1 else "dynamic"
        self.details.update(
            {
                "block_size": block_size,
                "logical_sector_size": logical,
                "physical_sector_size": physical,
                "leave_blocks_allocated": bool(flags & 1),
                "chunk_ratio": self.chunk_ratio,
                "page83": str(uuid.UUID(bytes_le=items[PAGE83_DATA])),
            }
        )

    def _open_bat(self, region: tuple[int, int]) -> None:
        offset, length = region
        self.data_blocks = -(-self.virtual_size // self.block_size)
        self.bat_entries = self.data_blocks + (self.data_blocks - 1) // self.chunk_ratio
        require(
            self.bat_entries * 8 <= length,
            f"the VHDX BAT region ({length} bytes) is too small for the {self.bat_entries} "
            f"entries a {self.virtual_size}-byte disk with {self.block_size}-byte blocks needs",
        )
        self.bat_offset = offset
        self.details.update({"bat_offset": offset, "bat_entries": self.bat_entries})

    # -- walking -------------------------------------------------------------------

    def extents(self) -> Iterator[Extent]:
        return merge_extents(self._walk_bat())

    def _blocks(self, first: int, stop: int) -> tuple[int, int]:
        """The guest range of the payload entries among BAT entries [first, stop)."""
        period = self.chunk_ratio + 1
        start = min((first - first // period) * self.block_size, self.virtual_size)
        return start, min((stop - stop // period) * self.block_size, self.virtual_size)

    def _walk_bat(self) -> Iterator[Extent]:
        used = bytearray(-(-self.file_size // MiB))  # one byte per MiB of file: blocks seen
        for first in range(0, self.bat_entries, BAT_SLICE_ENTRIES):
            raw = self.read_exact(
                self.bat_offset + first * 8,
                min(BAT_SLICE_ENTRIES, self.bat_entries - first) * 8,
                "VHDX BAT",
            )
            # Runs of blocks that read as zeros are found at C speed.
            flags = raw[::8].translate(_READS_NONZERO)
            at = 0
            while at < len(flags):
                hit = flags.find(1, at)
                run_end = len(flags) if hit < 0 else hit
                start, stop = self._blocks(first + at, first + run_end)
                yield Extent(start, stop - start, ExtentKind.ZERO)
                if hit < 0:
                    break
                j = first + hit
                if j % (self.chunk_ratio + 1) != self.chunk_ratio:  # else a sector bitmap entry
                    entry = struct.unpack_from("<Q", raw, hit * 8)[0]
                    yield self._payload(j - j // (self.chunk_ratio + 1), entry, used)
                at = hit + 1

    def _payload(self, index: int, entry: int, used: bytearray) -> Extent:
        offset = index * self.block_size
        length = min(self.block_size, self.virtual_size - offset)
        state = entry & 7
        require(
            state != PAYLOAD_PARTIALLY_PRESENT,
            f"VHDX block {index} is PARTIALLY_PRESENT, which only a differencing disk may use",
            hint=SINGLE_FILE_HINT,
        )
        require(state == PAYLOAD_FULLY_PRESENT, f"VHDX block {index} has invalid state {state}")
        host = entry & FILE_OFFSET_MASK
        require(
            host + length <= self.file_size,
            f"VHDX block {index} at file offset {host} (+{length} bytes) lies past the end of "
            f"the {self.file_size}-byte file; the image is truncated",
        )
        end = host + self.block_size
        for r in self._regions:
            require(
                end <= r.start or host >= r.end,
                f"VHDX block {index} at file offset {host} overlaps the {r.name} "
                f"[{r.start}, {r.end})",
            )
        lo, hi = host // MiB, min(end // MiB, len(used))
        require(
            used.find(1, lo, hi) < 0,
            f"VHDX block {index} at file offset {host} overlaps another payload block",
        )
        used[lo:hi] = b"\x01" * (hi - lo)
        return Extent(offset, length, ExtentKind.DATA, host)


class _LogScan:
    """Finds the active sequence of a log read whole into memory (MS-VHDX 2.3.3)."""

    CRC_BUDGET = 16
    """Log lengths' worth of entries checksummed at most: a log crafted with an entry
    header at every sector, each claiming the whole log, would otherwise cost
    (log length / 4 KiB) checksums of the whole log."""

    def __init__(self, log: bytes, guid: bytes) -> None:
        self.log = log
        self.guid = guid
        self.budget = self.CRC_BUDGET * len(log)

    def wrapped(self, position: int, length: int) -> bytes:
        """`length` bytes of the circular log from `position`."""
        end = position + length
        if end <= len(self.log):
            return self.log[position:end]
        return self.log[position:] + self.log[: end - len(self.log)]

    def entry(self, position: int) -> _LogEntry | None:
        """The valid entry at `position`, or None; refuses an authentic but malformed one."""
        size = len(self.log)
        (
            signature,
            _checksum,
            length,
            tail,
            sequence,
            count,
            _reserved,
            guid,
            flushed,
            _last_file_offset,
        ) = _LOG_HEADER.unpack_from(self.wrapped(position, _LOG_HEADER.size))
        descriptor_sectors = -(-(_LOG_HEADER.size + count * _LOG_DESCRIPTOR.size) // LOG_SECTOR)
        if (
            signature != b"loge"
            or guid != self.guid
            or sequence == 0
            or length == 0
            or length % LOG_SECTOR
            or length > size
            or descriptor_sectors * LOG_SECTOR > length
        ):
            return None
        self.budget -= length
        require(
            self.budget >= 0,
            "the VHDX log holds too many overlapping entry headers to search; it is corrupt",
        )
        data = self.wrapped(position, length)
        if not crc32c_valid(data, 4):
            return None

        where = f"VHDX log entry {sequence} at log offset {position}"
        require(tail % LOG_SECTOR == 0 and tail < size, f"{where} has an invalid tail {tail}")
        writes: list[_LogWrite] = []
        data_sector = descriptor_sectors
        for i in range(count):
            kind, trailing, leading, file_offset, desc_seq = _LOG_DESCRIPTOR.unpack_from(
                data, _LOG_HEADER.size + i * _LOG_DESCRIPTOR.size
            )
            require(
                desc_seq == sequence and file_offset % LOG_SECTOR == 0,
                f"{where}: descriptor {i} has sequence number {desc_seq} or unaligned offset "
                f"{file_offset}",
            )
            if kind == b"zero":
                zero_length = int.from_bytes(leading, "little")
                require(
                    zero_length % LOG_SECTOR == 0,
                    f"{where}: zero descriptor {i} has unaligned length {zero_length}",
                )
                writes.append(_LogWrite(file_offset, zero_length // LOG_SECTOR, -1))
                continue
            require(kind == b"desc", f"{where}: descriptor {i} has unknown signature {kind!r}")
            require(
                (data_sector + 1) * LOG_SECTOR <= length,
                f"{where}: data descriptor {i} has no data sector",
            )
            at = (position + data_sector * LOG_SECTOR) % size
            sig, high, _middle, low = _LOG_DATA.unpack_from(self.log, at)
            require(
                sig == b"data" and (high << 32 | low) == sequence,
                f"{where}: the data sector of descriptor {i} is not signed for this entry",
            )
            writes.append(_LogWrite(file_offset, 1, at, leading, trailing))
            data_sector += 1
        return _LogEntry(position, length, tail, sequence, flushed, tuple(writes))

    def active_sequence(self) -> list[_LogEntry]:
        """The entries to replay, oldest first; empty if there are none.

        A run of valid entries with consecutive sequence numbers is complete when it
        holds the entry its head names as the tail; the complete run with the highest
        head sequence number is replayed from that tail. A newer run that is incomplete
        means entries that were never flushed are lost: refused rather than guessed
        around (qemu ignores tails and would replay it).
        """
        size = len(self.log)
        best: list[_LogEntry] = []
        newest_incomplete = 0
        position = 0
        while position < size:
            entry = self.entry(position)
            if entry is None:
                position += LOG_SECTOR
                continue
            run, covered = [entry], entry.length
            while covered < size:
                following = self.entry((position + covered) % size)
                if following is None or following.sequence != run[-1].sequence + 1:
                    break
                run.append(following)
                covered += following.length
            if covered > size:  # the last entry ran into the first one
                covered -= run.pop().length
            head = run[-1].sequence
            starts = [e.position for e in run]
            if run[-1].tail not in starts:
                newest_incomplete = max(newest_incomplete, head)
            else:
                if best:
                    require(
                        head != best[-1].sequence,
                        f"the VHDX log has two sequences ending at sequence number {head}; "
                        "the image is corrupt",
                    )
                if not best or head > best[-1].sequence:
                    best = run[starts.index(run[-1].tail) :]
            if position + covered >= size:
                break  # the run wrapped around: everything after it was scanned
            position += covered
        require(
            newest_incomplete <= (best[-1].sequence if best else 0),
            f"the VHDX log's newest entries (up to sequence number {newest_incomplete}) are "
            "incomplete: the entry their tail names is missing; the image is corrupt",
        )
        return best


def open(src: RangeSource) -> VhdxImage:
    return VhdxImage(src)
