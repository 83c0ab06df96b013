"""Migration mode in a QEMU guest: `rehost receive` on a rescue system whose kernel has vfat.

The destination of an online migration is, in production, a server booted into a rescue
system that runs `rehost receive`. This machine's kernel has no vfat driver, so the receiver
cannot format and mount a destination ESP here (docs/fixups.md, "Boot tests"). The rescue VM
runs it where it can:

- the guest is the cached bookworm "simple" BIOS fixture (a qcow2 overlay, so the cache stays
  untouched), booted directly (`-kernel`/`-initrd` of the debootstrap tree it was made from)
  with `systemd.run=` on the command line: systemd and udev come up (kernel-command-line.target)
  and then run only the rescue script below, no getty and no networking.service;
- the host's root filesystem is shared read-only over virtiofs (QEMU's virtiofsd, shared memory
  from memfd): virtiofsd runs in a private mount namespace on a non-recursive, read-only bind
  of `/`, so the guest sees only the root filesystem (no /proc, /sys, /dev or other mounts of
  the host) and cannot write to it;
- the rescue script (on the host, read through the share) loads vfat, puts 10.0.2.15 on the
  guest's NIC, mounts the share at /host with the guest's /dev, /proc, /sys and /run bound
  into it, and runs `chroot /host /work/main/.venv/bin/rehost receive ...`: the host's Python,
  venv and tools with the guest's kernel (vfat, partition-table parsing) and udev. The state
  dir is on the guest's /run (tmpfs). The destination disks are the guest's vdb, vdc, ...;
- the receiver's output goes to the second serial port (a file on the host), where the test
  reads its fingerprint, and its log (each fixup change and command) to the third; when the receiver exits, the script writes `REHOST-RESCUE-EXIT <status>`
  there and powers the guest off, so that the destination disks are clean for the next boot;
- the receiver's port 443 is forwarded from a free port on the host's 127.0.0.1 (QEMU's
  user-mode network), where the agent connects.

Everything started here (QEMU and virtiofsd, by PID) is stopped by `close()`; the bind of `/`
lives only in virtiofsd's mount namespace and goes with it.
"""

from __future__ import annotations

import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import rootfs
from bootimage import SUITE, include, source_disks
from qemuboot import overlay

VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")  # QEMU 7.2's, in Debian's qemu-system-common
REHOST = Path(sys.executable).parent / "rehost"
EXIT_MARKER = "REHOST-RESCUE-EXIT"
LISTENING = re.compile(r"rehost receiver listening on \S+, fingerprint (\S+)")
GUEST_IP = "10.0.2.15"
STATE_DIR = "/run/rehost/state"  # in the guest: its /run is a tmpfs
MEMORY_MIB = 1024

SCRIPT = """\
#!/bin/sh
# rehost's rescue system (tests/rescuevm.py): run the receiver in migration mode, power off.
exec >/dev/ttyS1 2>&1
echo "rescue: up after $(cut -d' ' -f1 /proc/uptime)s"
modprobe -a vfat nls_cp437 nls_ascii nls_utf8 || true
grep -qw vfat /proc/filesystems || echo "rescue: no vfat in the guest kernel"
nic=""
for _ in $(seq 60); do
    nic=$(ls /sys/class/net | grep '^e' | head -n 1)
    [ -n "$nic" ] && break
    sleep 0.5
done
ip link set "$nic" up && ip addr add {ip}/24 dev "$nic"
for d in dev proc sys run; do mount --rbind "/$d" "/host/$d"; done
mkdir -p /run/rehost/tmp /run/rehost/home /run/rehost/cli/log
touch /run/rehost/cli/log/rehost.log
tail -n +1 -F /run/rehost/cli/log/rehost.log >/dev/ttyS2 2>/dev/null &
echo "rescue: receiver starting after $(cut -d' ' -f1 /proc/uptime)s on $nic"
chroot /host /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/run/rehost/home REHOST_STATE_DIR=/run/rehost/cli TMPDIR=/run/rehost/tmp PYTHONDONTWRITEBYTECODE=1 LANG=C.UTF-8 \
    {receiver}
status=$?
echo "rescue: receiver exited after $(cut -d' ' -f1 /proc/uptime)s"
sleep 1
sync
echo "{marker} $status"
poweroff -f
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _tail(path: Path, n: int = 3000) -> str:
    return _read(path)[-n:] if path.exists() else "(no file)"


@dataclass
class RescueVM:
    """A running rescue guest; `port` on 127.0.0.1 reaches its receiver."""

    tmp: Path
    port: int
    console: Path  # the guest's ttyS0: kernel and systemd
    output: Path  # its ttyS1: the rescue script and the receiver's output
    log: Path  # its ttyS2: the receiver's log (rehost.log), fixups included
    qemu: subprocess.Popen[bytes] | None = None
    virtiofsd: subprocess.Popen[bytes] | None = None
    fingerprint: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def logs(self) -> str:
        return (
            f"\n--- rescue ttyS1 (receiver) ---\n{_tail(self.output, 4000)}"
            f"\n--- rescue ttyS2 (receiver log) ---\n{_tail(self.log, 12000)}"
            f"\n--- rescue ttyS0 (console) ---\n{_tail(self.console)}"
            f"\n--- virtiofsd ---\n{_tail(self.tmp / 'virtiofsd.log', 1500)}"
            f"\n--- qemu ---\n{_tail(self.tmp / 'qemu.log', 1500)}"
        )

    def wait_listening(self, timeout: float) -> str:
        """The receiver's certificate fingerprint, once it listens."""
        began = time.monotonic()
        while time.monotonic() - began < timeout:
            m = LISTENING.search(_read(self.output))
            if m:
                self.fingerprint = m.group(1)
                return self.fingerprint
            assert self.qemu is not None
            assert self.qemu.poll() is None, "the rescue guest stopped early" + self.logs()
            time.sleep(0.5)
        raise AssertionError(f"the receiver did not listen within {timeout:.0f}s" + self.logs())

    def wait_exit(self, timeout: float) -> int:
        """The receiver's exit status, once the guest has powered itself off."""
        assert self.qemu is not None
        try:
            self.qemu.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the rescue guest did not power off within {timeout:.0f}s" + self.logs()
            ) from None
        m = re.search(re.escape(EXIT_MARKER) + r" (\d+)", _read(self.output))
        assert m, "the rescue guest stopped before the receiver exited" + self.logs()
        return int(m.group(1))

    def close(self) -> None:
        for proc in (self.qemu, self.virtiofsd):  # virtiofsd ends when QEMU lets go
            if proc is None:
                continue
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=30)


