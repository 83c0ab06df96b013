"""Boot fixups (rehost.online.fixup) on synthetic root trees, plus one real chroot.

The RHEL family cannot be installed here (only Debian's archive is reachable), and even a
Debian tree would need loop disks and minutes of grub and initramfs work, so the steps run on
small synthetic trees with a recording runner: the oracles are the exact resulting files and
the exact commands. One test runs the real chroot runner on the cached bookworm minbase tree to
prove the bind mounts appear inside and are gone afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from rehost.online.fixup import (
    SWAP,
    Chroot,
    FixupFailed,
    FixupPlan,
    FsIds,
    FsMap,
    Result,
    run_fixups,
)
from rootfs import bookworm_minbase

ROOT_UUID = "6f0cb2a4-4a52-4ac4-9c1e-3b1c1c8e2d10"
BOOT_UUID = "0b8e2e8e-60a7-4d53-8a7b-39b0ad9e1f22"
SRV_UUID = "e3a4c0de-9f4e-4a7e-b1c4-2b6a0a6f5c33"
SWAP_OLD = "11111111-2222-3333-4444-555555555555"
SWAP_NEW = "99999999-8888-7777-6666-555555555555"
ESP_UUID = "ABCD-1234"
SOURCE_IPS = ("203.0.113.10/24", "203.0.113.11/24")

DEB_KERNELS = ("6.1.0-17-cloud-amd64", "6.1.0-18-cloud-amd64")
EL9_KERNELS = ("5.14.0-284.11.1.el9_2.x86_64", "5.14.0-362.8.1.el9_3.x86_64")
VIRTIO = "virtio_blk virtio_scsi virtio_net virtio_pci"


def put(root: Path, path: str, text: str = "") -> Path:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return target


def executable(root: Path, path: str) -> Path:
    target = put(root, path, "#!/bin/sh\n")
    target.chmod(0o755)
    return target


def read(root: Path, path: str) -> str:
    return (root / path.lstrip("/")).read_text()


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_file():
                out[rel] = p.read_text(errors="replace")
    return out


class Recorder:
    """A runner that records argv and simulates what some commands write."""

    def __init__(
        self,
        effects: dict[str, Callable[[list[str]], object]] | None = None,
        fail: tuple[str, str] | None = None,
    ) -> None:
        self.commands: list[list[str]] = []
        self.effects = effects or {}
        self.fail = fail

    def __call__(self, argv: Sequence[str]) -> Result:
        cmd = list(argv)
        self.commands.append(cmd)
        if self.fail and cmd[0] == self.fail[0]:
            return Result(1, self.fail[1])
        if cmd[0] in self.effects:
            self.effects[cmd[0]](cmd)
        return Result(0, "")


def plan(firmware: str = "bios", nic: str = "") -> FixupPlan:
    def same(mount: str, uuid: str, src: str, dst: str, label: str = "") -> FsMap:
        return FsMap(mount, FsIds(uuid, label, device=src), FsIds(uuid, label, device=dst))

    filesystems = (
        same("/", ROOT_UUID, "/dev/sda1", "/dev/vda1"),
        same("/boot", BOOT_UUID, "/dev/sda2", "/dev/vda2", label="boot"),
        same("/boot/efi", ESP_UUID, "/dev/sda15", "/dev/vda15"),
        same("/srv", SRV_UUID, "/dev/xvdb1", "/dev/vdb1"),
        FsMap(SWAP, FsIds(SWAP_OLD, device="/dev/sda3"), FsIds(SWAP_NEW, device="/dev/vda3")),
    )
    return FixupPlan(
        filesystems,
        boot_disk="/dev/vda",
        firmware="uefi" if firmware == "uefi" else "bios",
        nic=nic,
        static_addresses=SOURCE_IPS,
    )


# -- the Debian-like tree ------------------------------------------------------------------

DEB_FSTAB = f"""\
# /etc/fstab: static file system information.
# <file system> <mount point>   <type>  <options>       <dump>  <pass>
/dev/sda1\t/\text4\terrors=remount-ro\t0\t1
LABEL=boot      /boot           ext4    defaults        0       2
UUID={ESP_UUID}  /boot/efi       vfat    umask=0077      0       1
/dev/xvdb1      /srv            ext4    defaults,nofail 0       2
UUID={SWAP_OLD} none swap sw 0 0
/dev/sdc1       /backup         ext4    defaults        0       2
/dev/sr0        /media/cdrom0   udf,iso9660 user,noauto 0       0
tmpfs           /tmp            tmpfs   defaults        0       0
"""

DEB_FSTAB_FIXED = f"""\
# /etc/fstab: static file system information.
# <file system> <mount point>   <type>  <options>       <dump>  <pass>
UUID={ROOT_UUID}\t/\text4\terrors=remount-ro\t0\t1
LABEL=boot      /boot           ext4    defaults        0       2
UUID={ESP_UUID}  /boot/efi       vfat    umask=0077      0       1
UUID={SRV_UUID}      /srv            ext4    defaults,nofail 0       2
UUID={SWAP_NEW} none swap sw 0 0
# rehost: not on the destination: /dev/sdc1       /backup         ext4    defaults        0       2
/dev/sr0        /media/cdrom0   udf,iso9660 user,noauto 0       0
tmpfs           /tmp            tmpfs   defaults        0       0
"""

DEB_GRUB = f"""\
GRUB_DEFAULT=0
GRUB_TIMEOUT=1
GRUB_DISTRIBUTOR=`lsb_release -i -s 2> /dev/null || echo Debian`
GRUB_CMDLINE_LINUX_DEFAULT="quiet resume=UUID={SWAP_OLD}"
GRUB_CMDLINE_LINUX="root=/dev/sda1 console=ttyS0,115200"
GRUB_TERMINAL=serial
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
"""

DEB_GRUB_FIXED = DEB_GRUB.replace(f"resume=UUID={SWAP_OLD}", f"resume=UUID={SWAP_NEW}").replace(
    "root=/dev/sda1", f"root=UUID={ROOT_UUID}"
)

# What update-grub writes in a rescue system without /dev/disk/by-uuid (../shared/NOTES.md).
LOOP_GRUB_CFG = f"""\
menuentry 'Debian GNU/Linux' --class debian {{
\tsearch --no-floppy --fs-uuid --set=root {BOOT_UUID}
\tlinux\t/vmlinuz-6.1.0-18-cloud-amd64 root=/dev/loop3p2 ro console=ttyS0,115200 quiet resume=UUID={SWAP_NEW}
\tinitrd\t/initrd.img-6.1.0-18-cloud-amd64
}}
menuentry 'Debian GNU/Linux, with Linux 6.1.0-17-cloud-amd64 (recovery mode)' {{
\tlinux\t/vmlinuz-6.1.0-17-cloud-amd64 root=/dev/loop3p2 ro single console=ttyS0,115200
}}
"""

INTERFACES = """\
# interfaces(5) file used by ifup(8) and ifdown(8)
source /etc/network/interfaces.d/*

auto lo
iface lo inet loopback

allow-hotplug eth0
iface eth0 inet static
\taddress 203.0.113.10/24
\tgateway 203.0.113.1
\tdns-nameservers 203.0.113.53
\tup ip addr add 203.0.113.11/24 dev eth0
\tup echo eth0 up
iface eth0 inet6 static
\taddress 2001:db8::10/64
"""

NETPLAN = """\
network:
  version: 2
  ethernets:
    eth0:
      match:
        macaddress: "52:54:00:12:34:56"
      set-name: eth0
      addresses:
        - 203.0.113.10/24
      routes:
        - to: default
          via: 203.0.113.1
      nameservers:
        addresses: [203.0.113.53]
    eth1:
      addresses: [10.0.0.5/24]
  bridges: {}
"""

NETPLAN_FIXED = """\
network:
  version: 2
  ethernets:
    eth0:
      match:
        name: "e*"
      dhcp4: true
    eth1:
      dhcp4: true
      optional: true
  bridges: {}
"""

PERSISTENT_NET = """\
# This file was automatically generated by the /lib/udev/write_net_rules
# program, run by the persistent-net-generator.rules rules file.

# PCI device 0x1af4:0x1000 (virtio-pci)
SUBSYSTEM=="net", ACTION=="add", DRIVERS=="?*", ATTR{address}=="52:54:00:12:34:56", ATTR{dev_id}=="0x0", ATTR{type}=="1", KERNEL=="eth*", NAME="eth0"
"""


def debian_tree(root: Path) -> Path:
    put(
        root,
        "/usr/lib/os-release",
        'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n',
    )
    (root / "etc").mkdir(parents=True)
    (root / "etc/os-release").symlink_to("/usr/lib/os-release")  # absolute: must stay in root
    (root / "lib").symlink_to("usr/lib")  # merged /usr
    put(root, "/etc/fstab", DEB_FSTAB)
    put(root, "/etc/default/grub", DEB_GRUB)
    put(
        root,
        "/etc/initramfs-tools/modules",
        "# List of modules\n# virtio_blk is not this one\nloop\n",
    )
    put(root, "/etc/initramfs-tools/conf.d/resume", f"RESUME=UUID={SWAP_OLD}\n")
    for k in DEB_KERNELS:
        put(root, f"/usr/lib/modules/{k}/modules.dep")
        put(root, f"/boot/vmlinuz-{k}", "kernel")
    put(root, f"/boot/initrd.img-{DEB_KERNELS[1]}", "initrd")
    put(root, "/usr/lib/modules/6.1.0-9-cloud-amd64/modules.dep")  # removed kernel's leftovers
    put(root, "/boot/grub/grub.cfg", "# the source's config\n")
    put(root, "/boot/efi/EFI/debian/grubx64.efi", "grub")
    put(root, "/etc/network/interfaces", INTERFACES)
    put(root, "/etc/netplan/50-cloud-init.yaml", NETPLAN)
    executable(root, "/usr/sbin/dhclient")  # isc-dhcp-client, for ifupdown
    executable(root, "/usr/lib/systemd/systemd-networkd")  # netplan's default renderer
    put(root, "/etc/udev/rules.d/70-persistent-net.rules", PERSISTENT_NET)
    (root / "etc/udev/rules.d/75-persistent-net-generator.rules").symlink_to("/dev/null")
    put(root, "/var/lib/cloud/instances/i-0abc/user-data.txt", "#cloud-config\n")
    (root / "var/lib/cloud/instance").symlink_to("/var/lib/cloud/instances/i-0abc")
    put(root, "/var/lib/cloud/sem/config_scripts_per_once.once", "")
    put(root, "/var/lib/cloud/data/instance-id", "i-0abc\n")
    put(root, "/var/lib/cloud/seed/nocloud/meta-data", "instance-id: i-0abc\n")
    put(root, "/etc/hostname", "web1\n")
    return root


def debian_effects(root: Path) -> dict[str, Callable[[list[str]], object]]:
    return {"update-grub": lambda argv: put(root, "/boot/grub/grub.cfg", LOOP_GRUB_CFG)}


def test_debian_bios_exact_files_and_commands(tmp_path: Path) -> None:
    root = debian_tree(tmp_path / "root")
    runner = Recorder(debian_effects(root))
    lines: list[str] = []
    report = run_fixups(root, plan(), runner, lines.append)

    assert report.distro == "Debian GNU/Linux 12 (bookworm)"
    assert read(root, "/etc/fstab") == DEB_FSTAB_FIXED
    assert read(root, "/etc/default/grub") == DEB_GRUB_FIXED
    assert read(root, "/boot/grub/grub.cfg") == LOOP_GRUB_CFG.replace(
        "root=/dev/loop3p2", f"root=UUID={ROOT_UUID}"
    )
    assert read(root, "/etc/initramfs-tools/modules") == (
        "# List of modules\n# virtio_blk is not this one\nloop\n"
        "# virtio drivers for the migrated system (added by rehost)\n"
        "virtio_blk\nvirtio_scsi\nvirtio_net\nvirtio_pci\n"
    )
    assert read(root, "/etc/initramfs-tools/conf.d/resume") == f"RESUME=UUID={SWAP_NEW}\n"
    assert read(root, "/etc/network/interfaces") == (
        "# interfaces(5) file used by ifup(8) and ifdown(8)\n"
        "source /etc/network/interfaces.d/*\n\n"
        "auto lo\niface lo inet loopback\n\n"
        "auto /e*/1=eth0\n"
        "iface eth0 inet dhcp\n"
        "\tup echo eth0 up\n"
        "iface eth0 inet6 auto\n"
    )
    assert read(root, "/etc/netplan/50-cloud-init.yaml") == NETPLAN_FIXED
    rules = root / "etc/udev/rules.d"
    assert sorted(p.name for p in rules.iterdir()) == ["75-persistent-net-generator.rules"]
    cloud = root / "var/lib/cloud"
    assert sorted(str(p.relative_to(cloud)) for p in cloud.rglob("*")) == [
        "data",
        "instances",
        "seed",
        "seed/nocloud",
        "seed/nocloud/meta-data",
        "sem",
    ]
    assert read(root, "/etc/hostname") == "web1\n"
    assert not (root / ".autorelabel").exists()
    assert (root / "etc/os-release").is_symlink()

    assert runner.commands == [
        ["update-initramfs", "-c", "-k", DEB_KERNELS[0]],
        ["update-initramfs", "-u", "-k", DEB_KERNELS[1]],
        ["grub-install", "--target=i386-pc", "/dev/vda"],
        ["update-grub"],
    ]
    assert report.commands == runner.commands
    # Each change is logged with its before and after lines.
    assert (
        f"fstab: /etc/fstab: /dev/sda1\t/\text4\terrors=remount-ro\t0\t1 -> UUID={ROOT_UUID}\t/\text4\terrors=remount-ro\t0\t1"
        in lines
    )
    assert any(c.step == "bootloader" and c.path == "/boot/grub/grub.cfg" for c in report.changes)
    assert {c.step for c in report.changes} == {
        "fstab",
        "network",
        "identity",
        "initramfs",
        "bootloader",
    }


