"""Session-wide fixtures shared by every test module."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import MiB, s3_client, write_guest
from rehost import objectstore
from rehost.objectstore import StoreInfo


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


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreInfo]:
    """A real SeaweedFS S3 server on free loopback ports, stopped by PID at the end."""
    directory = tmp_path_factory.mktemp("seaweedfs")
    info = objectstore.start(directory)
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
