"""Issue 5's proof by booting: migrated disks boot in QEMU (TCG) and reach the network.

The source systems (tests/bootimage.py) are Debian bookworm with a static IP and a unit that
prints what is mounted (`REHOST-MOUNTS ...`) and then `REHOST-BOOT-OK <hostname> <ipv4>` on the
serial console once the network is up. The "full" layout has a separate /boot, a swap partition
and a data disk, all in fstab by UUID. The untouched sources must boot with their static
address (so a failure elsewhere can be told apart from a broken fixture); a migrated
destination must boot with the DHCP address QEMU hands out (10.0.2.15), which proves the
network fixup replaced the static configuration, and with the same /boot, swap and /data
active, on the destination's disks.

This machine's kernel has no vfat, so the online UEFI case runs the receiver in a QEMU rescue
guest whose kernel has it (tests/rescuevm.py); the offline UEFI case still skips here.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bootimage import (
    DATA_FILE,
    DHCP_IP,
    HOSTNAME,
    MARKER,
    SOURCE_IP,
    SourceDisks,
    require_kernel_vfat,
    source_disks,
    source_image,
)
from helpers import MiB, run, s3_client
from loopdisk import ESP, LoopDisk, LoopLab, sh
from qemuboot import Boot, boot, overlay
from rehost.objectstore import StoreInfo
from test_online_e2e import Source

pytestmark = pytest.mark.slow

REHOST = Path(sys.executable).parent / "rehost"


FIRMWARES = pytest.mark.parametrize("firmware", ["bios", "uefi"])
LAYOUTS = pytest.mark.parametrize(
    ("firmware", "layout"), [("bios", "simple"), ("bios", "full"), ("uefi", "simple")]
)


def _uuids(image: Path) -> dict[int, str]:
    """Partition number -> filesystem (or swap) UUID of a raw disk image, read from the file."""
    table = json.loads(run("sfdisk", "--json", image))["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    found = {}
    for p in table["partitions"]:
        number = int(p["node"][len(str(image)) :])
        offset = str(int(p["start"]) * sector)
        uuid = sh("blkid", "-p", "-O", offset, "-o", "value", "-s", "UUID", image, check=False)
        if uuid.strip():
            found[number] = uuid.strip()
    return found


def assert_full_mounts(result: Boot, disks: SourceDisks) -> None:
    """/boot, the data disk's /data and the swap are active in the guest, on its virtio disks,
    with the source's UUIDs (prepare keeps them; fstab names them so)."""
    assert disks.data is not None
    system, data = _uuids(disks.system), _uuids(disks.data)
    assert result.mounts() == {
        "boot": f"/dev/vda2:ext4:{system[2]}",
        "data": f"/dev/vdb1:ext4:{data[1]}",
        "swap": f"/dev/vda3:{system[3]}",
    }, result.tail()


@LAYOUTS
def test_untouched_source_boots(tmp_path: Path, firmware: str, layout: str) -> None:
    began = time.monotonic()
    disks = source_disks(firmware, layout)
    built = time.monotonic() - began
    overlays = [overlay(d, "raw", tmp_path) for d in disks.all]
    result = boot(
        overlays[0], "qcow2", tmp_path / "console.log", firmware=firmware, more=overlays[1:]
    )
    print(f"image ready in {built:.1f}s; marker after {result.seconds:.1f}s: {result.marker}")
    assert result.marker == f"{MARKER} {HOSTNAME} {SOURCE_IP}", result.tail()
    if layout == "full":
        assert_full_mounts(result, disks)


@FIRMWARES
def test_offline_import_with_fixup_boots(
    tmp_path: Path, s3_env: StoreInfo, s3_bucket: str, firmware: str
) -> None:
    """The source disk packed to qcow2, uploaded, imported with --fixup: it boots with DHCP."""
    if firmware == "uefi":
        require_kernel_vfat()
    image = source_image(firmware)
    began = time.monotonic()
    packed = tmp_path / "source.qcow2"
    run(REHOST, "image", "pack", "-f", "raw", image, packed)
    s3_client(s3_env).upload_file(str(packed), s3_bucket, "source.qcow2")
    dest = tmp_path / "dest.img"
    out = run(
        REHOST,
        "import",
        f"s3://{s3_bucket}/source.qcow2",
        "--to",
        dest,
        "--state-dir",
        tmp_path / "state",
        "--fixup",
        "--firmware",
        firmware,
        "--json",
    )
    migrated = time.monotonic() - began
    report = json.loads(out)
    fixups = report["fixups"]
    assert fixups["distro"], fixups
    assert any(c["path"].endswith("etc/network/interfaces") for c in fixups["changes"]), fixups
    assert any("grub-install" in " ".join(c) for c in fixups["commands"]), fixups
    root_offset = MiB if firmware == "bios" else 65 * MiB
    interfaces = _read_from_disk(dest, "/etc/network/interfaces", tmp_path, root_offset)
    assert SOURCE_IP not in interfaces, interfaces
    result = boot(
        overlay(dest, "raw", tmp_path), "qcow2", tmp_path / "console.log", firmware=firmware
    )
    print(f"pack+upload+import+fixup {migrated:.1f}s; marker after {result.seconds:.1f}s")
    assert result.marker == f"{MARKER} {HOSTNAME} {DHCP_IP}", result.tail()