def test_debian_uefi_and_known_nic(tmp_path: Path) -> None:
    root = debian_tree(tmp_path / "root")
    runner = Recorder(debian_effects(root))
    run_fixups(root, plan("uefi", nic="ens3"), runner)
    assert runner.commands[-2:] == [
        [
            "grub-install",
            "--target=x86_64-efi",
            "--efi-directory=/boot/efi",
            "--removable",
            "--no-nvram",
        ],
        ["update-grub"],
    ]
    assert read(root, "/etc/network/interfaces").endswith(
        "allow-hotplug ens3\niface ens3 inet dhcp\n\tup echo eth0 up\niface ens3 inet6 auto\n"
    )
    assert '        name: "ens3"\n' in read(root, "/etc/netplan/50-cloud-init.yaml")


def test_idempotent(tmp_path: Path) -> None:
    root = debian_tree(tmp_path / "root")
    run_fixups(root, plan(), Recorder(debian_effects(root)))
    after_first = snapshot(root)
    runner = Recorder()  # update-grub now writes nothing: the config stays as fixed
    second = run_fixups(root, plan(), runner)
    assert second.changes == []
    assert snapshot(root) == after_first
    assert runner.commands[-2:] == [
        ["grub-install", "--target=i386-pc", "/dev/vda"],
        ["update-grub"],
    ]


