"""Destination disk sizing: the agent's capacity precheck against the receiver's plan, MBR
tables on disks beyond 2 TiB, and filesystems recreated on 4 KiB-sector disks."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from loopdisk import BIOS_BOOT, ESP, LINUX, SWAP, LoopDisk, LoopLab, MiB, Part, blkid, sh
from rehost.online.agent.config import parse
from rehost.online.agent.layout import discover
from rehost.online.agent.precheck import run_prechecks
from rehost.online.receiver.disks import (
    DestinationTooSmall,
    DiskPrepareFailed,
    plan_disk,
    prepare,
)

Json = dict[str, Any]
GiB = 1024 * MiB
TiB = 1024 * GiB


def part(number: int, size: int, fs: str | None, type: str = LINUX, **more: Any) -> Json:
    """A partition in discover()'s shape; `fs_id` and `used` for one with files to copy."""
    return {"number": number, "start": 2048 * number, "size": size, "type": type, "fs": fs} | more


def layout(label: str, *parts: Json) -> Json:
    """discover()'s shape for one source disk whose filesystems with an fs_id are mounted."""
    mounts = [
        {"mount": p["mount"], "fs_id": p["fs_id"], "disk": "/dev/vda", "disk_index": "0"}
        for p in parts
        if p.get("fs_id")
    ]
    return {
        "label": label,
        "disks": {"0": {"label": label, "partitions": list(parts)}},
        "mounts": mounts,
        "unsupported": [],
    }


class Receiver:
    """The hello of a receiver with one disk of `size` bytes and `sector`-byte sectors."""

    def __init__(self, size: int, sector: int) -> None:
        self.size = size
        self.sector = sector

    def hello(self) -> Json:
        disk = {"path": "/dev/x0", "size": self.size, "sector": self.sector}
        return {"protocol": 5, "disks": {"0": disk}}


def precheck_ok(src: Json, have: int, sector: int = 512) -> bool:
    config = parse({"Destination": {"Address": "h", "Token": "t", "Fingerprint": "ab" * 32}}, "/c")
    checks = run_prechecks(config, src, Receiver(have, sector), "/nonexistent")
    (capacity,) = [c for c in checks if c.name == "capacity disk 0"]
    return capacity.status == "OK"


def receiver_fits(src: Json, have: int, sector: int = 512) -> bool:
    label = src["disks"]["0"]["label"]
    try:
        plan_disk("0", src["disks"]["0"], label, have, sector)
    except DestinationTooSmall:
        return False
    return True


def smallest_fit(src: Json) -> int:
    """The least disk the receiver lays `src` out on (its DestinationTooSmall's need)."""
    with pytest.raises(DestinationTooSmall) as err:
        plan_disk("0", src["disks"]["0"], src["disks"]["0"]["label"], MiB, 512)
    return err.value.need


ROOT = {"mount": "/", "fs_id": "root"}
# A: the ESP and the unmounted partition keep their size, swap shrinks: 53.9 GiB needed.
CASE_A = layout(
    "gpt",
    part(1, 512 * MiB, "vfat", ESP),
    part(2, 20 * GiB, "ext4", used=3 * GiB, **ROOT),
    part(3, 50 * GiB, "ext4"),
    part(4, 4 * GiB, "swap", SWAP),
)
# B: 16 GiB of swap shrinks to 64 MiB.
CASE_B = layout(
    "dos",
    part(1, 20 * GiB, "ext4", "83", used=3 * GiB, **ROOT),
    part(2, 16 * GiB, "swap", "82"),
)
# C: xfs is never made smaller than 300 MiB.
CASE_C = layout("gpt", part(1, 2 * GiB, "xfs", used=10 * MiB, **ROOT))
# D: an MBR table reaches 2 TiB of a 3 TiB disk, which 2.5 TiB of data do not fit.
CASE_D = layout("dos", part(1, 3 * TiB, "ext4", "83", used=int(2.5 * TiB), **ROOT))
# E: BIOS boot, a logical swap in an extended partition.
CASE_E = layout(
    "dos",
    part(1, 10 * GiB, "xfs", "83", used=GiB, **ROOT),
    part(2, 4 * GiB, None, "5"),
    part(5, 2 * GiB, "swap", "82"),
    part(6, 1 * GiB, None, "83"),
)


@pytest.mark.parametrize(
    ("src", "have", "fits"),
    [
        (CASE_A, 10 * GiB, False),
        (CASE_A, 54 * GiB, True),
        (CASE_B, 8 * GiB, True),
        (CASE_C, 200 * MiB, False),
        (CASE_C, 303 * MiB, True),
        (CASE_D, 3 * TiB, False),
        (CASE_E, 3 * TiB, True),
    ],
    ids=["A-10G", "A-54G", "B-8G", "C-200M", "C-303M", "D-3T", "E-3T"],
)
def test_precheck_says_ok_exactly_when_the_receiver_fits(src: Json, have: int, fits: bool) -> None:
    assert receiver_fits(src, have) is fits
    assert precheck_ok(src, have) is fits


def test_the_receiver_says_how_far_its_mbr_reaches() -> None:
    """With 4 KiB sectors an MBR table spans 16 TiB: D then fits on 3 TiB, and the
    precheck knows, from the sector size in the receiver's hello."""
    assert receiver_fits(CASE_D, 3 * TiB, 4096) and precheck_ok(CASE_D, 3 * TiB, 4096)


@pytest.mark.parametrize("src", [CASE_A, CASE_B, CASE_C, CASE_E], ids=list("ABCE"))
def test_precheck_and_receiver_share_the_boundary(src: Json) -> None:
    need = smallest_fit(src)
    for have, fits in ((need - 1, False), (need, True), (need + 4095, True)):
        assert (receiver_fits(src, have), precheck_ok(src, have)) == (fits, fits), have


