"""Layout discovery on a source made of loop disks, and its recreation on other-sized disks."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from loopdisk import (
    BIOS_BOOT,
    ESP,
    LINUX,
    SWAP,
    LoopDisk,
    LoopLab,
    MiB,
    Part,
    blkid,
    kernel_has,
    mount_namespace,
    part_sysfs,
    sh,
)
from rehost.online.agent import layout as layout_module
from rehost.online.agent.layout import discover, fs_id_for, parse_table
from rehost.online.protocol import valid_fs_id
from rehost.online.receiver import disks as rdisks
from rehost.online.receiver.disks import (
    DestinationTooSmall,
    DiskPrepareFailed,
    LayoutMismatch,
    LayoutUnsupported,
    finalize,
    prepare,
)

Json = dict[str, Any]


def table(dev: str) -> Json:
    out: Json = json.loads(sh("sfdisk", "--json", dev))["partitiontable"]
    return out


def ext_features(dev: str) -> set[str]:
    out = sh("dumpe2fs", "-h", dev)
    line = next(ln for ln in out.splitlines() if ln.startswith("Filesystem features:"))
    return set(line.split(":", 1)[1].split())


def is_mount(path: Path) -> bool:
    return subprocess.run(["mountpoint", "-q", str(path)]).returncode == 0


def check_copy(src_layout: Json, index: str, dest: LoopDisk, src: LoopDisk) -> Json:
    """The destination's table and filesystems match the source's; returns the dest table."""
    st, dt = table(src.dev), table(dest.dev)
    assert dt["label"] == st["label"] and dt["id"] == st["id"]
    assert [p["type"] for p in dt["partitions"]] == [p["type"] for p in st["partitions"]]
    for key in ("uuid", "name", "attrs", "bootable"):
        assert [p.get(key) for p in dt["partitions"]] == [p.get(key) for p in st["partitions"]]
    sectors = int(sh("blockdev", "--getsz", dest.dev))
    assert all(p["start"] + p["size"] <= sectors for p in dt["partitions"])
    for p in src_layout["disks"][index]["partitions"]:
        if not p["fs"]:
            continue
        sdev, ddev = src.parts[p["number"]], f"{dest.dev}p{p['number']}"
        for tag in ("TYPE", "UUID", "LABEL"):
            assert blkid(ddev, tag) == blkid(sdev, tag), (p["number"], tag)
        if p["fs"].startswith("ext"):
            assert ext_features(ddev) == ext_features(sdev)
    return dt


def sizes(dt: Json) -> dict[int, int]:
    return {int(p["node"].rsplit("p", 1)[1]): p["size"] * 512 for p in dt["partitions"]}


def test_fs_id_for() -> None:
    assert [fs_id_for(m) for m in ("/", "/boot", "/boot/efi")] == ["root", "boot", "efi"]
    assert fs_id_for("/var/lib/my sql") == "data-var-lib-my-sql"
    assert fs_id_for("/data") == "data-data"
    long = [fs_id_for("/srv/" + "x" * 250 + end) for end in ("a", "b")]
    assert long[0] != long[1] and all(valid_fs_id(i) for i in long)


GPT_PARTS = [
    Part(1, BIOS_BOOT),
    Part(64, LINUX, "ext4", "/boot", "boot"),
    Part(32, SWAP, "swap", label="sw"),
    Part(
        None,
        LINUX,
        "xfs",
        "/",
        "rootfs",
        fill_mib=20,
        extra='name="root", attrs="LegacyBIOSBootable"',
    ),
]
DATA_PARTS = [Part(None, "83", "ext4", "/data", "data", fill_mib=8)]


def test_gpt_bios_xfs_and_data_disk(lab: LoopLab, tmp_path: Path) -> None:
    system = lab.disk("src0", 500, "gpt", GPT_PARTS)
    data = lab.disk("src1", 100, "dos", DATA_PARTS)
    root = tmp_path / "R"
    lab.mount_tree(root, [(system, GPT_PARTS), (data, DATA_PARTS)])
    layout = discover(str(root))

    assert layout["unsupported"] == [] and layout["label"] == "gpt"
    d0, d1 = layout["disks"]["0"], layout["disks"]["1"]
    assert (d0["label"], d1["label"]) == ("gpt", "dos")
    assert [p["fs"] for p in d0["partitions"]] == [None, "ext4", "swap", "xfs"]
    assert d0["partitions"][0]["flags"] == ["bios_grub"]
    assert "legacy_boot" in d0["partitions"][3]["flags"] and d0["partitions"][3]["name"] == "root"
    mounts = {m["mount"]: m for m in layout["mounts"]}
    assert {m: v["fs_id"] for m, v in mounts.items()} == {
        "/": "root",
        "/boot": "boot",
        "/data": "data-data",
    }
    assert mounts["/"]["path"] == str(root) and mounts["/data"]["disk_index"] == "1"
    assert 20 * MiB <= mounts["/"]["used"] < 100 * MiB
    assert layout["swap"] == [
        {
            "device": system.parts[3],
            "uuid": blkid(system.parts[3], "UUID"),
            "label": "sw",
            "size": 32 * MiB,
        }
    ]
    # The stdlib table reader (for sfdisk without --json) agrees with sfdisk.
    for disk in (system, data):
        ours, theirs = parse_table(disk.dev), table(disk.dev)
        assert ours is not None
        for key in ("label", "id"):
            assert str(ours[key]).lower() == str(theirs[key]).lower()
        strip = [{k: v for k, v in p.items()} for p in theirs["partitions"]]
        assert ours["partitions"] == strip

    # Smaller destination: the xfs root shrinks, but keeps the used data plus margin.
    small0, small1 = lab.disk("dst0", 420), lab.disk("dst1", 90)
    state = tmp_path / "state-small"
    result = prepare(layout, {"0": small0.dev, "1": small1.dev}, state)
    lab.sync_partitions(small0)
    lab.sync_partitions(small1)
    dt = check_copy(layout, "0", small0, system)
    check_copy(layout, "1", small1, data)
    got = sizes(dt)
    assert got[1] == MiB and got[2] == 64 * MiB and got[3] <= 32 * MiB
    assert mounts["/"]["used"] * 1.1 + 64 * MiB <= got[4] < d0["partitions"][3]["size"]
    assert sorted(result["filesystems"]) == ["boot", "data-data", "root"]
    for fs_id, fs in result["filesystems"].items():
        assert fs["mounted_at"] == str(state / "mnt" / fs_id) and is_mount(Path(fs["mounted_at"]))
        # what the source sends (device nodes, setuid files) is not for the rescue system
        options = sh("findmnt", "-n", "-o", "OPTIONS", fs["mounted_at"]).strip().split(",")
        assert {"nodev", "nosuid"} <= set(options), options
    assert result["swap"][0]["uuid"] == blkid(system.parts[3], "UUID")
    xfs_src, xfs_dst = sh("xfs_info", root), sh("xfs_info", state / "mnt/root")
    for key in ("crc=", "reflink=", "bigtime=", "ftype=", "sparse="):
        assert xfs_src.split(key)[1][0] == xfs_dst.split(key)[1][0], key

    # Idempotent: the same layout again keeps the data and just remounts.
    (state / "mnt/root/marker").write_text("kept")
    assert prepare(layout, {"0": small0.dev, "1": small1.dev}, state) == result
    finalize(state)
    assert not any(is_mount(state / "mnt" / f) for f in result["filesystems"])
    sh("e2fsck", "-fn", f"{small0.dev}p2")
    sh("e2fsck", "-fn", f"{small1.dev}p1")
    sh("xfs_repair", "-n", f"{small0.dev}p4")
    assert prepare(layout, {"0": small0.dev, "1": small1.dev}, state) == result
    assert (state / "mnt/root/marker").read_text() == "kept"
    # A different layout is refused now that data was written.
    other = copy.deepcopy(layout)
    other["disks"]["0"]["partitions"][1]["label"] = "boot2"
    with pytest.raises(LayoutMismatch):
        prepare(other, {"0": small0.dev, "1": small1.dev}, state)
    finalize(state)

    # Larger destination: the last ext/xfs partition (the root) takes the rest.
    big0, big1 = lab.disk("big0", 640), lab.disk("big1", 200)
    prepare(layout, {"0": big0.dev, "1": big1.dev}, tmp_path / "state-big")
    lab.sync_partitions(big0)
    lab.sync_partitions(big1)
    got = sizes(check_copy(layout, "0", big0, system))
    assert got[4] > d0["partitions"][3]["size"] and 640 * MiB - got[4] - 98 * MiB <= 2 * MiB
    assert sizes(check_copy(layout, "1", big1, data))[1] >= 197 * MiB


MBR_PARTS = [
    Part(120, "83", "ext4", "/", "root", extra="bootable", fill_mib=10),
    Part(None, "5"),
    Part(40, "82", "swap"),
]


def test_mbr_root_and_logical_swap(lab: LoopLab, tmp_path: Path) -> None:
    system = lab.disk("src0", 200, "dos", MBR_PARTS)
    root = tmp_path / "R"
    lab.mount_tree(root, [(system, MBR_PARTS)])
    layout = discover(str(root))
    assert layout["unsupported"] == []
    parts = layout["disks"]["0"]["partitions"]
    assert [(p["number"], p["type"], p["fs"], p["flags"]) for p in parts] == [
        (1, "83", "ext4", ["boot"]),
        (2, "5", None, []),
        (5, "82", "swap", []),
    ]
    ours = parse_table(system.dev)
    assert ours is not None and ours["partitions"] == table(system.dev)["partitions"]

    big = lab.disk("dst0", 300)
    result = prepare(layout, {"0": big.dev}, tmp_path / "state")
    lab.sync_partitions(big)
    got = sizes(check_copy(layout, "0", big, system))
    assert got[5] == 40 * MiB and got[1] > 200 * MiB
    assert list(result["filesystems"]) == ["root"] and len(result["swap"]) == 1


def test_a_mount_in_another_namespace_is_named(lab: LoopLab, tmp_path: Path) -> None:
    """A partition mounted read-only in another mount namespace makes the receiver's read-write
    mount fail with a bare EBUSY, and its mkfs too: the error says where that mount is."""
    system = lab.disk("src0", 200, "dos", MBR_PARTS)
    root = tmp_path / "R"
    lab.mount_tree(root, [(system, MBR_PARTS)])
    layout = discover(str(root))
    dest, state = lab.disk("dst0", 300), tmp_path / "state"
    prepare(layout, {"0": dest.dev}, state)
    finalize(state)
    lab.sync_partitions(dest)
    with mount_namespace() as ns:
        ns.mount("-o", "ro", dest.parts[1], tmp_path)
        with pytest.raises(DiskPrepareFailed) as err:
            prepare(layout, {"0": dest.dev}, state)  # the same layout: remounts
        assert "already mounted or mount point busy" in err.value.reason
        where = f"{tmp_path} (in the mount namespace of pid {ns.pid}, sleep)"
        assert err.value.reason.endswith(f"{dest.parts[1]} is mounted elsewhere: {where}")
        assert err.value.hint.startswith(f"unmount {dest.parts[1]} there")
        (state / "layout.json").unlink()  # a new layout: the disk is checked before sfdisk
        with pytest.raises(DiskPrepareFailed, match=rf"{dest.dev} is in use: {re.escape(where)}"):
            prepare(layout, {"0": dest.dev}, state)
    assert prepare(layout, {"0": dest.dev}, state)["filesystems"]["root"]["device"] == dest.parts[1]
    finalize(state)


# This test kernel has no vfat: the ESP is then left unmounted on the source, which discover
# reports too (formatted on the destination with the same volume id, not mounted).
VFAT = "vfat" in Path("/proc/filesystems").read_text().split()
ESP_PARTS = [
    Part(64, ESP, "vfat", "/boot/efi" if VFAT else None, "EFI"),
    Part(None, LINUX, "ext4", "/", "root", fill_mib=30),
]


def test_gpt_esp_too_small_and_relayout(lab: LoopLab, tmp_path: Path) -> None:
    system = lab.disk("src0", 200, "gpt", ESP_PARTS)
    root = tmp_path / "R"
    lab.mount_tree(root, [(system, ESP_PARTS)])
    layout = discover(str(root))
    parts = layout["disks"]["0"]["partitions"]
    assert [(p["fs"], p["flags"]) for p in parts] == [("vfat", ["esp"]), ("ext4", [])]
    assert {m["fs_id"] for m in layout["mounts"]} == ({"root", "efi"} if VFAT else {"root"})

    tiny = lab.disk("tiny", 120)
    with pytest.raises(DestinationTooSmall) as err:
        prepare(layout, {"0": tiny.dev}, tmp_path / "state-tiny")
    used = next(m["used"] for m in layout["mounts"] if m["mount"] == "/")
    assert err.value.code == "DESTINATION_TOO_SMALL" and err.value.have == 120 * MiB
    assert err.value.need >= 64 * MiB + used * 1.1 + 64 * MiB > err.value.have
    assert err.value.to_dict()["need"] == str(err.value.need)
    assert blkid(tiny.dev, "PTTYPE") == ""  # untouched

    dest = lab.disk("dst0", 170)
    state = tmp_path / "state"
    prepare(layout, {"0": dest.dev}, state)
    lab.sync_partitions(dest)
    check_copy(layout, "0", dest, system)
    # Nothing written yet: a changed layout is accepted and applied.
    other = copy.deepcopy(layout)
    other["disks"]["0"]["partitions"][1]["label"] = "newroot"
    prepare(other, {"0": dest.dev}, state)
    assert blkid(f"{dest.dev}p2", "LABEL") == "newroot"
    (state / "mnt/root/file").write_text("data")
    with pytest.raises(LayoutMismatch):
        prepare(layout, {"0": dest.dev}, state)


@pytest.mark.skipif(shutil.which("mkfs.btrfs") is None, reason="needs mkfs.btrfs")
def test_unsupported_filesystem(lab: LoopLab, tmp_path: Path) -> None:
    parts = [Part(64, LINUX, "ext4", "/", "root"), Part(None, LINUX, "btrfs", "/srv")]
    system = lab.disk("src0", 300, "gpt", parts)
    root = tmp_path / "R"
    lab.mount_tree(root, [(system, parts)])
    layout = discover(str(root))
    assert len(layout["unsupported"]) == 1 and "/srv is btrfs" in layout["unsupported"][0]
    dest = lab.disk("dst0", 300)
    with pytest.raises(LayoutUnsupported, match="btrfs"):
        prepare(layout, {"0": dest.dev}, tmp_path / "state")
    assert blkid(dest.dev, "PTTYPE") == ""


def test_a_container_root_below_the_root_is_left_to_its_layers(
    lab: LoopLab, tmp_path: Path
) -> None:
    """A Docker host has an overlay mounted per running container: its layers are files of
    the filesystem below, which migrates, so the union is ignored, not a FAIL."""
    parts = [Part(64, LINUX, "ext4", "/", "root")]
    system = lab.disk("src0", 100, "gpt", parts)
    root = tmp_path / "R"
    lab.mount_tree(root, [(system, parts)])
    layers = root / "var/lib/docker/overlay2/abc"
    for name in ("lower", "upper", "work", "merged"):
        (layers / name).mkdir(parents=True)
    merged = layers / "merged"
    options = f"lowerdir={layers}/lower,upperdir={layers}/upper,workdir={layers}/work"
    sh("mount", "-t", "overlay", "overlay", "-o", options, merged)
    try:
        layout = discover(str(root))
    finally:
        sh("umount", merged)
    assert layout["unsupported"] == []
    assert {
        "mount": "/var/lib/docker/overlay2/abc/merged",
        "fs": "overlay",
        "reason": "container layers",
    } in layout["ignored"]


def test_unsupported_layouts_refused_before_touching_disks(tmp_path: Path) -> None:
    part = {
        "number": 1,
        "start": 2048,
        "size": 64 * MiB,
        "type": "83",
        "fs": "zfs",
        "fs_id": "root",
    }
    layout: Json = {
        "label": "dos",
        "disks": {"0": {"source_size": 100 * MiB, "partitions": [part]}},
    }
    with pytest.raises(LayoutUnsupported, match="zfs"):
        prepare(layout, {"0": "/nonexistent"}, tmp_path)
    with pytest.raises(LayoutUnsupported, match="no destination disk"):
        prepare({**layout, "disks": {"1": layout["disks"]["0"]}}, {"0": "/x"}, tmp_path)
    # the id names the mount point under the state dir: "../../etc" was mounted over /etc
    for fs_id in ("../../etc", "/etc", "..", "", "a/b", 7, ["root"], "x" * 201):
        bad = {**layout, "disks": {"0": {"partitions": [{**part, "fs": "ext4", "fs_id": fs_id}]}}}
        with pytest.raises(LayoutUnsupported, match="fs_id"):
            prepare(bad, {"0": "/nonexistent"}, tmp_path)
    twice = [{**part, "fs": "ext4"}, {**part, "number": 2, "fs": "ext4"}]
    with pytest.raises(LayoutUnsupported, match="partition 2: fs_id 'root'"):
        prepare({**layout, "disks": {"0": {"partitions": twice}}}, {"0": "/x"}, tmp_path)
    assert not (tmp_path / "mnt").exists()
    no_root = discover(str(tmp_path))  # a plain directory on the host's root filesystem
    assert any("no filesystem" in r or "not" in r for r in no_root["unsupported"])
    assert rdisks.LayoutUnsupported.code == "LAYOUT_UNSUPPORTED"


def test_partial_mounts_are_not_bind_mounts(lab: LoopLab, tmp_path: Path) -> None:
    """A btrfs subvolume, or one subdirectory of a filesystem, mounted where the whole
    filesystem is not mounted under the root is no bind mount to skip with a WARN: its
    partition would be recreated empty and its data silently left behind."""
    btrfs = shutil.which("mkfs.btrfs") is not None and kernel_has("btrfs")
    parts = [
        Part(64, LINUX, "ext4", "/", "root"),
        Part(128, LINUX, "btrfs" if btrfs else None),
        Part(None, LINUX, "ext4"),
    ]
    system = lab.disk("src0", 300, "gpt", parts)
    p2, p3 = (Path(system.parts[n]).name for n in (2, 3))
    root = tmp_path / "R"
    lab.mount(system.parts[1], root)
    (root / "srv" / "site").mkdir(parents=True)
    bind(lab, root / "srv" / "site", root / "www")  # a real bind mount: of the root filesystem
    lab.mount(system.parts[3], tmp_path / "whole3")
    (tmp_path / "whole3" / "home").mkdir()
    bind(lab, tmp_path / "whole3" / "home", root / "home")
    sh("umount", tmp_path / "whole3")
    if btrfs:
        lab.mount(system.parts[2], tmp_path / "whole2")
        sh("btrfs", "subvolume", "create", tmp_path / "whole2" / "@data")
        sh("umount", tmp_path / "whole2")
        (root / "data").mkdir()
        sh("mount", "-o", "subvol=@data", system.parts[2], root / "data")
        lab.mounts.append(root / "data")

    layout = discover(str(root))
    home = (
        f"only a subdirectory (/home) of /dev/{p3} is mounted at /home; mount the whole "
        f"filesystem (for example at /mnt/{p3}) or leave it out"
    )
    data = f"/data is btrfs on /dev/{p2}; supported filesystems are ext2, ext3, ext4, xfs and vfat"
    assert layout["unsupported"] == ([data, home] if btrfs else [home])
    assert [i for i in layout["ignored"] if i["mount"]] == [
        {"mount": "/www", "fs": "ext4", "reason": "bind mount of /"}
    ]
    assert [m["mount"] for m in layout["mounts"]] == ["/"]

    # As the hint says: with the whole filesystem mounted too, /home is a bind mount of it.
    lab.mount(system.parts[3], root / "mnt" / p3)
    layout = discover(str(root))
    assert layout["unsupported"] == ([data] if btrfs else [])
    assert {"mount": "/home", "fs": "ext4", "reason": f"bind mount of /mnt/{p3}"} in layout[
        "ignored"
    ]
    assert [m["mount"] for m in layout["mounts"]] == ["/", f"/mnt/{p3}"]
    if not btrfs:
        pytest.skip("mkfs.btrfs or the kernel's btrfs is missing: the subvolume half did not run")


def bind(lab: LoopLab, what: Path, where: Path) -> None:
    where.mkdir(parents=True, exist_ok=True)
    sh("mount", "--bind", what, where)
    lab.mounts.append(where)


def test_a_mount_hidden_by_a_later_one_is_never_read(lab: LoopLab, tmp_path: Path) -> None:
    """p2 at /var/log, then p3 at /var: /var/log now leads into p3. Discovery crashed on
    the missing directory, or with one there would have read p3's files as p2's."""
    parts = [
        Part(64, LINUX, "ext4", "/", "root"),
        Part(64, LINUX, "ext4"),
        Part(None, LINUX, "ext4"),
    ]
    system = lab.disk("src0", 250, "gpt", parts)
    p2 = Path(system.parts[2]).name
    # the root lies on a tmpfs stacked over another: the lower one is hidden, not the root
    for _ in range(2):
        (tmp_path / "stack").mkdir(exist_ok=True)
        sh("mount", "-t", "tmpfs", "none", tmp_path / "stack")
        lab.mounts.append(tmp_path / "stack")
    root = tmp_path / "stack" / "R"
    lab.mount(system.parts[1], root)
    lab.mount(system.parts[2], root / "var" / "log")
    lab.mount(system.parts[3], root / "var")
    hidden = (
        f"/var/log (/dev/{p2}) is hidden by the mount at /var, so its files cannot be read; "
        "unmount both, then mount /var first and /var/log after it (or leave /var/log out)"
    )
    for _ in ("no var/log in p3", "p3's own var/log"):
        layout = discover(str(root))
        assert layout["unsupported"] == [hidden]
        assert [m["mount"] for m in layout["mounts"]] == ["/", "/var"]
        (root / "var" / "log").mkdir(exist_ok=True)

    # The same filesystem also mounted where it can be read: the hidden mount is only ignored.
    lab.mount(system.parts[2], root / "srv" / "log")
    layout = discover(str(root))
    assert layout["unsupported"] == []
    assert {"mount": "/var/log", "fs": "ext4", "reason": "hidden by the mount at /var"} in layout[
        "ignored"
    ]
    assert [m["mount"] for m in layout["mounts"]] == ["/", "/srv/log", "/var"]


def test_4k_sectors_without_sfdisk_json(
    lab: LoopLab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a 4Kn disk the stdlib table reader (sfdisk without --json: util-linux < 2.26, as on
    CentOS 7) finds the same partitions, logical ones included, as sfdisk does. That old
    sfdisk cannot run here, so _sfdisk_table is made to answer as it would: None."""
    image = tmp_path / "src4k.img"
    with open(image, "wb") as f:
        f.truncate(200 * MiB)
    dev = sh("losetup", "-b", "4096", "-fP", "--show", image).strip()
    lab.loops.append(dev)
    disk = LoopDisk(image, dev)
    script = "label: dos\nsize=64MiB, type=83, bootable\ntype=5\nsize=48MiB, type=83\ntype=82\n"
    subprocess.run(["sfdisk", "-q", dev], input=script, text=True, check=True, capture_output=True)
    # partx cannot add the extended partition on a 4Kn disk (it asks for 2 × 512 bytes, not
    # a whole sector): the others are added one by one, as sync_partitions would
    for number in (1, 5, 6):
        sh("partx", "-a", "-n", f"{number}:{number}", dev)
        name = part_sysfs(dev, number)
        assert name is not None
        node = Path("/dev") / name
        major, minor = (Path("/sys/class/block") / name / "dev").read_text().split(":")
        node.unlink(missing_ok=True)  # a stale node: another loop device's partition
        os.mknod(node, 0o600 | stat.S_IFBLK, os.makedev(int(major), int(minor)))
        lab.nodes.append(node)
        disk.parts[number] = str(node)
    for number, fs in ((1, "ext4"), (5, "ext4"), (6, "swap")):
        lab.mkfs(disk.parts[number], fs, "")
    root = tmp_path / "R"
    lab.mount(disk.parts[1], root)
    lab.mount(disk.parts[5], root / "data")
    with_sfdisk = discover(str(root))
    assert with_sfdisk["unsupported"] == []
    parts = with_sfdisk["disks"]["0"]["partitions"]
    assert [(p["number"], p["fs"]) for p in parts] == [
        (1, "ext4"),
        (2, None),
        (5, "ext4"),
        (6, "swap"),
    ]
    theirs = table(dev)
    assert theirs["sectorsize"] == 4096
    ours = parse_table(dev, 4096)
    assert ours is not None and ours["partitions"] == theirs["partitions"]

    monkeypatch.setattr(layout_module, "_sfdisk_table", lambda disk: None)
    assert discover(str(root)) == with_sfdisk