def test_failed_command_names_step_and_output(tmp_path: Path) -> None:
    root = debian_tree(tmp_path / "root")
    out = "grub-install: error: cannot find a GRUB drive for /dev/vda.\n"
    runner = Recorder(debian_effects(root), fail=("grub-install", out))
    with pytest.raises(FixupFailed) as info:
        run_fixups(root, plan(), runner)
    err = info.value
    assert err.code == "FIXUP_FAILED"
    assert err.step == "bootloader"
    assert err.output == out.strip()
    assert err.to_dict()["step"] == "bootloader"
    assert "`grub-install --target=i386-pc /dev/vda` exited 1" in err.reason
    assert runner.commands[-1] == ["grub-install", "--target=i386-pc", "/dev/vda"]


def test_grub_cfg_without_root_entry_fails(tmp_path: Path) -> None:
    root = debian_tree(tmp_path / "root")
    runner = Recorder({"update-grub": lambda argv: put(root, "/boot/grub/grub.cfg", "# empty\n")})
    with pytest.raises(FixupFailed, match="no kernel entry"):
        run_fixups(root, plan(), runner)


def test_encrypted_volumes_refused(tmp_path: Path) -> None:
    root = debian_tree(tmp_path / "root")
    put(
        root, "/etc/crypttab", "# <target> <source> <key> <options>\ncryptroot UUID=abc none luks\n"
    )
    with pytest.raises(FixupFailed) as info:
        run_fixups(root, plan(), Recorder())
    assert info.value.step == "fstab" and "cryptroot UUID=abc none luks" in info.value.reason
    assert read(root, "/etc/fstab") == DEB_FSTAB


