"""The receiver's fixup plan, built from the agent's layout and prepare's result."""

from __future__ import annotations

from pathlib import Path

from rehost.online.fixup import SWAP, FsIds, FsMap
from rehost.online.receiver.fixup_hook import plan_from_prepare

ROOT_U, BOOT_U, SWAP_U, DATA_U, ESP_U = "r-uuid", "b-uuid", "s-uuid", "d-uuid", "E5P0-0001"


def _layout(esp: bool) -> dict[str, object]:
    system = [
        {"number": 1, "type": "21686148-6449-6E6F-744E-656564454649", "fs": None},
        {"number": 2, "type": "0FC63DAF-8483-4772-8E79-3D69D8477DE4", "fs": "ext4",
         "uuid": BOOT_U, "label": "boot", "partuuid": "p2", "fs_id": "boot", "mount": "/boot"},
        {"number": 3, "type": "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F", "fs": "swap",
         "uuid": SWAP_U, "label": "swap0", "partuuid": "p3", "fs_id": None, "mount": None},
        {"number": 4, "type": "0FC63DAF-8483-4772-8E79-3D69D8477DE4", "fs": "xfs",
         "uuid": ROOT_U, "label": "rootfs", "partuuid": "p4", "fs_id": "root", "mount": "/"},
    ]  # fmt: skip
    if esp:
        system[0] = {"number": 1, "type": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "fs": "vfat",
                     "uuid": ESP_U, "label": "", "partuuid": "p1", "fs_id": "boot-efi",
                     "mount": "/boot/efi"}  # fmt: skip
    data = [{"number": 1, "type": "0FC63DAF-8483-4772-8E79-3D69D8477DE4", "fs": "ext4",
             "uuid": DATA_U, "label": "data", "partuuid": "q1", "fs_id": "data-data",
             "mount": "/data"}]  # fmt: skip
    mounts = [
        {"fs_id": "root", "mount": "/", "device": "/dev/sda4"},
        {"fs_id": "boot", "mount": "/boot", "device": "/dev/sda2"},
        {"fs_id": "data-data", "mount": "/data", "device": "/dev/sdb1"},
    ]
    if esp:
        mounts.append({"fs_id": "boot-efi", "mount": "/boot/efi", "device": "/dev/sda1"})
    return {
        "label": "gpt",
        "disks": {"0": {"label": "gpt", "partitions": system},
                  "1": {"label": "gpt", "partitions": data}},
        "mounts": mounts,
        "swap": [{"device": "/dev/sda3", "uuid": SWAP_U, "label": "swap0", "size": 1}],
    }  # fmt: skip


def _result(esp: bool) -> dict[str, object]:
    fs = {
        "root": {"mounted_at": "/st/mnt/root", "device": "/dev/loop7p4", "uuid": ROOT_U},
        "boot": {"mounted_at": "/st/mnt/boot", "device": "/dev/loop7p2", "uuid": BOOT_U},
        "data-data": {"mounted_at": "/st/mnt/data-data", "device": "/dev/loop8p1", "uuid": DATA_U},
    }
    if esp:
        fs["boot-efi"] = {"mounted_at": "/st/mnt/boot-efi", "device": "/dev/loop7p1", "uuid": ESP_U}
    return {
        "filesystems": fs,
        "swap": [{"device": "/dev/loop7p3", "uuid": SWAP_U, "label": "swap0"}],
    }


def test_bios_plan_maps_every_filesystem_to_itself() -> None:
    plan, binds = plan_from_prepare(
        _layout(False), _result(False), {"0": "/dev/loop7", "1": "/dev/loop8"}
    )
    assert plan.firmware == "bios"
    assert plan.boot_disk == "/dev/loop7"
    assert binds == {"/boot": Path("/st/mnt/boot"), "/data": Path("/st/mnt/data-data")}
    assert plan.root == FsMap(
        "/",
        FsIds(uuid=ROOT_U, label="rootfs", partuuid="p4", device="/dev/sda4"),
        FsIds(uuid=ROOT_U, label="rootfs", partuuid="p4"),
    )
    assert plan.swaps == (
        FsMap(
            SWAP,
            FsIds(uuid=SWAP_U, label="swap0", partuuid="p3", device="/dev/sda3"),
            FsIds(uuid=SWAP_U, label="swap0", partuuid="p3"),
        ),
    )
    assert sorted(m.mount for m in plan.filesystems) == ["/", "/boot", "/data", SWAP]
    # a device name of the source resolves, and is not "stable"
    found = plan.lookup("/dev/sdb1")
    assert found is not None and found[0].mount == "/data" and found[1] is False


def test_esp_makes_a_uefi_plan() -> None:
    plan, binds = plan_from_prepare(_layout(True), _result(True), {"0": "/dev/loop7"})
    assert plan.firmware == "uefi"
    assert plan.esp == "/boot/efi"
    assert binds["/boot/efi"] == Path("/st/mnt/boot-efi")
