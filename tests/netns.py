"""Two network namespaces joined by a veth pair: a source host and a destination host.

Names carry the test process's pid and a counter, so concurrent test runs never collide;
the addresses (10.200.X.1 on the source, .2 on the destination) live inside the namespaces
and so cannot clash either. Everything is deleted on exit, also after a failure.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

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

    def tx_bytes(self) -> int:
        """Bytes the source's interface has sent."""
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


@contextmanager
def netns_pair(rate_kbit: int | None = None) -> Iterator[NetnsPair]:
    n = next(_counter)
    tag = f"{os.getpid() % 100000}{n}"
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
        yield pair
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        subprocess.run(["ip", "link", "del", pair.source_if], check=False, capture_output=True)