def test_static_address_left_behind_fails(tmp_path: Path) -> None:
    root = debian_tree(tmp_path / "root")
    put(
        root,
        "/etc/network/interfaces.d/extra",
        "iface eth0:1 inet manual\n\tup ip addr add 203.0.113.10/32 dev lo label lo:1 || true\n",
    )
    ok = Recorder(debian_effects(root))
    # An `up` line in a stanza the step does not convert still carries the source's address.
    with pytest.raises(
        FixupFailed,
        match=r"interfaces.d/extra:2 still configures the source's address 203\.0\.113\.10/24",
    ):
        run_fixups(root, plan(), ok)


def _network_only(root: Path, keep: str) -> None:
    """Leave only one network system (`keep`) and no DHCP client in a synthetic tree."""
    systems = {
        "ifupdown": "etc/network",
        "netplan": "etc/netplan",
        "keyfiles": "etc/NetworkManager",
        "ifcfg": "etc/sysconfig/network-scripts",
    }
    for name, where in systems.items():
        if name != keep:
            shutil.rmtree(root / where, ignore_errors=True)
    for client in (
        "usr/sbin/dhclient",
        "usr/lib/systemd/systemd-networkd",
        "usr/sbin/NetworkManager",
    ):
        (root / client).unlink(missing_ok=True)


@pytest.mark.parametrize(
    ("system", "package"),
    [
        ("ifupdown", "isc-dhcp-client (or dhcpcd-base, or udhcpc)"),
        ("netplan", "systemd-networkd"),
        ("keyfiles", "NetworkManager (network-manager on Debian)"),
        ("ifcfg", "NetworkManager (or dhclient for the legacy network-scripts)"),
    ],
)
def test_dhcp_without_a_client_fails(tmp_path: Path, system: str, package: str) -> None:
    """The first NIC switched to DHCP, nothing to run DHCP with: the step fails before the
    initramfs and grub, naming the step and the package to install."""
    tree = rocky9_tree if system in ("keyfiles", "ifcfg") else debian_tree
    root = tree(tmp_path / "root")
    _network_only(root, system)
    runner = Recorder()
    with pytest.raises(FixupFailed) as info:
        run_fixups(root, plan(), runner)
    err = info.value
    assert err.code == "FIXUP_FAILED" and err.step == "network", err
    assert err.reason.startswith("network: the first NIC is set to DHCP in /etc/"), err.reason
    assert f"install {package}" in err.reason, err.reason
    assert err.hint is not None and package in err.hint
    assert runner.commands == []  # nothing after the network step ran
    # what the steps before it changed stays changed, and the error says what it was
    steps = {c["step"] for c in err.changes}
    assert "fstab" in steps and steps <= {"fstab", "network"}, err.changes
    assert err.to_dict()["changes"] == err.changes