def _prerequisites() -> None:
    for tool in ("qemu-system-x86_64", "qemu-img", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install qemu-system-x86 qemu-utils)")
    if not VIRTIOFSD.exists():
        pytest.skip(f"{VIRTIOFSD} is missing (apt-get install qemu-system-common)")


@contextmanager
def rescue_receiver(
    tmp: Path, disks: Sequence[Path], token_file: Path, *, boot_timeout: float = 240
) -> Iterator[RescueVM]:
    """Boot the rescue guest with `disks` (raw files) as vdb, vdc, ... and run
    `rehost receive --system-disk /dev/vdb --data-disk 1=/dev/vdc ...` in it; yields once the
    receiver listens (its fingerprint in `.fingerprint`). `token_file` and `tmp` must be on the
    host's root filesystem (the guest sees nothing else)."""
    _prerequisites()
    tmp.mkdir(parents=True, exist_ok=True)
    # the guest sees the host's root filesystem only
    for path in (tmp, token_file, REHOST, Path(sys.executable).resolve()):
        assert path.stat().st_dev == Path("/").stat().st_dev, f"{path} is not on the root fs"
    tree = rootfs.debian_root(SUITE, include("bios"))
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    assert kernels, f"no kernel in {tree}/boot"
    version = kernels[-1].name.removeprefix("vmlinuz-")
    for module in ("fs/fat/vfat.ko", "fs/fuse/virtiofs.ko"):
        assert (tree / "lib/modules" / version / "kernel" / module).exists(), (version, module)
    root = overlay(source_disks("bios", "simple").system, "raw", tmp)  # built from `tree`
    logs = [tmp / f"rescue-{n}.log" for n in ("console", "output", "log")]
    vm = RescueVM(tmp, _free_port(), console=logs[0], output=logs[1], log=logs[2])
    receiver = [str(REHOST), "receive", "--listen", ":443", "--token-file", str(token_file),
                "--state-dir", STATE_DIR, "--system-disk", "/dev/vdb",
                *(f"--data-disk={i}=/dev/vd{chr(ord('b') + i)}" for i in range(1, len(disks)))]  # fmt: skip
    script = tmp / "rescue.sh"
    script.write_text(SCRIPT.format(ip=GUEST_IP, receiver=shlex.join(receiver), marker=EXIT_MARKER))
    share, sock = tmp / "hostroot", tmp / "virtiofsd.sock"
    share.mkdir()
    setup = (
        f"mount --bind / {shlex.quote(str(share))} && "
        f"mount -o remount,bind,ro {shlex.quote(str(share))} && "
        f"exec {VIRTIOFSD} --socket-path={shlex.quote(str(sock))} "
        f"-o source={shlex.quote(str(share))} -o cache=none -o sandbox=chroot"
    )
    began = time.monotonic()
    try:
        with open(tmp / "virtiofsd.log", "wb") as log:
            vm.virtiofsd = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "slave", "sh", "-c", setup],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        while not sock.exists():
            assert vm.virtiofsd.poll() is None, "virtiofsd did not start" + vm.logs()
            assert time.monotonic() - began < 30, "virtiofsd made no socket" + vm.logs()
            time.sleep(0.05)
        mount = "mkdir -p /host && mount -t virtiofs -o ro hostroot /host"
        run_script = f"/bin/sh -c '{mount} && exec /bin/sh /host{script}'"
        argv = [
            "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-smp", "2",
            "-m", str(MEMORY_MIB), "-display", "none", "-no-reboot", "-nodefaults",
            "-object", f"memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share=on",
            "-machine", "memory-backend=mem",
            "-chardev", f"socket,id=vfs,path={sock}",
            "-device", "vhost-user-fs-pci,chardev=vfs,tag=hostroot",
            "-serial", f"file:{vm.console}", "-serial", f"file:{vm.output}",
            "-serial", f"file:{vm.log}",
            "-kernel", str(kernels[-1]), "-initrd", str(tree / "boot" / f"initrd.img-{version}"),
            "-append", f'root=/dev/vda1 rw console=ttyS0 systemd.run="{run_script}"',
            "-drive", f"file={root},format=qcow2,if=virtio",
            *(a for d in disks for a in ("-drive", f"file={d},format=raw,if=virtio")),
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{vm.port}-:443",
            "-device", "virtio-net-pci,netdev=n0",
            "-device", "virtio-rng-pci",
        ]  # fmt: skip
        with open(tmp / "qemu.log", "wb") as log:
            vm.qemu = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        vm.wait_listening(boot_timeout)
        vm.timings["listening"] = time.monotonic() - began
        yield vm
    finally:
        vm.close()
