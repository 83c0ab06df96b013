"""Session-wide fixtures shared by every test module, and the order the tests run in.

The default run is spread over two pytest-xdist workers (pyproject's addopts: `-n 2 --dist
worksteal`). Each worker is its own process with its own session fixtures (object store,
temporary directories); what they share (the debootstrap and boot-image cache, loop devices,
network namespaces) is built under file locks or named per process (tests/rootfs.py,
tests/bootimage.py, tests/netns.py).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import MiB, s3_client, write_guest
from loopdisk import LoopLab
from rehost import objectstore
from rehost.objectstore import StoreInfo


def _rank(item: pytest.Item) -> int:
    """Longest first: the ~8-minute UEFI rescue-VM test, then the other QEMU boots, then the
    other slow tests, then the rest (in collection order within each rank)."""
    if item.get_closest_marker("uefi_vm"):
        return 0
    if item.nodeid.startswith("tests/test_boot.py") or item.nodeid.startswith("test_boot.py"):
        return 1
    if item.get_closest_marker("slow"):
        return 2
    return 3


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order the run for two workers: the UEFI test heads one half of the list, the other
    long tests (about as long together) head the other half, and the short tests follow
    each in collection order.

    `--dist worksteal` hands the first half of this list to one worker and the second half to
    the other, and an idle worker steals from the tail of the other's queue (all but the
    running test and the next). So one worker starts with the ~8-minute UEFI test, the other
    with the BIOS boots and the other slow tests, and what is left to steal at the end is
    short: the two finish together. Serially (`-n 0`) it is longest first."""
    ordered = sorted(items, key=_rank)
    first = [item for item in ordered if _rank(item) == 0]
    second = [item for item in ordered if _rank(item) in (1, 2)]
    short = ordered[len(first) + len(second) :]
    cut = max(0, len(items) // 2 - len(first))  # worksteal's first share is len // 2 items
    items[:] = first + short[:cut] + second + short[cut:]


CRITICAL_PATH_BOOST = 5  # nice steps; see _critical_path_priority


@pytest.fixture(autouse=True)
def _critical_path_priority(request: pytest.FixtureRequest) -> Iterator[None]:
    """Run the UEFI rescue-VM test (and the QEMU, virtiofsd and agent it starts, which
    inherit it) at a slightly higher CPU priority.

    It is the run's critical path: one test of ~8 minutes that cannot be split, while the
    other worker's tests can be shared out; on two cores the other worker's QEMU boots and
    helpers otherwise stretch it by half. The others still get the CPU it leaves, and their
    timeouts have room to spare. Only as root (lowering a nice value needs it)."""
    if request.node.get_closest_marker("uefi_vm") is None or os.geteuid() != 0:
        yield
        return
    before = os.getpriority(os.PRIO_PROCESS, 0)
    os.setpriority(os.PRIO_PROCESS, 0, before - CRITICAL_PATH_BOOST)
    try:
        yield
    finally:
        os.setpriority(os.PRIO_PROCESS, 0, before)


@pytest.fixture(scope="session", autouse=True)
def _umounts_reach_every_copy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Make this process's temporary directory a shared mount, so that unmounting what a test
    mounted there also unmounts the copies that namespaces made meanwhile hold.

    This host's / is private (systemd hosts make it shared). `ip netns exec` copies every mount
    into its new namespace, the other xdist worker's too, and makes the copies slaves: a copy of
    a mount in a shared tree then follows its umount; one of a private mount lives on with the
    process. That kept filesystems mounted after the test's umount: a read-only copy made the
    next read-write mount of the partition fail with EBUSY (a CI failure), and fsck or a
    loop-device detach would find them busy. Namespaces the tests make themselves with unshare
    are slaves for the same reason (loopdisk.mount_namespace, rescuevm)."""
    if os.geteuid() != 0:
        yield
        return
    base = str(tmp_path_factory.getbasetemp())
    subprocess.run(["mount", "--bind", base, base], check=True)
    subprocess.run(["mount", "--make-shared", base], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", base], check=True)


@pytest.fixture(scope="session", autouse=True)
def _state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A default rehost state dir (logs, the CLI tests' imports) for each test process, in
    pytest's temporary directory: xdist workers never share one, and none is left in /tmp."""
    if os.environ.get("REHOST_STATE_DIR"):
        yield
        return
    os.environ["REHOST_STATE_DIR"] = str(tmp_path_factory.mktemp("rehost-state"))
    try:
        yield
    finally:
        del os.environ["REHOST_STATE_DIR"]


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


def _store_ports() -> tuple[int, int]:
    """This worker's slice of the store's base ports, so that two xdist workers never pick
    the same ports at the same moment."""
    start, stop = objectstore.base_port_range()
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    width = (stop - start) // workers // 10 * 10
    return start + index * width, start + (index + 1) * width


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreInfo]:
    """A real SeaweedFS S3 server on free loopback ports, stopped by PID at the end; each
    xdist worker has its own (its own data dir under the worker's basetemp, its own ports)."""
    directory = tmp_path_factory.mktemp("seaweedfs")
    info = objectstore.start(directory, base_port=objectstore.free_base_port(*_store_ports()))
    try:
        yield info
    finally:
        objectstore.stop(directory)


@pytest.fixture
def s3_env(s3_store: StoreInfo, monkeypatch: pytest.MonkeyPatch) -> StoreInfo:
    """Point the standard AWS variables at the test store for this test."""
    for key, value in s3_store.env().items():
        monkeypatch.setenv(key, value)
    return s3_store


@pytest.fixture
def s3_bucket(s3_env: StoreInfo) -> Iterator[str]:
    """A fresh, empty bucket in the test store; deleted with its objects afterwards."""
    client = s3_client(s3_env)
    name = f"t{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    try:
        yield name
    finally:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            for obj in page.get("Contents", []):
                client.delete_object(Bucket=name, Key=obj["Key"])
        for up in client.list_multipart_uploads(Bucket=name).get("Uploads", []):
            client.abort_multipart_upload(Bucket=name, Key=up["Key"], UploadId=up["UploadId"])
        client.delete_bucket(Bucket=name)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[LoopLab]:
    """Loop disks for one test; whatever a receiver prepared under tmp_path/state* is
    unmounted before they are detached."""
    from rehost.online.receiver.disks import finalize

    lab = LoopLab(tmp_path)
    try:
        yield lab
    finally:
        for state in tmp_path.glob("state*"):
            finalize(state)
        lab.close()