DHCP_CLIENTS_OK = {
    "dhclient": {"/usr/sbin/dhclient": ""},
    "dhcpcd-base": {"/usr/sbin/dhcpcd": ""},
    "udhcpc (busybox)": {"/usr/bin/busybox": "", "/usr/sbin/udhcpc": "-> /usr/bin/busybox"},
}


@pytest.mark.parametrize("client", sorted(DHCP_CLIENTS_OK))
def test_ifupdown_dhcp_with_any_client_passes(tmp_path: Path, client: str) -> None:
    root = debian_tree(tmp_path / "root")
    _network_only(root, "ifupdown")
    for path, what in DHCP_CLIENTS_OK[client].items():
        if what.startswith("-> "):
            (root / path.lstrip("/")).symlink_to(what[3:])
        else:
            executable(root, path)
    run_fixups(root, plan(), Recorder(debian_effects(root)))
    assert "iface eth0 inet dhcp\n" in read(root, "/etc/network/interfaces")


def test_dhcp_client_must_be_a_runnable_file(tmp_path: Path) -> None:
    """A dangling udhcpc link (busybox removed) or a non-executable file is no client."""
    root = debian_tree(tmp_path / "root")
    _network_only(root, "ifupdown")
    (root / "usr/sbin/udhcpc").symlink_to("/usr/bin/busybox")
    put(root, "/usr/sbin/dhclient", "not executable")
    with pytest.raises(FixupFailed, match="no DHCP client for ifupdown"):
        run_fixups(root, plan(), Recorder(debian_effects(root)))


def test_no_dhcp_no_client_needed(tmp_path: Path) -> None:
    """A first NIC configured `manual` (brought up by something else) needs no DHCP client."""
    root = debian_tree(tmp_path / "root")
    _network_only(root, "ifupdown")
    put(
        root,
        "/etc/network/interfaces",
        "auto lo\niface lo inet loopback\n\niface eth0 inet manual\n",
    )
    run_fixups(root, plan(), Recorder(debian_effects(root)))


@pytest.mark.parametrize("installed", ["NetworkManager", "systemd-networkd"])
def test_netplan_renderer_network_manager_needs_it(tmp_path: Path, installed: str) -> None:
    root = debian_tree(tmp_path / "root")
    _network_only(root, "netplan")
    put(root, "/etc/netplan/01-network-manager-all.yaml", "network:\n  renderer: NetworkManager\n")
    daemon = {
        "NetworkManager": "/usr/sbin/NetworkManager",
        "systemd-networkd": "/usr/lib/systemd/systemd-networkd",
    }
    executable(root, daemon[installed])
    if installed == "NetworkManager":
        run_fixups(root, plan(), Recorder(debian_effects(root)))
        return
    with pytest.raises(FixupFailed, match="client for netplan with renderer NetworkManager"):
        run_fixups(root, plan(), Recorder(debian_effects(root)))


def test_unknown_distribution_refused(tmp_path: Path) -> None:
    put(tmp_path, "/etc/os-release", "ID=alpine\nVERSION_ID=3.19\n")
    with pytest.raises(FixupFailed) as info:
        run_fixups(tmp_path, plan(), Recorder())
    assert info.value.step == "distro"


# -- the RHEL-like trees -------------------------------------------------------------------

EL_FSTAB = f"""\
UUID={ROOT_UUID} /                       xfs     defaults        0 0
UUID={BOOT_UUID} /boot                   xfs     defaults        0 0
UUID={ESP_UUID}          /boot/efi               vfat    umask=0077,shortname=winnt 0 2
/dev/sda3 none swap defaults 0 0
"""

EL_GRUB = """\
GRUB_TIMEOUT=5
GRUB_DISTRIBUTOR="$(sed 's, release .*$,,g' /etc/system-release)"
GRUB_TERMINAL_OUTPUT="console"
GRUB_CMDLINE_LINUX="crashkernel=1G-4G:192M rhgb quiet resume=/dev/sda3 resume_offset=0"
GRUB_DISABLE_RECOVERY="true"
GRUB_ENABLE_BLSCFG=true
"""

IFCFG = """\
DEVICE=eth0
HWADDR=52:54:00:aa:bb:cc
BOOTPROTO=none
ONBOOT=no
IPADDR=203.0.113.10
PREFIX=24
GATEWAY=203.0.113.1
DNS1=203.0.113.53
TYPE=Ethernet
"""

KEYFILE = """\
[connection]
id=cloud
uuid=5fb06bd0-0bb0-7ffb-45f1-d6edd65f3e03
type=ethernet
interface-name=eth0

[ethernet]
mac-address=52:54:00:AA:BB:CC

[ipv4]
address1=203.0.113.10/24,203.0.113.1
dns=203.0.113.53;
method=manual

[ipv6]
addr-gen-mode=eui64
method=auto

[proxy]
"""


