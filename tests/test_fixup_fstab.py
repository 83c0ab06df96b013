"""fstab in the boot fixups: partitions named by the source's kernel names, and other swaps.

The offline case (`rehost import --fixup`) runs on a real disk image with a real partition
table and filesystems, attached to a loop device by fixup_disk itself. Only the commands the
fixups run inside the migrated system (grub-install, update-initramfs) are recorded instead of
run: the root is a synthetic Debian tree (tests/test_fixup.py), not an installable system.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import test_fixup as T
from loopdisk import LoopLab, Part, blkid
from rehost.offline import fixup as OF
from rehost.online.fixup import SWAP, FixupFailed, FixupPlan, FixupReport, run_fixups
from rehost.online.fixup.common import Context
from rehost.online.fixup.fstab import fix_fstab

XVDA_FSTAB = """\
/dev/xvda1 / ext4 errors=remount-ro 0 1
/dev/xvda2 /var ext4 defaults 0 2
/dev/xvda3 none swap sw 0 0
/dev/xvdb1 /data ext4 defaults 0 2
"""


def _image_with_device_named_fstab(tmp_path: Path) -> tuple[Path, dict[int, str]]:
    """A dos disk image: 1 root (Debian tree), 2 /var (a marker file), 3 swap; UUIDs by number."""
    lab = LoopLab(tmp_path)
    try:
        parts = [Part(48, "83", "ext4"), Part(24, "83", "ext4"), Part(None, "82", "swap")]
        disk = lab.disk("xvda", 96, "dos", parts)
        root, var = tmp_path / "mnt-root", tmp_path / "mnt-var"
        lab.mount(disk.parts[1], root)
        lab.mount(disk.parts[2], var)
        T.debian_tree(root)
        T.put(root, "/etc/fstab", XVDA_FSTAB)
        T.put(var, "/marker", "the /var filesystem\n")
        uuids = {n: blkid(node, "UUID") for n, node in disk.parts.items()}
    finally:
        lab.close()
    assert all(uuids.values()), uuids
    return disk.image, uuids


def test_offline_fixup_finds_var_and_swap_named_by_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/dev/xvda2 /var and /dev/xvda3 swap are the image's partitions 2 and 3: mounted, bound,
    in the plan and rewritten to UUID=; /dev/xvdb1 is another disk and is commented out."""
    if os.geteuid() != 0:
        pytest.skip("loop devices and mounts need root")
    image, uuids = _image_with_device_named_fstab(tmp_path)
    seen: dict[str, object] = {}
    logged: list[str] = []

    def recorded_commands(
        root: Path, plan: FixupPlan, log: object = None, binds: dict[str, Path] | None = None
    ) -> FixupReport:
        # The real fixups on the mounted root; only the commands in the chroot are recorded.
        seen["mounts"] = sorted(m.mount for m in plan.filesystems)
        seen["var"] = (binds or {})["/var"].joinpath("marker").read_text()
        report = run_fixups(root, plan, T.Recorder(T.debian_effects(root)), logged.append)
        seen["fstab"] = (root / "etc/fstab").read_text()
        return report

    monkeypatch.setattr(OF, "run_fixups", recorded_commands)
    OF.fixup_disk(image)

    assert seen["mounts"] == ["/", "/var", SWAP]
    assert seen["var"] == "the /var filesystem\n"
    assert seen["fstab"] == (
        f"UUID={uuids[1]} / ext4 errors=remount-ro 0 1\n"
        f"UUID={uuids[2]} /var ext4 defaults 0 2\n"
        f"UUID={uuids[3]} none swap sw 0 0\n"
        "# rehost: not on the destination: /dev/xvdb1 /data ext4 defaults 0 2\n"
    )


def _parts() -> list[OF._Part]:
    return [
        OF._Part(1, "/dev/loop9p1", "ext4", T.ROOT_UUID, "", "", "83"),
        OF._Part(2, "/dev/loop9p2", "ext4", T.SRV_UUID, "", "", "83"),
        OF._Part(3, "/dev/loop9p3", SWAP, T.SWAP_OLD, "", "", "82"),
    ]