DISCOVERED = [
    Part(1, BIOS_BOOT),
    Part(120, LINUX, "ext4", "/", "root", fill_mib=20),
    Part(40, SWAP, "swap"),
    Part(None, LINUX, "ext4"),  # not mounted: recreated empty at its size
]


def test_precheck_agrees_on_a_discovered_layout(lab: LoopLab, tmp_path: Path) -> None:
    system = lab.disk("src0", 260, "gpt", DISCOVERED)
    lab.mount_tree(tmp_path / "R", [(system, DISCOVERED)])
    src = discover(str(tmp_path / "R"))
    need = smallest_fit(src)
    assert 1 + 64 + 40 + 97 < need // MiB < 260  # BIOS boot and the unmounted one kept
    for have in (need - MiB, need - 1, need, 260 * MiB):
        assert precheck_ok(src, have) is receiver_fits(src, have) is (have >= need), have


def table(dev: str) -> Json:
    out: Json = json.loads(sh("sfdisk", "--json", dev))["partitiontable"]
    return out


def test_mbr_on_a_disk_beyond_2_tib(
    lab: LoopLab, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = layout(
        "dos",
        part(1, 512 * MiB, "ext4", "83", used=20 * MiB, mount="/boot", fs_id="boot"),
        part(2, 20 * GiB, "ext4", "83", used=GiB, **ROOT),
    )
    src["disks"]["0"]["label_id"] = "0x1234abcd"
    big = lab.disk("big", 3 * TiB // MiB)
    with caplog.at_level(logging.INFO, "rehost.receiver"):
        result = prepare(src, {"0": big.dev}, tmp_path / "state")
    assert "an MBR table reaches" in caplog.text
    assert sorted(result["filesystems"]) == ["boot", "root"]
    got = table(big.dev)
    assert got["label"] == "dos" and got["id"] == "0x1234abcd"
    end = max(p["start"] + p["size"] for p in got["partitions"])
    assert 2 * TiB - 2 * MiB <= end * 512 <= (2**32 - 1) * 512  # grown to the MBR's reach


def test_no_disk_is_touched_when_one_cannot_be_prepared(lab: LoopLab, tmp_path: Path) -> None:
    good = {"label": "gpt", "partitions": [part(1, 32 * MiB, "ext4", used=MiB, **ROOT)]}
    disk0, disk1 = lab.disk("d0", 64), lab.disk("d1", 64)
    for bad, error in (
        ({"label": "gpt", "partitions": [part(1, 200 * MiB, None)]}, DestinationTooSmall),
        (
            {"label": "gpt", "partitions": [part(1, 8 * MiB, None, "no-such-type")]},
            DiskPrepareFailed,
        ),
    ):
        src = {"label": "gpt", "disks": {"0": good, "1": bad}}
        with pytest.raises(error):
            prepare(src, {"0": disk0.dev, "1": disk1.dev}, tmp_path / "state")
        assert blkid(disk0.dev, "PTTYPE") == "" and blkid(disk1.dev, "PTTYPE") == ""


def sector_4k_disk(lab: LoopLab, name: str, size_mib: int) -> LoopDisk:
    """A loop disk with 4 KiB logical sectors, detached by lab.close()."""
    image = lab.directory / f"{name}.img"
    with open(image, "wb") as f:
        f.truncate(size_mib * MiB)
    dev = sh("losetup", "-b", "4096", "-fP", "--show", image).strip()
    lab.loops.append(dev)
    return LoopDisk(image, dev)


def test_the_hello_gives_each_disk_its_sector_size(lab: LoopLab, tmp_path: Path) -> None:
    from rehost.online.receiver.server import Receiver as Real

    big, small = sector_4k_disk(lab, "s4k", 64), lab.disk("s512", 64)
    disks = Real("t" * 16, tmp_path, {"0": big.dev, "1": small.dev}, None).disk_info()
    assert (disks["0"]["sector"], disks["1"]["sector"]) == (4096, 512)
    assert disks["0"]["size"] == disks["1"]["size"] == 64 * MiB


def test_small_blocks_on_4k_sectors(lab: LoopLab, tmp_path: Path) -> None:
    src = layout(
        "gpt",
        # a FAT16 ESP too small for mkfs.fat's default clusters on 4 KiB sectors
        part(1, 32 * MiB, "vfat", ESP, uuid="ABCD-1234", options={"fat": "16"}),
        part(
            2,
            64 * MiB,
            "ext4",
            used=MiB,
            mount="/boot",
            fs_id="boot",
            uuid="0b0b0b0b-1111-4222-8333-444444444444",
            options={"block_size": 1024},
        ),
        part(3, 400 * MiB, "xfs", used=MiB, **ROOT),
    )
    dest = sector_4k_disk(lab, "dst4k", 600)
    assert (
        Path(f"/sys/class/block/{Path(dest.dev).name}/queue/logical_block_size").read_text()
        == "4096\n"
    )
    result = prepare(src, {"0": dest.dev}, tmp_path / "state")
    assert sorted(result["filesystems"]) == ["boot", "root"]
    boot = result["filesystems"]["boot"]["device"]
    assert blkid(boot, "UUID") == "0b0b0b0b-1111-4222-8333-444444444444"
    assert "Block size:               4096" in sh("dumpe2fs", "-h", boot)
    esp = f"{dest.dev}p1"
    assert (blkid(esp, "TYPE"), blkid(esp, "VERSION"), blkid(esp, "UUID")) == (
        "vfat",
        "FAT16",
        "ABCD-1234",
    )