def bls_entry(kver: str, options: str) -> str:
    return (
        f"title Rocky Linux ({kver}) 9.3 (Blue Onyx)\nversion {kver}\nlinux /vmlinuz-{kver}\n"
        f"initrd /initramfs-{kver}.img $tuned_initrd\noptions {options}\ngrub_users $grub_users\n"
    )


def rocky9_tree(root: Path) -> Path:
    put(
        root,
        "/etc/os-release",
        'NAME="Rocky Linux"\nVERSION_ID="9.3"\nID="rocky"\nID_LIKE="rhel centos fedora"\nPRETTY_NAME="Rocky Linux 9.3 (Blue Onyx)"\n',
    )
    put(root, "/etc/fstab", EL_FSTAB)
    put(root, "/etc/default/grub", EL_GRUB)
    for k in EL9_KERNELS:
        put(root, f"/lib/modules/{k}/vmlinuz", "kernel")
        put(root, f"/boot/vmlinuz-{k}", "kernel")
        put(
            root,
            f"/boot/loader/entries/0123abcd-{k}.conf",
            bls_entry(k, "root=/dev/xvda2 ro crashkernel=1G-4G:192M resume=/dev/sda3 rhgb quiet"),
        )
    put(root, "/etc/sysconfig/network-scripts/ifcfg-eth0", IFCFG)
    put(root, "/etc/sysconfig/network-scripts/ifcfg-lo", "DEVICE=lo\nIPADDR=127.0.0.1\n")
    put(root, "/etc/NetworkManager/system-connections/cloud.nmconnection", KEYFILE).chmod(0o600)
    executable(root, "/usr/sbin/NetworkManager")
    put(root, "/etc/selinux/config", "SELINUX=enforcing\nSELINUXTYPE=targeted\n")
    put(root, "/boot/efi/EFI/rocky/shimx64.efi", "shim")
    put(root, "/boot/efi/EFI/rocky/grubx64.efi", "grub")
    put(
        root,
        "/boot/efi/EFI/rocky/grub.cfg",
        "search --no-floppy --fs-uuid --set=dev x\nset prefix=($dev)/grub2\nconfigfile $prefix/grub.cfg\n",
    )
    return root


def el_effects(root: Path, cfg_text: str) -> dict[str, Callable[[list[str]], object]]:
    return {"grub2-mkconfig": lambda argv: put(root, argv[2], cfg_text)}


BLS_CFG = "set default=0\nblscfg\n"


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_rocky9_exact_files_and_commands(tmp_path: Path, firmware: str) -> None:
    root = rocky9_tree(tmp_path / "root")
    runner = Recorder(el_effects(root, BLS_CFG))
    report = run_fixups(root, plan(firmware), runner)

    assert report.distro == "Rocky Linux 9.3 (Blue Onyx)"
    assert read(root, "/etc/fstab") == EL_FSTAB.replace("/dev/sda3", f"UUID={SWAP_NEW}")
    assert read(root, "/etc/default/grub") == EL_GRUB.replace(
        "resume=/dev/sda3 resume_offset=0", f"resume=UUID={SWAP_NEW} resume_offset=0"
    )
    for k in EL9_KERNELS:
        assert read(root, f"/boot/loader/entries/0123abcd-{k}.conf") == bls_entry(
            k, f"root=UUID={ROOT_UUID} ro crashkernel=1G-4G:192M resume=UUID={SWAP_NEW} rhgb quiet"
        )
    assert read(root, "/etc/sysconfig/network-scripts/ifcfg-eth0") == (
        "DEVICE=eth0\nBOOTPROTO=dhcp\nONBOOT=yes\nTYPE=Ethernet\n"
    )
    assert read(root, "/etc/sysconfig/network-scripts/ifcfg-lo") == "DEVICE=lo\nIPADDR=127.0.0.1\n"
    keyfile = root / "etc/NetworkManager/system-connections/cloud.nmconnection"
    assert keyfile.read_text() == (
        "[connection]\nid=cloud\nuuid=5fb06bd0-0bb0-7ffb-45f1-d6edd65f3e03\ntype=ethernet\n\n"
        "[ethernet]\n\n[ipv4]\nmethod=auto\n\n[ipv6]\naddr-gen-mode=eui64\nmethod=auto\n\n[proxy]\n"
    )
    assert keyfile.stat().st_mode & 0o777 == 0o600  # NetworkManager ignores group-readable keyfiles
    assert (root / ".autorelabel").read_text() == ""
    assert read(root, "/boot/grub2/grub.cfg") == BLS_CFG

    dracut = [
        ["dracut", "-f", "--add-drivers", VIRTIO, f"/boot/initramfs-{k}.img", k]
        for k in EL9_KERNELS
    ]
    if firmware == "bios":
        assert runner.commands == [
            *dracut,
            ["grub2-install", "--target=i386-pc", "/dev/vda"],
            ["grub2-mkconfig", "-o", "/boot/grub2/grub.cfg"],
        ]
        assert not (root / "boot/efi/EFI/BOOT").exists()
    else:
        assert runner.commands == [*dracut, ["grub2-mkconfig", "-o", "/boot/grub2/grub.cfg"]]
        assert read(root, "/boot/efi/EFI/BOOT/BOOTX64.EFI") == "shim"
        assert read(root, "/boot/efi/EFI/BOOT/grubx64.efi") == "grub"
    second = run_fixups(root, plan(firmware), Recorder(el_effects(root, BLS_CFG)))
    assert second.changes == []


