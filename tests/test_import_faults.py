"""Import-level faults against a real object store: a restart mid-import, a replaced object."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import MiB, oracle_sha256, run, s3_client, sha256_file, write_guest
from rehost import objectstore
from rehost.errors import SourceChanged, TaskTimeout
from rehost.offline.task import run_import


@pytest.fixture
def own_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[objectstore.StoreInfo]:
    """A store of this test's own, so restarting it disturbs nobody else."""
    directory = tmp_path / "store"
    info = objectstore.start(directory)
    for key, value in info.env().items():
        monkeypatch.setenv(key, value)
    try:
        yield info
    finally:
        objectstore.stop(directory)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    raw = tmp_path / "g.raw"
    write_guest(raw, 160 * MiB, seed=31)
    img = tmp_path / "g.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", raw, img)
    raw.unlink()
    return img


@pytest.fixture
def uploaded(own_store: objectstore.StoreInfo, image: Path) -> str:
    """The image as s3://imports/g.qcow2 in the test's own store."""
    client = s3_client(own_store)
    client.create_bucket(Bucket="imports")
    client.upload_file(str(image), "imports", "g.qcow2")
    return "s3://imports/g.qcow2"


def _wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() or path.stat().st_size < 16 * MiB:
        assert time.monotonic() < deadline, "the import made no progress"
        time.sleep(0.05)


def test_store_restarted_mid_import_completes(
    own_store: objectstore.StoreInfo, image: Path, uploaded: str, tmp_path: Path
) -> None:
    dest = tmp_path / "out.raw"
    result: dict[str, object] = {}

    def restart() -> None:
        _wait_for(dest)
        objectstore.stop(Path(own_store.directory))
        time.sleep(2)
        objectstore.start(Path(own_store.directory), base_port=own_store.base_port)
        result["restarted"] = True

    restarter = threading.Thread(target=restart)
    restarter.start()
    report = run_import(uploaded, dest, state_dir=tmp_path / "state", rate_limit_mbps=40)
    restarter.join()
    assert result.get("restarted")
    assert report.verified
    assert sha256_file(dest) == oracle_sha256(image, tmp_path)


def test_a_store_gone_mid_import_ends_at_the_timeout(
    own_store: objectstore.StoreInfo, uploaded: str, tmp_path: Path
) -> None:
    """The store stops and stays down: --timeout ends the import as TASK_TIMEOUT, when it
    says, instead of a minute of retries first (the deadline bounds them)."""
    dest = tmp_path / "out.raw"

    def stop() -> None:
        _wait_for(dest)
        objectstore.stop(Path(own_store.directory))

    stopper = threading.Thread(target=stop)
    stopper.start()
    began = time.monotonic()
    with pytest.raises(TaskTimeout):
        run_import(uploaded, dest, state_dir=tmp_path / "state", rate_limit_mbps=40, timeout=15)
    stopper.join()
    assert time.monotonic() - began < 30


def test_object_replaced_mid_import_fails_with_source_changed(
    own_store: objectstore.StoreInfo, image: Path, uploaded: str, tmp_path: Path
) -> None:
    client = s3_client(own_store)
    dest = tmp_path / "out.raw"
    state = tmp_path / "state"

    def replace() -> None:
        _wait_for(dest)
        client.put_object(Bucket="imports", Key="g.qcow2", Body=image.read_bytes()[::-1])

    replacer = threading.Thread(target=replace)
    replacer.start()
    with pytest.raises(SourceChanged) as info:
        run_import(uploaded, dest, state_dir=state, rate_limit_mbps=40)
    replacer.join()
    assert info.value.code == "SOURCE_CHANGED"
    assert (state / "INCOMPLETE").exists()