def _read_from_disk(disk: Path, path: str, tmp: Path, offset: int) -> str:
    """A file of the filesystem at `offset` in the disk, read through a read-only loop mount."""
    loop = run("losetup", "-f", "-r", "--show", "-o", str(offset), disk).strip()
    where = tmp / "peek"
    where.mkdir()
    try:
        run("mount", "-o", "ro,noload", loop, where)
        try:
            return (where / path.lstrip("/")).read_text()
        finally:
            run("umount", where)
    finally:
        run("losetup", "-d", loop)


def _mount_source(
    lab: LoopLab, disks: SourceDisks, firmware: str, layout: str, tmp: Path
) -> Source:
    """Copies of the cached source disks on loop devices, mounted like the running source
    server (the ESP through fusefat where the kernel has no vfat), for the agent."""
    loops: list[LoopDisk] = []
    for image in disks.all:
        copy = tmp / f"source-{len(loops)}.img"
        run("cp", "--sparse=always", image, copy)
        loop = run("losetup", "-fP", "--show", copy).strip()
        lab.loops.append(loop)
        loops.append(LoopDisk(copy, loop))
        lab.sync_partitions(loops[-1])
    root = tmp / "src"
    if layout == "full":
        parts = {"root": ("0", 4), "boot": ("0", 2), "data-data": ("1", 1)}
        mounts = {"root": root, "boot": root / "boot", "data-data": root / "data"}
    elif firmware == "uefi":
        parts = {"root": ("0", 2), "efi": ("0", 1)}
        mounts = {"root": root, "efi": root / "boot/efi"}
    else:
        parts = {"root": ("0", 1)}
        mounts = {"root": root}
    for fs_id, (index, number) in parts.items():  # root first: the others mount inside
        lab.mount(loops[int(index)].parts[number], mounts[fs_id])
    return Source(root, {str(i): d for i, d in enumerate(loops)}, parts, mounts)


def test_online_migration_boots(tmp_path: Path) -> None:
    """Agent -> receiver in two network namespaces, with the real fixups in the finalize,
    onto an empty system disk smaller than the source's and the data disk mapped by
    DataDisks onto a larger one: the destination boots with DHCP, with its /boot, swap and
    /data active."""
    from netns import netns_pair
    from test_online_e2e import make_dest, start_agent, write_config

    disks = source_disks("bios", "full")
    began = time.monotonic()
    lab = LoopLab(tmp_path)
    dest = None
    try:
        source = _mount_source(lab, disks, "bios", "full", tmp_path)
        bundle = tmp_path / "rehost-agent.pyz"
        run(REHOST, "agent-bundle", bundle)
        with netns_pair() as pair:
            # the source's system disk is 2048 MiB with ~0.7 GiB used: 1536 MiB is smaller;
            # its data disk is 256 MiB: 384 MiB is larger
            dest = make_dest(lab, pair, tmp_path / "dest", (1536, 384))
            dest.start(fixups=True)
            config = write_config(dest, bundle, DataDisks=[{"Index": 1, "MountPoint": "/data"}])
            status, lines = start_agent(dest, config, source, "--stage", "all").wait(900)
            assert status == 0, "\n".join(lines) + dest.output()
            assert lines[-1].startswith("ready to boot"), lines[-1]
            assert dest.proc is not None and dest.proc.wait(timeout=60) == 0, dest.output()
        migrated = time.monotonic() - began
        targets = [dest.disks["0"].image, dest.disks["1"].image]
        assert targets[0].stat().st_size < disks.system.stat().st_size
        overlays = [overlay(t, "raw", tmp_path) for t in targets]
        result = boot(overlays[0], "qcow2", tmp_path / "console.log", more=overlays[1:])
        print(f"online migration {migrated:.1f}s; marker after {result.seconds:.1f}s")
        assert result.marker == f"{MARKER} {HOSTNAME} {DHCP_IP}", result.tail()
        assert_full_mounts(result, disks)
        offset = _part_offset(targets[1], 1)
        data = _read_from_disk(targets[1], f"/{DATA_FILE}", tmp_path, offset)
        assert data == f"the data disk of {HOSTNAME}\n"
    finally:
        if dest is not None:
            dest.kill()
        lab.close()


TOKEN = "uefi-rescue-token-0123456789"