def test_rocky8_kernelopts_in_grubenv(tmp_path: Path) -> None:
    root = rocky9_tree(tmp_path / "root")
    for k in EL9_KERNELS:
        put(
            root,
            f"/boot/loader/entries/0123abcd-{k}.conf",
            bls_entry(k, "$kernelopts $tuned_params"),
        )
    env = "# GRUB Environment Block\nkernelopts=root=/dev/loop3p2 ro resume=/dev/sdz9 rhgb quiet \nsaved_entry=x\n"
    put(root, "/boot/grub2/grubenv", env + "#" * (1024 - len(env)))
    run_fixups(root, plan(), Recorder(el_effects(root, BLS_CFG)))
    fixed = f"# GRUB Environment Block\nkernelopts=root=UUID={ROOT_UUID} ro rhgb quiet \nsaved_entry=x\n"
    assert read(root, "/boot/grub2/grubenv") == fixed + "#" * (1024 - len(fixed))


def test_centos7_uefi_config_in_esp(tmp_path: Path) -> None:
    root = tmp_path / "root"
    put(
        root,
        "/etc/os-release",
        'NAME="CentOS Linux"\nVERSION_ID="7"\nID="centos"\nID_LIKE="rhel fedora"\nPRETTY_NAME="CentOS Linux 7 (Core)"\n',
    )
    put(root, "/etc/fstab", EL_FSTAB)
    put(root, "/etc/default/grub", 'GRUB_CMDLINE_LINUX="crashkernel=auto rhgb quiet"\n')
    kver = "3.10.0-1160.el7.x86_64"
    put(root, f"/lib/modules/{kver}/modules.dep")
    put(root, f"/boot/vmlinuz-{kver}", "kernel")
    put(root, "/boot/efi/EFI/centos/shimx64.efi", "shim")
    put(root, "/boot/efi/EFI/centos/grubx64.efi", "grub")
    put(root, "/boot/efi/EFI/centos/grub.cfg", "### the source's full config\n")
    put(root, "/boot/efi/EFI/BOOT/BOOTX64.EFI", "shim from the shim package")
    put(root, "/etc/sysconfig/network-scripts/ifcfg-eth0", IFCFG)
    executable(root, "/usr/sbin/dhclient")  # network-scripts, no NetworkManager
    (root / "sbin").symlink_to("usr/sbin")
    cfg = (
        "menuentry 'CentOS Linux (3.10.0-1160.el7.x86_64) 7 (Core)' {\n"
        f"\tlinuxefi /vmlinuz-{kver} root=/dev/loop3p2 ro crashkernel=auto rhgb quiet\n"
        f"\tinitrdefi /initramfs-{kver}.img\n}}\n"
    )
    runner = Recorder(el_effects(root, cfg))
    run_fixups(root, plan("uefi", nic="eth0"), runner)
    assert runner.commands == [
        ["dracut", "-f", "--add-drivers", VIRTIO, f"/boot/initramfs-{kver}.img", kver],
        ["grub2-mkconfig", "-o", "/boot/efi/EFI/centos/grub.cfg"],
    ]
    assert read(root, "/boot/efi/EFI/centos/grub.cfg") == cfg.replace(
        "root=/dev/loop3p2", f"root=UUID={ROOT_UUID}"
    )
    assert read(root, "/boot/efi/EFI/BOOT/BOOTX64.EFI") == "shim from the shim package"
    assert read(root, "/boot/efi/EFI/BOOT/grubx64.efi") == "grub"
    assert not (root / ".autorelabel").exists()


# -- the real chroot -----------------------------------------------------------------------


def _mounts_under(root: Path) -> list[str]:
    return [ln for ln in Path("/proc/self/mounts").read_text().splitlines() if f" {root}" in ln]


