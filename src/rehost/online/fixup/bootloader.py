"""Make grub find and boot the migrated root on the destination's firmware.

Three things go wrong when a system moves: the kernel command line names the old root or
resume device, the boot code on the disk is the source's (or absent: a file-level copy carries
no MBR), and the firmware differs. So:

1. `root=` and `resume=` are rewritten in /etc/default/grub and /etc/default/grub.d/*.cfg;
   `root=` becomes UUID= of the destination's root, `resume=` the destination's swap, or is
   dropped (with `resume_offset=`) when no migrated swap matches, because a missing resume
   device stalls the initramfs. One that already names the right filesystem by an identifier
   the destination keeps (UUID=, LABEL=, PARTUUID=) stays: Ubuntu's GRUB_FORCE_PARTUUID entry
   boots root=PARTUUID= without an initramfs, and the kernel alone cannot resolve UUID=.
2. grub is installed for the destination's firmware: BIOS `grub-install --target=i386-pc DISK`
   (grub2-install on the RHEL family); UEFI `grub-install --removable --no-nvram` into the ESP
   on Debian, so the firmware boots it from the fallback path with no NVRAM entry. RHEL's
   signed shim and grub are not installed by grub2-install; their files under ESP/EFI/<vendor>
   are copied to the fallback path EFI/BOOT instead (grub still reads its config from the
   vendor directory, which its image names).
3. The config is regenerated (update-grub, grub2-mkconfig) and then checked: without
   /dev/disk/by-uuid (no udev in a rescue system) grub-mkconfig writes `root=/dev/loopNpM` or
   whatever the rescue system calls the disk. Every kernel command line (grub.cfg `linux`
   lines and `set kernelopts=`, BLS entries' `options`, /etc/kernel/cmdline that kernel-install
   builds new kernels' entries from, `kernelopts` in grubenv) is rewritten directly rather than
   through grubby, so the result is the same on every run and testable. No root=/dev/loop* may
   remain in those files, and at least one entry must boot the root by a stable identifier, or
   the step fails.

The console settings are left alone: the destination keeps the source's.
"""

from __future__ import annotations

import functools
import re

from rehost.online.fixup.common import Context
from rehost.online.fixup.distro import Distro

# A GRUB_CMDLINE_LINUX[_DEFAULT] assignment (`=` or `+=`) whose value is one double-quoted
# string (backslash-newline continuations included), one single-quoted string, or one unquoted
# word, followed only by blanks and a comment. Anything else naming root=/resume= is refused.
CMDLINE_VAR = re.compile(
    r"^(?P<lead>[ \t]*(?:export[ \t]+)?GRUB_CMDLINE_LINUX(?:_DEFAULT)?\+?=)"
    r"(?:\"(?P<dq>(?:[^\"\\]|\\.)*)\"|'(?P<sq>[^']*)'|(?P<bare>[^\s\"'\\;&|<>()#`$]*))"
    r"(?P<tail>[ \t]*(?:\#[^\n]*)?)$",
    re.M | re.S,
)
CMDLINE_ASSIGN = re.compile(
    r"^[ \t]*(?:export[ \t]+)?GRUB_CMDLINE_LINUX(?:_DEFAULT)?\+?=(?:[^\n]*\\\n)*[^\n]*", re.M
)
LINUX_LINE = re.compile(r"^(\s*linux(?:16|efi)?\s+\S+)(.*)$")
BLS_OPTIONS = re.compile(r"^(\s*options\s+)(.*)$")
# grub2-mkconfig (RHEL 8/9) also writes the fallback command line into grub.cfg.
KERNELOPTS_SET = re.compile(r"^(\s*set\s+(?:default_)?kernelopts=[\"']?)(.*?)([\"']?\s*)$")
KERNEL_ARG = re.compile(r"(^|\s+)(root|resume|resume_offset)=(\S*)")
STALE_DEVICE = re.compile(r"(?<![\w.-])(?:root|resume)=/dev/loop\S*")
KERNEL_CMDLINE = "/etc/kernel/cmdline"
GRUBENV_SIZE = 1024
EFI_FALLBACK = "EFI/BOOT/BOOTX64.EFI"


def _names_root(ctx: Context, value: str) -> bool:
    """Whether `value` names the destination's root by an identifier it keeps.

    A PARTUUID= must stay as it is: the else branch of Ubuntu's GRUB_FORCE_PARTUUID entry boots
    without an initramfs, and only the kernel itself resolves it (it cannot resolve UUID=).
    """
    found = ctx.plan.lookup(value)
    return found is not None and found[1] and found[0] == ctx.plan.root


