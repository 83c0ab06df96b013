"""The local object store the demo and the tests rely on."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import s3_client
from rehost import objectstore


def test_start_status_stop(tmp_path: Path) -> None:
    info = objectstore.start(tmp_path / "store")
    try:
        assert objectstore.status(tmp_path / "store") == info
        assert objectstore.start(tmp_path / "store") == info  # idempotent
        client = s3_client(info)
        client.create_bucket(Bucket="abc")
        client.put_object(Bucket="abc", Key="k", Body=b"hello world")
        got = client.get_object(Bucket="abc", Key="k", Range="bytes=6-10")["Body"].read()
        assert got == b"world"
    finally:
        assert objectstore.stop(tmp_path / "store")
    assert objectstore.status(tmp_path / "store") is None
    with pytest.raises(ProcessLookupError):
        import os

        os.kill(info.pid, 0)


def test_wrong_secret_is_refused(s3_store: objectstore.StoreInfo) -> None:
    from botocore.exceptions import ClientError

    bad = objectstore.StoreInfo(**{**s3_store.__dict__, "secret_key": "wrong"})
    with pytest.raises(ClientError) as info:
        s3_client(bad).list_buckets()
    assert info.value.response["Error"]["Code"] in ("SignatureDoesNotMatch", "AccessDenied")


def test_cli_start_status_stop(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "rehost", "objectstore", *args, "--dir", str(tmp_path / "s")],
            capture_output=True,
            text=True,
        )

    started = cli("start", "--json")
    assert started.returncode == 0, started.stderr
    info = json.loads(started.stdout)
    try:
        assert info["env"]["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
        assert cli("status").returncode == 0
    finally:
        assert "stopped" in cli("stop").stdout
    assert cli("status").returncode == 1


def test_a_stale_record_is_not_a_running_store(tmp_path: Path) -> None:
    """store.json outlives a reboot; its PID may then be another process's. status must
    not report that as the store, start must start one, and stop must not kill it."""
    import dataclasses
    import json
    import subprocess

    other = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        store = tmp_path / "store"
        store.mkdir()
        stale = objectstore.StoreInfo(
            endpoint="http://127.0.0.1:9", access_key="a", secret_key="b",
            region="us-east-1", pid=other.pid, base_port=29990, directory=str(store),
        )  # fmt: skip
        (store / "store.json").write_text(json.dumps(dataclasses.asdict(stale)))
        assert objectstore.status(store) is None
        assert objectstore.stop(store) is False
        assert other.poll() is None  # still running: not signalled
        assert not (store / "store.json").exists()
    finally:
        other.kill()
        other.wait()
