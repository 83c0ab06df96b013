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


def test_the_readme_flow_has_a_bucket_to_upload_to(tmp_path: Path) -> None:
    """The README's offline steps: `objectstore start`, then `upload FILE s3://rehost/KEY`.
    A new store had no bucket, and the upload failed with UPLOAD_FAILED."""
    import json
    import os
    import subprocess
    import sys

    def rehost(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "rehost", *args]
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)

    store = str(tmp_path / "store")
    started = rehost("objectstore", "start", "--dir", store, "--json")
    try:
        assert started.returncode == 0, started.stderr
        info = json.loads(started.stdout)
        assert info["bucket"] == "rehost"
        disk = tmp_path / "disk.raw"
        disk.write_bytes(os.urandom(1 << 20))
        env = {**os.environ, **info["env"], "REHOST_STATE_DIR": str(tmp_path / "state")}
        up = rehost("upload", str(disk), "s3://rehost/disk.raw", env=env)
        assert up.returncode == 0, up.stderr
        again = rehost("objectstore", "start", "--dir", store, "--bucket", "second")
        assert again.returncode == 0 and "bucket: s3://second" in again.stdout, again.stderr
        names = {b["Name"] for b in s3_client(objectstore.StoreInfo(**{
            k: v for k, v in info.items() if k not in ("env", "bucket")
        })).list_buckets()["Buckets"]}  # fmt: skip
        assert names == {"rehost", "second"}
    finally:
        rehost("objectstore", "stop", "--dir", store)