@pytest.mark.uefi_vm
@pytest.mark.timeout(1800)
def test_online_uefi_migration_boots(tmp_path: Path) -> None:
    """Issue 5 case 3: the UEFI source (GPT, ESP at /boot/efi, grub-efi-amd64) migrated online
    onto a smaller empty disk, the receiver in migration mode in a QEMU rescue guest whose
    kernel has vfat (tests/rescuevm.py): prepare formats and mounts the ESP, the transfer
    writes it, the finalize's fixups run `grub-install --removable` into it and rebuild the
    initramfs. The destination then boots with OVMF and an empty NVRAM (so only
    EFI/BOOT/BOOTX64.EFI can boot it), with DHCP."""
    from rescuevm import rescue_receiver

    disks = source_disks("uefi", "simple")
    began = time.monotonic()
    timings: dict[str, float] = {}
    lab = LoopLab(tmp_path)
    try:
        source = _mount_source(lab, disks, "uefi", "simple", tmp_path)
        bundle = tmp_path / "agent" / "rehost-agent.pyz"
        bundle.parent.mkdir()
        run(REHOST, "agent-bundle", bundle)
        token = tmp_path / "token"
        token.write_text(TOKEN + "\n")
        target = tmp_path / "dest-system.img"
        with open(target, "wb") as f:  # the source's is 2048 MiB with ~0.7 GiB used
            f.truncate(1536 * MiB)
        timings["source"] = time.monotonic() - began
        with rescue_receiver(tmp_path / "rescue", [target], token) as vm:
            timings["rescue boot"] = vm.timings["listening"]
            config = bundle.parent / "config.json"
            config.write_text(json.dumps({
                "Destination": {"Address": vm.address, "Token": TOKEN,
                                "Fingerprint": vm.fingerprint},
                "DataDisks": [],
                "Compression": "off",
            }, indent=1))  # fmt: skip
            mark = time.monotonic()
            agent = subprocess.run(
                ["/usr/bin/python3", bundle, "--config", config, "--stage", "all",
                 "--source-root", source.root],
                capture_output=True, text=True, timeout=1500,
            )  # fmt: skip
            timings["agent (prepare, transfer, finalize with fixups)"] = time.monotonic() - mark
            lines = (agent.stdout + agent.stderr).splitlines()
            assert agent.returncode == 0, "\n".join(lines) + vm.logs()
            assert lines[-1].startswith("ready to boot"), "\n".join(lines) + vm.logs()
            assert vm.wait_exit(120) == 0, vm.logs()
            log = vm.log.read_text(errors="replace")
        timings.update(_fixup_timings(log))
        grub = "grub-install --target=x86_64-efi --efi-directory=/boot/efi --removable --no-nvram"
        assert f"fixup: bootloader: $ {grub}" in log, log
        assert "fixup: initramfs: $ update-initramfs -u -k" in log, log
        assert re.search(r"fixup: network: \S*etc/network/interfaces: ", log), log
        assert target.stat().st_size < disks.system.stat().st_size
        _check_esp(target, tmp_path)
        result = boot(
            overlay(target, "raw", tmp_path), "qcow2", tmp_path / "console.log", firmware="uefi"
        )
        timings["destination boot (OVMF)"] = result.seconds
        print("; ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
        assert result.marker == f"{MARKER} {HOSTNAME} {DHCP_IP}", result.tail()
    finally:
        lab.close()


def _fixup_timings(log: str) -> dict[str, float]:
    """Seconds each fixup command took in the chroot, from the timestamps of the receiver's
    log ("2026-01-01 10:00:00,123 INFO rehost.receiver: fixup: chroot: $ ARGV"): from that
    line to the next one."""
    lines = []
    pattern = r"^\S+ (\d+):(\d+):(\d+),(\d+) \S+ \S+ (.*)$"
    for m in re.finditer(pattern, log, re.M):
        h, mi, s, ms = (int(g) for g in m.groups()[:4])
        lines.append((h * 3600 + mi * 60 + s + ms / 1000, m.group(5)))
    spans: dict[str, float] = {}
    for (t, text), (after, _) in itertools.pairwise(lines):
        if text.startswith("fixup: chroot: $ "):
            name = text.split()[3]
            spans[name] = spans.get(name, 0.0) + after - t
    return spans


def _check_esp(image: Path, tmp: Path) -> None:
    """The destination's ESP is a consistent FAT (`fsck.vfat -n`) holding the removable-media
    loader, checked from the host without mounting it (no vfat here)."""
    table = json.loads(run("sfdisk", "--json", image))["partitiontable"]
    esp = next(p for p in table["partitions"] if p["type"].upper() == ESP)
    sector = int(table.get("sectorsize", 512))
    loop = run("losetup", "-f", "-r", "--show", "-o", str(int(esp["start"]) * sector),
               "--sizelimit", str(int(esp["size"]) * sector), image).strip()  # fmt: skip
    try:
        run("fsck.vfat", "-n", loop)
        listing = run("fsck.vfat", "-n", "-l", loop)
    finally:
        run("losetup", "-d", loop)
    assert "/EFI/BOOT/BOOTX64.EFI" in listing.upper(), listing


def _part_offset(image: Path, number: int) -> int:
    table = json.loads(run("sfdisk", "--json", image))["partitiontable"]
    part = next(p for p in table["partitions"] if p["node"] == f"{image}{number}")
    return int(part["start"]) * int(table.get("sectorsize", 512))
