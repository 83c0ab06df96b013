"""Let the destination take its own identity, and relabel where SELinux enforces.

cloud-init keys its per-instance work (SSH host keys, network config, user data) on the
instance id it remembers in /var/lib/cloud; a copied instance state would make the destination
believe it is the source, so that state is removed and cloud-init treats the first boot as
a new instance. The hostname is kept: it is the user's, not the platform's.

The transfer carries security.selinux labels, but files the fixups rewrote or regenerated
(fstab, the initramfs, grub.cfg) may be labelled wrongly, and an enforcing system denies access
to them; /.autorelabel makes the first boot relabel everything.
"""

from __future__ import annotations

import re

from rehost.online.fixup.common import Context

CLOUD = "/var/lib/cloud"


def fix_identity(ctx: Context) -> None:
    for sub in ("instances", "sem", "data"):
        host = ctx.path(f"{CLOUD}/{sub}")
        if host.is_dir():
            for child in sorted(host.iterdir()):
                ctx.remove(f"{CLOUD}/{sub}/{child.name}")
    ctx.remove(f"{CLOUD}/instance")
    config = ctx.read("/etc/selinux/config") or ""
    enforcing = re.search(r"(?m)^\s*SELINUX\s*=\s*[\"']?enforcing\b", config)
    if enforcing and not ctx.path("/.autorelabel").exists():
        ctx.write("/.autorelabel", "")
