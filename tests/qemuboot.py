"""Boot a disk in QEMU (TCG, no KVM here) and wait for the boot marker on the serial console.

The command line is NOTES.md's "Booting what you migrated". The serial console goes to a file
that is polled for the marker (a pipe would buffer it until QEMU exits); QEMU is killed by its
PID as soon as the marker appears or the time bound passes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from bootimage import MARKER, MOUNTS_MARKER

# Only a bound for a guest that hangs: a boot is judged by its marker. Alone a boot takes
# ~35 s; in the default run (two xdist workers on two cores) the other worker's QEMU runs
# beside it and boots have taken up to ~75 s, so the bound leaves room for twice that.
BOOT_TIMEOUT = 300.0


@dataclass
class Boot:
    marker: str | None  # "REHOST-BOOT-OK <hostname> <ipv4>", or None if it never came
    seconds: float
    console: str  # the whole serial log, for failure messages

    def tail(self, n: int = 4000) -> str:
        return self.console[-n:]

    def mounts(self) -> dict[str, str]:
        """The guest's `REHOST-MOUNTS` facts: {"boot": "DEV:FSTYPE:UUID", "data": ..., "swap":
        "DEV:UUID,..."}, "" where nothing is mounted; {} if the line never came."""
        m = re.search(
            re.escape(MOUNTS_MARKER) + r" boot=(\S*) data=(\S*) swap=(\S*)(?=[ \t]*[\r\n])",
            self.console,
        )
        return dict(zip(("boot", "data", "swap"), m.groups(), strict=True)) if m else {}


def overlay(base: Path, fmt: str, directory: Path) -> Path:
    """A qcow2 copy-on-write overlay of `base`, so the boot leaves `base` untouched."""
    over = directory / (base.name + ".overlay.qcow2")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", fmt, str(over)],
        check=True,
        capture_output=True,
    )
    return over


OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


def boot(
    disk: Path,
    fmt: str,
    log: Path,
    timeout: float = BOOT_TIMEOUT,
    firmware: str = "bios",
    more: Sequence[Path] = (),
) -> Boot:
    """Boot `disk` (virtio disk, user-mode virtio-net) until the marker or `timeout`.

    `more` are further disks in the same format, attached after `disk` in order (vdb, ...).

    UEFI boots with Debian's OVMF (package `ovmf`) and a fresh copy of its empty variable
    store, so nothing but the removable-media path (EFI/BOOT/BOOTX64.EFI) can boot.
    """
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    uefi: list[str] = []
    if firmware == "uefi":
        if not OVMF_CODE.exists():
            pytest.skip("OVMF is not installed (apt-get install ovmf)")
        nvram = log.with_name(log.name + ".vars.fd")
        shutil.copyfile(OVMF_VARS, nvram)
        uefi = [
            "-drive",
            f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
            "-drive",
            f"if=pflash,format=raw,unit=1,file={nvram}",
        ]
    argv = [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-m",
        "1024",
        "-display",
        "none",
        "-no-reboot",
        "-nodefaults",
        "-serial",
        f"file:{log}",
        "-drive",
        f"file={disk},format={fmt},if=virtio",
        *(a for d in more for a in ("-drive", f"file={d},format={fmt},if=virtio")),
        "-netdev",
        "user,id=n0",
        "-device",
        "virtio-net-pci,netdev=n0",
        *uefi,
    ]
    began = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # the unit's own output, not systemd echoing its ExecStart= ("$(hostname)") on the console
    pattern = re.compile(re.escape(MARKER) + r" [^\s$]+[ \t]*[0-9.]*(?=[ \t]*[\r\n])")
    found: str | None = None
    try:
        while time.monotonic() - began < timeout:
            text = log.read_text(errors="replace") if log.exists() else ""
            m = pattern.search(text)
            if m:
                found = m.group(0).strip()
                break
            if proc.poll() is not None:
                break
            time.sleep(0.25)  # the log is small; a coarser poll only adds to every boot
    finally:
        elapsed = time.monotonic() - began
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        assert proc.stderr is not None
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
    console = log.read_text(errors="replace") if log.exists() else ""
    if err:
        console += f"\n--- qemu stderr ---\n{err}"
    return Boot(found, elapsed, console)
