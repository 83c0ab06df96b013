"""Which family the migrated system belongs to, from its own /etc/os-release.

The two families differ in every tool the fixups use (grub-install vs grub2-install,
update-initramfs vs dracut, /boot/grub vs /boot/grub2), so each step branches on the family
only, never on the version. A system that is neither is refused rather than guessed at.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Literal

from rehost.online.fixup.common import Context

Family = Literal["debian", "rhel"]
DEBIAN_IDS = {"debian", "ubuntu"}
RHEL_IDS = {"rhel", "centos", "rocky", "almalinux", "ol", "fedora", "cloudlinux"}


@dataclass(frozen=True)
class Distro:
    family: Family
    id: str
    version: str
    name: str

    @property
    def grub(self) -> str:
        """The prefix of grub's tools and directories: grub-install / grub2-install."""
        return "grub" if self.family == "debian" else "grub2"


def parse_os_release(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key and not key.startswith("#"):
            words = shlex.split(value, comments=False)
            fields[key] = words[0] if words else ""
    return fields


def detect(ctx: Context) -> Distro:
    text = ctx.read("/etc/os-release") or ctx.read("/usr/lib/os-release")
    if text is None:
        raise ctx.fail("neither /etc/os-release nor /usr/lib/os-release exists in the root")
    fields = parse_os_release(text)
    ident = fields.get("ID", "").lower()
    like = set(fields.get("ID_LIKE", "").lower().split())
    name = fields.get("PRETTY_NAME") or f"{ident} {fields.get('VERSION_ID', '')}".strip()
    family: Family
    if ident in DEBIAN_IDS or like & DEBIAN_IDS:
        family = "debian"
    elif ident in RHEL_IDS or like & RHEL_IDS:
        family = "rhel"
    else:
        raise ctx.fail(
            f"unsupported distribution {name!r} (ID={ident}, ID_LIKE={' '.join(sorted(like))})",
            hint="rehost fixes up the Debian family (Debian, Ubuntu) and the RHEL family "
            "(RHEL, CentOS, Rocky, AlmaLinux, Oracle Linux, Fedora)",
        )
    return Distro(family, ident, fields.get("VERSION_ID", ""), name)
