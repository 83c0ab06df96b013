"""Two network namespaces joined by a veth pair: a source host and a destination host.

Names carry the test process's pid and a counter, so concurrent test runs never collide;
the addresses (10.200.X.1 on the source, .2 on the destination) live inside the namespaces
and so cannot clash either. Everything is deleted on exit, also after a failure.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_counter = itertools.count(1)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class NetnsPair:
    source: str  # namespace names
    dest: str
    source_if: str
    dest_if: str
    source_ip: str
    dest_ip: str

    def cmd(self, ns: str, args: Sequence[str]) -> list[str]:
        """The argv that runs `args` inside namespace `ns`."""
        return ["ip", "netns", "exec", ns, *args]

    def run(self, ns: str, args: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.cmd(ns, args), capture_output=True, text=True, **kw)  # type: ignore[call-overload, no-any-return]

    holder: subprocess.Popen[bytes] | None = None  # a process that sits in the source ns

    def tx_bytes(self) -> int:
        """Bytes the source's interface has sent.

        Read from /proc/HOLDER/net/dev (the source namespace's counters, as in its sysfs), a
        plain file read: sampling through `ip netns exec cat` forks and execs, and on a
        loaded machine (the other xdist worker booting QEMU) its delay varies by tens of
        milliseconds, which the 1-second rates of the bandwidth test would see as noise."""
        if self.holder is not None and self.holder.poll() is None:
            for line in Path(f"/proc/{self.holder.pid}/net/dev").read_text().splitlines():
                name, sep, counters = line.partition(":")
                if sep and name.strip() == self.source_if:
                    return int(counters.split()[8])  # 8 receive counters, then tx bytes
            raise AssertionError(f"{self.source_if} is not in the source namespace")
        out = self.run(self.source, ["cat", f"/sys/class/net/{self.source_if}/statistics/tx_bytes"])
        return int(out.stdout)

    def set_rate(self, kbit: int | None) -> None:
        """Cap the source's egress with a tbf qdisc (None removes it)."""
        if kbit is None:
            self.run(self.source, ["tc", "qdisc", "del", "dev", self.source_if, "root"])
            return
        subprocess.run(
            self.cmd(self.source, ["tc", "qdisc", "replace", "dev", self.source_if, "root",
                                   "tbf", "rate", f"{kbit}kbit", "burst", "32kb",
                                   "latency", "50ms"]),
            check=True, capture_output=True,
        )  # fmt: skip


def _holder(ns: str) -> subprocess.Popen[bytes]:
    """`sleep` inside namespace `ns`, returned once it is there (its /proc/PID/net is then
    the namespace's); the caller kills it by PID."""
    proc = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "infinity"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    want = f"net:[{os.stat(f'/run/netns/{ns}').st_ino}]"
    deadline = time.monotonic() + 30
    while os.readlink(f"/proc/{proc.pid}/ns/net") != want:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait(timeout=30)
            raise AssertionError(f"no process could be started in {ns}")
        time.sleep(0.01)
    return proc


@contextmanager
def netns_pair(rate_kbit: int | None = None) -> Iterator[NetnsPair]:
    n = next(_counter)
    tag = f"{os.getpid()}x{n}"  # "vs" + 7-digit pid + "x" + n fits IFNAMSIZ (15)
    x = (os.getpid() + n) % 250 + 1
    pair = NetnsPair(f"rhs{tag}", f"rhd{tag}", f"vs{tag}", f"vd{tag}", f"10.200.{x}.1",
                     f"10.200.{x}.2")  # fmt: skip
    made: list[str] = []
    try:
        for ns in (pair.source, pair.dest):
            _ip("netns", "add", ns)
            made.append(ns)
        _ip("link", "add", pair.source_if, "type", "veth", "peer", "name", pair.dest_if)
        _ip("link", "set", pair.source_if, "netns", pair.source)
        _ip("link", "set", pair.dest_if, "netns", pair.dest)
        for ns, ifname, ip in ((pair.source, pair.source_if, pair.source_ip),
                               (pair.dest, pair.dest_if, pair.dest_ip)):  # fmt: skip
            _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", ifname)
            _ip("-n", ns, "link", "set", ifname, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        if rate_kbit is not None:
            pair.set_rate(rate_kbit)
        pair.holder = _holder(pair.source)
        yield pair
    finally:
        if pair.holder is not None:
            pair.holder.kill()
            pair.holder.wait(timeout=30)
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        subprocess.run(["ip", "link", "del", pair.source_if], check=False, capture_output=True)