@pytest.mark.parametrize(
    ("root_spec", "spec", "number"),
    [
        ("/dev/sda1", "/dev/sda2", 2),
        ("/dev/vda1", "/dev/vda3", 3),
        ("/dev/hda1", "/dev/hda2", 2),
        ("/dev/nvme0n1p1", "/dev/nvme0n1p2", 2),
        ("/dev/mmcblk0p1", "/dev/mmcblk0p3", 3),
        ("/dev/xvda1", "/dev/xvdb2", None),  # another disk: not in the image
        ("/dev/nvme0n1p1", "/dev/nvme1n1p2", None),
        ("/dev/xvda3", "/dev/xvda2", None),  # the root is partition 1, not 3: names not trusted
        (f"UUID={T.ROOT_UUID}", "/dev/xvda2", None),  # which disk is unknown: no guess
        ("/dev/xvda1", "/dev/xvda7", None),  # no such partition
        ("/dev/mapper/vg-root", "/dev/mapper/vg-var", None),
    ],
)
def test_device_names_map_to_partitions_of_the_root_disk(
    root_spec: str, spec: str, number: int | None
) -> None:
    """A kernel name is a partition of the image only on the root entry's disk."""
    parts = _parts()
    fstype = SWAP if number == 3 else "ext4"
    entries = [(root_spec, "/", "ext4"), (spec, "/var" if fstype != SWAP else "none", fstype)]
    disk = OF._source_disk(entries, parts[0], lambda _msg: None)
    found = OF._by_device(spec, fstype, disk, parts)
    assert (found.number if found else None) == number


def test_a_swap_line_is_not_matched_to_a_filesystem() -> None:
    """/dev/xvda2 as swap where partition 2 holds ext4: no guess (and the reverse)."""
    parts = _parts()
    assert OF._by_device("/dev/xvda2", SWAP, "xvda", parts) is None
    assert OF._by_device("/dev/xvda3", "ext4", "xvda", parts) is None


def _fstab_ctx(tmp_path: Path, fstab: str) -> tuple[Context, list[str]]:
    root = tmp_path / "root"
    T.put(root, "/etc/fstab", fstab)
    lines: list[str] = []
    return Context(root, T.plan(), T.Recorder(), lines.append, FixupReport(), "fstab"), lines


def test_zram_swap_stays_and_source_swap_names_still_map(tmp_path: Path) -> None:
    """Only names of source disks fall back to the only migrated swap; zram stays as it is."""
    ctx, lines = _fstab_ctx(
        tmp_path,
        "/dev/zram0 none swap defaults,pri=100 0 0\n"
        "/dev/xvda9 none swap sw 0 0\n"
        "/dev/mapper/vg-swap none swap sw 0 0\n",
    )
    fix_fstab(ctx)
    assert T.read(ctx.root, "/etc/fstab") == (
        "/dev/zram0 none swap defaults,pri=100 0 0\n"
        f"UUID={T.SWAP_NEW} none swap sw 0 0\n"
        "# rehost: not on the destination: /dev/mapper/vg-swap none swap sw 0 0\n"
    )
    assert any("zram" in line for line in lines), lines


@pytest.mark.parametrize("mount", ["/var", "/usr", "/boot"])
def test_an_essential_mount_not_migrated_is_refused(tmp_path: Path, mount: str) -> None:
    """/var, /usr or /boot commented out would boot a broken system: refused, with a hint."""
    ctx, _ = _fstab_ctx(tmp_path, f"/dev/sdc1 {mount}/ ext4 defaults 0 2\n")
    before = T.read(ctx.root, "/etc/fstab")
    ctx.plan = FixupPlan(tuple(m for m in ctx.plan.filesystems if m.mount != mount))
    with pytest.raises(FixupFailed) as info:
        fix_fstab(ctx)
    assert info.value.code == "FIXUP_FAILED" and info.value.step == "fstab"
    assert f"/dev/sdc1 on {mount}/" in str(info.value)
    assert "UUID=" in (info.value.hint or "")
    assert T.read(ctx.root, "/etc/fstab") == before


def test_an_essential_mount_with_nofail_is_commented_out(tmp_path: Path) -> None:
    """nofail says the system boots without it: the usual not-on-the-destination comment."""
    ctx, _ = _fstab_ctx(tmp_path, "/dev/sdc1 /var ext4 defaults,nofail 0 2\n")
    fix_fstab(ctx)
    assert T.read(ctx.root, "/etc/fstab") == (
        "# rehost: not on the destination: /dev/sdc1 /var ext4 defaults,nofail 0 2\n"
    )
