"""Session-wide fixtures shared by every test module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import MiB, write_guest


@pytest.fixture(scope="session")
def guest_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 24 MiB raw disk with mixed content, shared by the format tests."""
    path = tmp_path_factory.mktemp("guest") / "guest.raw"
    write_guest(path, 24 * MiB + 7 * 512, seed=11)
    return path


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A 64 MiB loop device over a sparse file; detached afterwards."""
    import subprocess

    backing = tmp_path / "loop.img"
    with open(backing, "wb") as f:
        f.truncate(64 * MiB)
    dev = subprocess.run(
        ["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        yield Path(dev), backing
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
