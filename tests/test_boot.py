"""Issue 5's proof by booting: migrated disks boot in QEMU (TCG) and reach the network.

The source system (tests/bootimage.py) is Debian bookworm with a static IP and a unit that
prints `REHOST-BOOT-OK <hostname> <ipv4>` on the serial console once the network is up. The
untouched source must boot with its static address (so a failure elsewhere can be told apart
from a broken fixture); a migrated destination must boot with the DHCP address QEMU hands out
(10.0.2.15), which proves the network fixup replaced the static configuration.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from bootimage import DHCP_IP, HOSTNAME, MARKER, SOURCE_IP, source_image
from helpers import MiB, run, s3_client
from qemuboot import boot, overlay
from rehost.objectstore import StoreInfo

pytestmark = pytest.mark.slow

REHOST = Path(sys.executable).parent / "rehost"


FIRMWARES = pytest.mark.parametrize("firmware", ["bios", "uefi"])


@FIRMWARES
def test_untouched_source_boots(tmp_path: Path, firmware: str) -> None:
    began = time.monotonic()
    image = source_image(firmware)
    built = time.monotonic() - began
    disk = overlay(image, "raw", tmp_path)
    result = boot(disk, "qcow2", tmp_path / "console.log", firmware=firmware)
    print(f"image ready in {built:.1f}s; marker after {result.seconds:.1f}s: {result.marker}")
    assert result.marker == f"{MARKER} {HOSTNAME} {SOURCE_IP}", result.tail()


@FIRMWARES
def test_offline_import_with_fixup_boots(
    tmp_path: Path, s3_env: StoreInfo, s3_bucket: str, firmware: str
) -> None:
    """The source disk packed to qcow2, uploaded, imported with --fixup: it boots with DHCP."""
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


@FIRMWARES
def test_online_migration_boots(tmp_path: Path, firmware: str) -> None:
    """Agent -> receiver in two network namespaces onto a smaller empty disk, with the real
    fixups in the finalize: the destination boots with DHCP."""
    from loopdisk import LoopDisk, LoopLab
    from netns import netns_pair
    from test_online_e2e import Source, make_dest, start_agent, write_config

    image = source_image(firmware)
    began = time.monotonic()
    lab = LoopLab(tmp_path)
    dest = None
    try:
        copy = tmp_path / "source.img"
        run("cp", "--sparse=always", image, copy)
        loop = run("losetup", "-fP", "--show", copy).strip()
        lab.loops.append(loop)
        disk = LoopDisk(copy, loop)
        lab.sync_partitions(disk)
        root = tmp_path / "src"
        root_part = 1 if firmware == "bios" else 2
        lab.mount(disk.parts[root_part], root)
        if firmware == "uefi":
            lab.mount(disk.parts[1], root / "boot/efi")
        source = Source(root, {"0": disk}, {"root": ("0", root_part)}, {"root": root})
        bundle = tmp_path / "rehost-agent.pyz"
        run(REHOST, "agent-bundle", bundle)
        with netns_pair() as pair:
            # the source's root partition is 2047 MiB with ~0.7 GiB used: 1536 MiB is smaller
            dest = make_dest(lab, pair, tmp_path / "dest", (1536, 64))
            dest.start(fixups=True)
            config = write_config(dest, bundle, DataDisks=[])
            status, lines = start_agent(dest, config, source, "--stage", "all").wait(900)
            assert status == 0, "\n".join(lines) + dest.output()
            assert lines[-1].startswith("ready to boot"), lines[-1]
            assert dest.proc is not None and dest.proc.wait(timeout=60) == 0, dest.output()
        migrated = time.monotonic() - began
        target = dest.disks["0"].image
        result = boot(
            overlay(target, "raw", tmp_path), "qcow2", tmp_path / "console.log", firmware=firmware
        )
        print(f"online migration {migrated:.1f}s; marker after {result.seconds:.1f}s")
        assert result.marker == f"{MARKER} {HOSTNAME} {DHCP_IP}", result.tail()
    finally:
        if dest is not None:
            dest.kill()
        lab.close()
