"""The bootloader step's command-line fixes on the cases real distributions produce.

The trees and the recording runner come from test_fixup; each test regenerates the config the
way the distribution's tool does in a rescue system without udev (root=/dev/loopNpM) and
asserts the exact files that result.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import test_fixup as T
from rehost.online.fixup import FixupFailed, FixupPlan, FsIds, FsMap, run_fixups

PU = "5b1e2c3d-0a0b-4c4d-8e8f-9a9b9c9d9e9f"
K = T.DEB_KERNELS[1]


def partuuid_plan(dest_partuuid: str = PU) -> FixupPlan:
    """T.plan() with the root's partition UUID known on both sides."""
    fs = list(T.plan().filesystems)
    fs[0] = FsMap(
        "/",
        FsIds(T.ROOT_UUID, partuuid=PU, device="/dev/sda1"),
        FsIds(T.ROOT_UUID, partuuid=dest_partuuid, device="/dev/vda1"),
    )
    return FixupPlan(tuple(fs), boot_disk="/dev/vda")


def force_partuuid_cfg(else_root: str) -> str:
    """update-grub's entry with GRUB_FORCE_PARTUUID (Ubuntu cloud images)."""
    return (
        f"set partuuid={PU}\nmenuentry 'Ubuntu' {{\n"
        '\tif [ "${initrdfail}" = 1 ]; then\n'
        f"\t  linux\t/boot/vmlinuz-{K} root=/dev/loop3p1 ro\n"
        f"\t  initrd\t/boot/initrd.img-{K}\n"
        "\telse\n"
        f"\t  linux\t/boot/vmlinuz-{K} root={else_root} ro panic=-1\n"
        "\tfi\n\tinitrdfail\n}\n"
    )


def ubuntu_tree(root: Path, else_root: str) -> T.Recorder:
    T.debian_tree(root)
    T.put(root, "/etc/default/grub.d/40-force-partuuid.cfg", f"GRUB_FORCE_PARTUUID={PU}\n")
    cfg = force_partuuid_cfg(else_root)
    return T.Recorder({"update-grub": lambda argv: T.put(root, "/boot/grub/grub.cfg", cfg)})


def test_force_partuuid_branch_without_initrd_keeps_partuuid(tmp_path: Path) -> None:
    # The else branch boots with no initramfs: only the kernel resolves root=, and it cannot
    # resolve UUID=, so PARTUUID= must stay; the loop device in the other branch is fixed.
    root = tmp_path / "root"
    run_fixups(root, partuuid_plan(), ubuntu_tree(root, f"PARTUUID={PU}"))
    assert T.read(root, "/boot/grub/grub.cfg") == force_partuuid_cfg(f"PARTUUID={PU}").replace(
        "root=/dev/loop3p1", f"root=UUID={T.ROOT_UUID}"
    )
    again = run_fixups(root, partuuid_plan(), T.Recorder())
    assert again.changes == []


def test_only_partuuid_entries_pass_the_check(tmp_path: Path) -> None:
    root = tmp_path / "root"
    T.debian_tree(root)
    cfg = f"menuentry 'Ubuntu' {{\n\tlinux\t/boot/vmlinuz-{K} root=PARTUUID={PU} ro\n}}\n"
    run_fixups(
        root,
        partuuid_plan(),
        T.Recorder({"update-grub": lambda argv: T.put(root, "/boot/grub/grub.cfg", cfg)}),
    )
    assert T.read(root, "/boot/grub/grub.cfg") == cfg


def test_partuuid_the_destination_does_not_have_is_rewritten(tmp_path: Path) -> None:
    # The source's partition UUID changed on the destination: it names nothing any more.
    root = tmp_path / "root"
    other = "0d0d0d0d-1111-2222-3333-444444444444"
    run_fixups(root, partuuid_plan(dest_partuuid=other), ubuntu_tree(root, f"PARTUUID={PU}"))
    assert T.read(root, "/boot/grub/grub.cfg") == force_partuuid_cfg(f"UUID={T.ROOT_UUID}").replace(
        "root=/dev/loop3p1", f"root=UUID={T.ROOT_UUID}"
    )


def test_partuuid_of_another_filesystem_is_rewritten(tmp_path: Path) -> None:
    root = tmp_path / "root"
    fs = list(partuuid_plan().filesystems)
    srv = "7a7a7a7a-0000-1111-2222-333333333333"
    fs[3] = FsMap("/srv", FsIds(T.SRV_UUID, partuuid=srv), FsIds(T.SRV_UUID, partuuid=srv))
    run_fixups(
        root, FixupPlan(tuple(fs), boot_disk="/dev/vda"), ubuntu_tree(root, f"PARTUUID={srv}")
    )
    assert f"root=UUID={T.ROOT_UUID} ro panic=-1" in T.read(root, "/boot/grub/grub.cfg")


EL9_LOOP_CFG = (
    'set default=0\ninsmod blscfg\nset kernelopts="root=/dev/loop3p2 ro rhgb quiet "\nblscfg\n'
)
EL9_LOOP_CFG_DEFAULT = (
    "set default=0\n"
    'set default_kernelopts="root=/dev/loop3p2 ro resume=/dev/sdz9 rhgb quiet"\n'
    'if [ -z "${kernelopts}" ]; then\n'
    '  set kernelopts="root=/dev/loop3p2 ro resume=/dev/sdz9 rhgb quiet"\n'
    "fi\ninsmod blscfg\nblscfg\n"
)