def fix_cmdline(ctx: Context, args: str) -> str:
    """`args` with root= naming the destination's root and resume= its swap (or dropped).

    A root= or resume= that already names the right filesystem by a stable identifier (UUID=,
    LABEL=, PARTUUID= the destination keeps) is left as it is.
    """
    root = ctx.plan.root
    assert root is not None  # run_fixups checks the plan first
    resume = None
    for m in KERNEL_ARG.finditer(args):
        if m.group(2) == "resume":
            found = ctx.plan.lookup(m.group(3))
            if found and found[0] in ctx.plan.swaps:
                resume = m.group(3) if found[1] else found[0].dest.spec()

    def replace(m: re.Match[str]) -> str:
        lead, key, value = m.groups()
        if key == "root":
            keep = _names_root(ctx, value)
            return m.group(0) if keep else f"{lead}root={root.dest.spec()}"
        if resume is None:
            return ""
        return f"{lead}resume={resume}" if key == "resume" else m.group(0)

    fixed = KERNEL_ARG.sub(replace, args)
    return fixed if args[:1].isspace() else fixed.lstrip()


def _fix_assignment(ctx: Context, path: str, m: re.Match[str]) -> str:
    """One GRUB_CMDLINE_LINUX* assignment with its value fixed (the text unchanged if fine)."""
    if m.group("dq") is not None:
        # A backslash-newline inside double quotes is removed by the shell: fix the value the
        # shell sees, and write it back on one line only if it changes.
        value = re.sub(r"\\\n", "", m.group("dq"))
        fixed = fix_cmdline(ctx, value)
        if fixed == value:
            return m.group(0)
        if (len(fixed) - len(fixed.rstrip("\\"))) % 2:
            raise ctx.fail(f"cannot rewrite {m.group(0)!r} in {path}: it would end in a backslash")
        return f'{m.group("lead")}"{fixed}"{m.group("tail")}'
    if m.group("sq") is not None:
        return f"{m.group('lead')}'{fix_cmdline(ctx, m.group('sq'))}'{m.group('tail')}"
    return f"{m.group('lead')}{fix_cmdline(ctx, m.group('bare'))}{m.group('tail')}"


def grub_defaults(ctx: Context) -> list[str]:
    """The files update-grub takes GRUB_CMDLINE_LINUX* from."""
    return ["/etc/default/grub", *ctx.listdir("/etc/default/grub.d", ".cfg")]


def _fix_default_grub(ctx: Context) -> None:
    """Fix root=/resume= in the GRUB_CMDLINE_LINUX* that update-grub puts on every entry.

    A stale value left here comes back with the next kernel update, so an assignment whose
    value cannot be parsed (concatenations, command substitutions) but names root= or resume=
    is refused rather than left alone.
    """
    for path in grub_defaults(ctx):
        text = ctx.read(path)
        if text is None:
            continue
        parsed = {m.start() for m in CMDLINE_VAR.finditer(text)}
        for m in CMDLINE_ASSIGN.finditer(text):
            if m.start() not in parsed and re.search(r"\b(?:root|resume)=", m.group(0)):
                raise ctx.fail(
                    f"cannot parse {m.group(0)!r} in {path}",
                    hint="write the value as one quoted string on one line and run again",
                )
        ctx.write(path, CMDLINE_VAR.sub(functools.partial(_fix_assignment, ctx, path), text))


def _vendor_dir(ctx: Context, distro: Distro) -> str:
    """ESP/EFI/<vendor>: the RHEL family's shim and grub (the one named after the distro first)."""
    efi = f"{ctx.plan.esp.rstrip('/')}/EFI"
    host = ctx.path(efi)
    names = sorted(p.name for p in host.iterdir() if p.is_dir()) if host.is_dir() else []
    candidates = [
        n
        for n in names
        if n.upper() != "BOOT"
        and any(ctx.path(f"{efi}/{n}/{f}").is_file() for f in ("shimx64.efi", "grubx64.efi"))
    ]
    preferred = {"rhel": "redhat", "ol": "redhat"}.get(distro.id, distro.id)
    candidates.sort(key=lambda n: n.lower() != preferred)
    if not candidates:
        raise ctx.fail(
            f"no shimx64.efi or grubx64.efi under {efi}/*",
            hint="install shim-x64 and grub2-efi-x64 on the source, or migrate to a BIOS server",
        )
    return f"{efi}/{candidates[0]}"


def _install(ctx: Context, distro: Distro) -> None:
    plan = ctx.plan
    if plan.firmware == "bios":
        if not plan.boot_disk:
            raise ctx.fail("the plan names no boot disk to install grub to")
        ctx.run(f"{distro.grub}-install", "--target=i386-pc", plan.boot_disk)
        return
    if not ctx.path(plan.esp).is_dir():
        raise ctx.fail(f"the ESP {plan.esp} is not in the migrated root")
    if distro.family == "debian":
        ctx.run(
            "grub-install",
            "--target=x86_64-efi",
            f"--efi-directory={plan.esp}",
            "--removable",
            "--no-nvram",
        )
        return
    vendor = _vendor_dir(ctx, distro)
    boot = f"{plan.esp.rstrip('/')}/{EFI_FALLBACK}"
    shim = f"{vendor}/shimx64.efi"
    first = shim if ctx.path(shim).is_file() else f"{vendor}/grubx64.efi"
    if not ctx.path(boot).is_file():
        ctx.copy(first, boot)
    if first == shim:  # shim loads grubx64.efi from its own directory
        grub = f"{plan.esp.rstrip('/')}/EFI/BOOT/grubx64.efi"
        if not ctx.path(grub).is_file():
            ctx.copy(f"{vendor}/grubx64.efi", grub)