def _chroot_tree(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the minbase tree, and a directory to bind as its /boot."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    root = tmp_path / "root"
    subprocess.run(["cp", "-a", "--reflink=auto", str(bookworm_minbase()), str(root)], check=True)
    boot = tmp_path / "bootfs"
    put(boot, "/marker", "the boot filesystem\n")
    return root, boot


def test_chroot_binds_and_cleans_up(tmp_path: Path) -> None:
    root, boot = _chroot_tree(tmp_path)
    logged: list[str] = []
    with Chroot(root, {"/boot": boot}, log=logged.append) as run:
        assert run(["true"]) == Result(0, "")
        mounts = run(["cat", "/proc/self/mounts"]).output.splitlines()
        points = {ln.split()[1] for ln in mounts}
        assert {"/dev", "/proc", "/sys", "/boot"} <= points
        assert run(["cat", "/boot/marker"]).output == "the boot filesystem\n"
        assert run(["sh", "-c", "echo oops >&2; exit 3"]) == Result(3, "oops\n")
        assert _mounts_under(root) != []
    assert _mounts_under(root) == []
    assert not (root / "boot/marker").exists()
    assert "chroot: $ true" in logged and "chroot: bound /dev at /dev" in logged
    shutil.rmtree(root)


def _ends(pid: int, within: float) -> bool:
    """Whether the process is gone (or a zombie) within `within` seconds: a killed process
    closes its files before its state says so."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_a_timed_out_chroot_command_ends_with_everything_it_started(tmp_path: Path) -> None:
    """The timeout killed only `chroot`: what it had started (dracut's children, here a
    sleep) went on running in the migrated system after the step failed, and kept /dev bound
    in it busy, so the binds needed a lazy unmount."""
    root, boot = _chroot_tree(tmp_path)
    logged: list[str] = []
    with Chroot(root, {"/boot": boot}, log=logged.append, timeout=2) as run:
        res = run(["sh", "-c", "cd /dev && sleep 300 & echo $! > /child; echo started; wait"])
        child = int((root / "child").read_text())
        assert res == Result(124, "started\ntimed out after 2 s")
        assert _ends(child, within=10)
    assert _mounts_under(root) == []
    assert not [line for line in logged if "unmount failed" in line], logged
    shutil.rmtree(root)


# Run in a namespace whose mounts are shared, as on a systemd rescue system (this host's are
# private): a mount the host makes under /dev while the fixups run, and how the chroot's
# bind of /dev is unmounted.
_SHARED_DEV = """
import os, subprocess, sys
from pathlib import Path
from rehost.online.fixup.chroot import Chroot
root = Path(sys.argv[1])
subprocess.run(["mount", "--make-rshared", "/"], check=True)
logged = []
point = Path("/dev/rehost-test-%d" % os.getpid())  # /dev is the host's devtmpfs
point.mkdir()
try:
    with Chroot(root, {}, log=logged.append) as run:
        subprocess.run(["mount", "-t", "tmpfs", "none", point], check=True)
        print("seen inside:", f" {point} " in run(["cat", "/proc/self/mounts"]).output)
    mounts = Path("/proc/self/mounts").read_text()
    print("host keeps it:", f" {point} " in mounts)
finally:
    subprocess.run(["umount", point])
    point.rmdir()
print("root clear:", f" {root}/" not in mounts)
print("unmount failed:", any("unmount failed" in line for line in logged))
"""


def test_the_chroot_binds_stay_apart_from_the_hosts_mounts(tmp_path: Path) -> None:
    """On a system whose mounts are shared (systemd's default), a bind of /dev joined the
    host's peer group: a mount the host made under /dev meanwhile appeared in the chroot, kept
    its bind busy, and the lazy unmount that followed took the host's mount away too. The
    binds are private now."""
    root, _ = _chroot_tree(tmp_path)
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", _SHARED_DEV, root],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.stdout.splitlines() == [
        "seen inside: False", "host keeps it: True", "root clear: True", "unmount failed: False"
    ], done.stdout + done.stderr  # fmt: skip
    shutil.rmtree(root)


def test_a_chroot_clears_what_an_interrupted_one_left_bound(tmp_path: Path) -> None:
    """A receiver killed during the fixups leaves /dev, /proc, /sys and /boot bound in the
    migrated root. The next finalize bound over them, removed only its own layer, and its
    unmount of the root then failed (target is busy), every time. Here the leftovers are
    made as a killed run leaves them: binds, without the process."""
    from rehost.mountinfo import mounted_below
    from rehost.online.receiver import disks

    root, boot = _chroot_tree(tmp_path)
    try:
        for inside, source in (("boot", boot), ("dev", Path("/dev")), ("proc", Path("/proc"))):
            subprocess.run(["mount", "--bind", str(source), str(root / inside)], check=True)
        logged: list[str] = []
        with Chroot(root, {"/boot": boot}, log=logged.append) as run:
            assert run(["cat", "/boot/marker"]).output == "the boot filesystem\n"
        assert mounted_below(root) == []
        assert f"chroot: unmounted what an earlier run left at {root}/dev" in logged
        # and the receiver's own unmount takes a mount with leftovers below it
        mnt = tmp_path / "state" / "mnt" / "root"  # where prepare mounts the root
        mnt.mkdir(parents=True)
        subprocess.run(["mount", "--bind", str(root), str(mnt)], check=True)
        subprocess.run(["mount", "--bind", "/proc", str(mnt / "proc")], check=True)
        disks.finalize(tmp_path / "state")
        assert mounted_below(mnt) == []
    finally:
        for point in sorted(mounted_below(tmp_path), reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)
    shutil.rmtree(root)