@pytest.mark.parametrize("cfg_text", [EL9_LOOP_CFG, EL9_LOOP_CFG_DEFAULT])
def test_el9_kernelopts_and_kernel_cmdline_fixed(tmp_path: Path, cfg_text: str) -> None:
    # kernel-install builds the next kernel's BLS entry from /etc/kernel/cmdline: a loop device
    # left there breaks the boot after the next `dnf update kernel`.
    root = T.rocky9_tree(tmp_path / "root")
    for k in T.EL9_KERNELS:
        T.put(
            root,
            f"/boot/loader/entries/0123abcd-{k}.conf",
            T.bls_entry(k, f"root=UUID={T.ROOT_UUID} ro rhgb quiet"),
        )

    def mkconfig(argv: list[str]) -> None:
        T.put(root, argv[2], cfg_text)
        T.put(root, "/etc/kernel/cmdline", "root=/dev/loop3p2 ro resume=/dev/sdz9 rhgb quiet\n")

    run_fixups(root, T.plan(), T.Recorder({"grub2-mkconfig": mkconfig}))
    fixed = cfg_text.replace("root=/dev/loop3p2", f"root=UUID={T.ROOT_UUID}")
    assert T.read(root, "/boot/grub2/grub.cfg") == fixed.replace(" resume=/dev/sdz9", "")
    assert T.read(root, "/etc/kernel/cmdline") == f"root=UUID={T.ROOT_UUID} ro rhgb quiet\n"
    assert [p for p, text in T.snapshot(root).items() if "/dev/loop" in text] == []


def test_el9_stale_grubenv_kernelopts_fixed(tmp_path: Path) -> None:
    # Entries name root= themselves, but grubenv still carries kernelopts (an upgraded RHEL 8):
    # it is fixed too rather than left with the loop device.
    root = T.rocky9_tree(tmp_path / "root")
    env = "# GRUB Environment Block\nkernelopts=root=/dev/loop3p2 ro rhgb quiet \n"
    T.put(root, "/boot/grub2/grubenv", env + "#" * (1024 - len(env)))
    run_fixups(root, T.plan(), T.Recorder(T.el_effects(root, T.BLS_CFG)))
    fixed = f"# GRUB Environment Block\nkernelopts=root=UUID={T.ROOT_UUID} ro rhgb quiet \n"
    assert T.read(root, "/boot/grub2/grubenv") == fixed + "#" * (1024 - len(fixed))


def test_loop_device_left_anywhere_fails(tmp_path: Path) -> None:
    # A command line the step does not know how to rewrite must not pass as "ready to boot".
    root = T.debian_tree(tmp_path / "root")
    cfg = T.LOOP_GRUB_CFG + 'set extra_args="root=/dev/loop3p2 ro"\n'
    runner = T.Recorder({"update-grub": lambda argv: T.put(root, "/boot/grub/grub.cfg", cfg)})
    with pytest.raises(FixupFailed, match=r"grub\.cfg:9 still has root=/dev/loop3p2"):
        run_fixups(root, T.plan(), runner)


GRUB_D = "/etc/default/grub.d/50-extra.cfg"


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ("GRUB_CMDLINE_LINUX=root=/dev/sda1\n", f"GRUB_CMDLINE_LINUX=root=UUID={T.ROOT_UUID}\n"),
        (
            'GRUB_CMDLINE_LINUX+=" resume=/dev/sdz9"  # hibernate\n',
            'GRUB_CMDLINE_LINUX+=""  # hibernate\n',
        ),
        (
            'GRUB_CMDLINE_LINUX="console=ttyS0 \\\n  resume=/dev/sdz9 quiet"\nGRUB_TIMEOUT=1\n',
            'GRUB_CMDLINE_LINUX="console=ttyS0 quiet"\nGRUB_TIMEOUT=1\n',
        ),
        (
            "export GRUB_CMDLINE_LINUX_DEFAULT='quiet\n resume=/dev/sda3'\n",
            f"export GRUB_CMDLINE_LINUX_DEFAULT='quiet\n resume=UUID={T.SWAP_NEW}'\n",
        ),
        (  # nothing to fix: the continuation stays as written
            'GRUB_CMDLINE_LINUX="console=ttyS0 \\\n  quiet"\n',
            'GRUB_CMDLINE_LINUX="console=ttyS0 \\\n  quiet"\n',
        ),
    ],
    ids=["unquoted", "append", "continued", "single-quoted-multiline", "continued-unchanged"],
)
def test_default_grub_value_forms(tmp_path: Path, before: str, after: str) -> None:
    root = T.debian_tree(tmp_path / "root")
    T.put(root, GRUB_D, before)
    run_fixups(root, T.plan(), T.Recorder(T.debian_effects(root)))
    assert T.read(root, GRUB_D) == after


@pytest.mark.parametrize(
    "value",
    [
        'GRUB_CMDLINE_LINUX="$GRUB_CMDLINE_LINUX"" root=/dev/sda1"\n',
        "GRUB_CMDLINE_LINUX=$(cat /etc/cmdline) resume=/dev/sdz9\n",
    ],
)
def test_default_grub_unparsable_value_refused(tmp_path: Path, value: str) -> None:
    root = T.debian_tree(tmp_path / "root")
    T.put(root, GRUB_D, value)
    runner = T.Recorder(T.debian_effects(root))
    with pytest.raises(FixupFailed, match="cannot parse") as info:
        run_fixups(root, T.plan(), runner)
    assert info.value.step == "bootloader"
    assert T.read(root, GRUB_D) == value
    assert ["update-grub"] not in runner.commands
