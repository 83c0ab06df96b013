"""Shared benchmark plumbing: alternate commands, time them, report medians as ratios.

The machines are shared and noisy, so every figure is a ratio against its anchor
measured in the same run, alternating the commands rather than batching them.
"""

from __future__ import annotations

import compileall
import functools
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rehost import objectstore


@dataclass
class Timing:
    seconds: list[float] = field(default_factory=list)
    max_rss: list[int] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def minimum(self) -> float:
        return min(self.seconds)


def timed(argv: Sequence[str], before: Callable[[], None] | None = None) -> tuple[float, int]:
    """Run a command; return its wall time and its peak RSS in bytes."""
    if before:
        before()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        err = proc.stderr.read().decode() if proc.stderr else ""
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {err}")
    return elapsed, usage.ru_maxrss * 1024


def reclaim_stalls() -> int:
    """Allocations so far that had to reclaim memory first (allocstall_* in /proc/vmstat).

    Once the page cache fills memory, writing a 2 GiB destination into tmpfs makes the
    writer reclaim pages itself: one import here went from 1.3 to 5.8 s of sys time. A
    row whose count grew was measured so, and its figures are not comparable.
    """
    with open("/proc/vmstat") as f:
        return sum(int(v) for k, v in (line.split() for line in f) if k.startswith("allocstall_"))


@functools.cache
def byte_compile_rehost() -> None:
    """Time rehost as installed from a wheel, whose bytecode pip compiles.

    An editable install compiles on import, and under PYTHONDONTWRITEBYTECODE
    (set on these machines) every run would recompile: 0.1 s of start-up.
    """
    import rehost

    compileall.compile_dir(os.path.dirname(rehost.__file__), quiet=1)


def alternate(
    commands: Mapping[str, Sequence[str]], runs: int, before: Callable[[], None] | None = None
) -> dict[str, Timing]:
    """Run each command `runs` times, interleaved, and collect their timings."""
    byte_compile_rehost()
    results = {name: Timing() for name in commands}
    for _ in range(runs):
        for name, argv in commands.items():
            seconds, rss = timed(argv, before)
            results[name].seconds.append(seconds)
            results[name].max_rss.append(rss)
    return results


@contextmanager
def local_store(pin: bool = False) -> Iterator[None]:
    """A SeaweedFS on free ports in a temporary dir, its credentials in `os.environ`.

    With `pin`, the store runs on CPU 1 and this process (and what it starts) on CPU 0:
    the store's CPU then stays off the measured core, as when it runs on other machines.
    """
    store_dir = Path(tempfile.mkdtemp(prefix="rehost-bench-store-"))
    info = objectstore.start(store_dir)
    os.environ.update(info.env())
    if pin:
        _pin_group(info.pid, 1)
        os.sched_setaffinity(0, {0})
    try:
        yield
    finally:
        objectstore.stop(store_dir)
        shutil.rmtree(store_dir, ignore_errors=True)


def _pin_group(pgid: int, cpu: int) -> None:
    """Every thread of every process in process group `pgid` onto `cpu` (threads the
    store starts later inherit it)."""
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or os.getpgid(int(proc.name)) != pgid:
                continue
            for task in (proc / "task").iterdir():
                os.sched_setaffinity(int(task.name), {cpu})
        except (ProcessLookupError, FileNotFoundError):
            continue