def _config_path(ctx: Context, distro: Distro) -> str:
    if distro.family == "debian":
        return "/boot/grub/grub.cfg"
    if ctx.plan.firmware == "uefi":
        # RHEL 7/8 keep the real config in the ESP; RHEL 9 leaves a stub there that loads
        # /boot/grub2/grub.cfg (and its grub2-mkconfig refuses to overwrite the stub).
        efi_cfg = f"{_vendor_dir(ctx, distro)}/grub.cfg"
        text = ctx.read(efi_cfg)
        if text is not None and "configfile" not in text:
            return efi_cfg
    return "/boot/grub2/grub.cfg"


def _regenerate(ctx: Context, distro: Distro) -> str:
    cfg = _config_path(ctx, distro)
    if distro.family == "debian":
        ctx.run("update-grub")
    else:
        ctx.run("grub2-mkconfig", "-o", cfg)
    if ctx.read(cfg) is None:
        raise ctx.fail(f"{cfg} does not exist after regenerating it")
    return cfg


def _fix_lines(ctx: Context, path: str, pattern: re.Pattern[str]) -> list[str]:
    """Rewrite the command lines `pattern` finds in `path`; their fixed argument strings.

    Group 2 of `pattern` is the command line; what follows it on the line is kept.
    """
    text = ctx.read(path) or ""
    found: list[str] = []
    lines = []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\n")
        m = pattern.match(body)
        if m:
            args = fix_cmdline(ctx, m.group(2))
            found.append(args)
            line = m.group(1) + args + line[m.end(2) :]
        lines.append(line)
    ctx.write(path, "".join(lines))
    return found


def _fix_grubenv(ctx: Context, path: str) -> list[str]:
    """RHEL 8 BLS entries say `options $kernelopts`; the value lives in grubenv at `path`."""
    text = ctx.read(path)
    if text is None:
        raise ctx.fail(f"BLS entries use $kernelopts but {path} is missing")
    body = text.rstrip("#")
    found: list[str] = []
    lines = []
    for line in body.splitlines(keepends=True):
        key, sep, value = line.rstrip("\n").partition("=")
        if sep and key == "kernelopts":
            value = fix_cmdline(ctx, value)
            found.append(value)
            line = f"kernelopts={value}\n"
        lines.append(line)
    new = "".join(lines)
    if len(new.encode()) > GRUBENV_SIZE:
        raise ctx.fail(f"{path} would exceed {GRUBENV_SIZE} bytes")
    ctx.write(path, new + "#" * (GRUBENV_SIZE - len(new.encode())))
    return found


def _fix_kernel_cmdline(ctx: Context) -> None:
    """/etc/kernel/cmdline: kernel-install builds every NEW kernel's BLS entry from it."""
    text = ctx.read(KERNEL_CMDLINE)
    if text is not None:
        ctx.write(KERNEL_CMDLINE, fix_cmdline(ctx, text))


def _check_no_stale_device(ctx: Context, paths: list[str]) -> None:
    """Fail if root=/dev/loop* or resume=/dev/loop* is left anywhere: it boots nowhere."""
    for path in paths:
        for n, line in enumerate((ctx.read(path) or "").splitlines(), 1):
            stale = STALE_DEVICE.search(line)
            if stale:
                raise ctx.fail(f"{path}:{n} still has {stale.group(0)}")


def _fix_entries(ctx: Context, distro: Distro, cfg: str) -> None:
    found = [a for a in _fix_lines(ctx, cfg, LINUX_LINE) if "root=" in a]
    _fix_lines(ctx, cfg, KERNELOPTS_SET)
    _fix_kernel_cmdline(ctx)
    entries = ctx.listdir("/boot/loader/entries", ".conf")
    options: list[str] = []
    for entry in entries:
        options += _fix_lines(ctx, entry, BLS_OPTIONS)
    found += [a for a in options if "root=" in a]
    grubenv = f"/boot/{distro.grub}/grubenv"
    if any("$kernelopts" in a for a in options) or re.search(
        r"^kernelopts=", ctx.read(grubenv) or "", re.M
    ):
        found += _fix_grubenv(ctx, grubenv)
    _check_no_stale_device(ctx, [cfg, KERNEL_CMDLINE, grubenv, *entries])
    root = ctx.plan.root
    assert root is not None
    if not any(_boots_root(ctx, a) for a in found):
        raise ctx.fail(
            f"no kernel entry in {cfg} or /boot/loader/entries boots root={root.dest.spec()}",
            hint="check that a kernel is installed in the migrated system (/boot/vmlinuz-*)",
        )


def _boots_root(ctx: Context, args: str) -> bool:
    """Whether the last root= of `args` (the one the kernel uses) is a stable id of the root."""
    roots = [m.group(3) for m in KERNEL_ARG.finditer(args) if m.group(2) == "root"]
    return bool(roots) and _names_root(ctx, roots[-1])


def fix_bootloader(ctx: Context, distro: Distro) -> None:
    _fix_default_grub(ctx)
    _install(ctx, distro)
    cfg = _regenerate(ctx, distro)
    _fix_entries(ctx, distro, cfg)
