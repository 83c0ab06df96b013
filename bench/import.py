"""Benchmark `rehost import` from object storage against download-then-convert.

Puts 2 GiB images (qcow2 zstd, vmdk streamOptimized, vhd dynamic, raw, and a qcow2
written out of order, whose clusters lie scattered) into a local SeaweedFS and,
alternating, times for each:
- `rehost import s3://... --to OUT` (precheck, stream-convert, verify by re-reading);
- what a user would otherwise do: download the object with boto3's multi-threaded
  `download_file`, then `qemu-img convert -O raw`;
- a plain single-stream GET of the object to /dev/null (the wire's anchor);
- for raw and vhd, the floor of any import that hashes what it writes and then re-reads
  it: one single-stream GET, each non-zero 64 KiB block hashed (XXH3) and written into
  the destination file, then every 4 MiB of it that holds data read back and hashed, in
  one thread, with no parsing, state or checkpoints (`_FLOOR`).
Prints, as min/median over the runs, the times and the ratios import time /
download-then-convert time and, for raw and uncompressed images, rehost's
throughput over the single-stream GET's, and the floor's (for raw and vhd: when even the
floor falls short of a target, what is missing is the machine's, not the import's); what
one more import fetched from the store, as a multiple of the object's size; then rehost's
peak RSS, the load average (1 min) before and after each format's runs (the machine is
shared), and how many allocations meanwhile had to reclaim memory first (`stalls`: above
0, the page cache was full and the writes paid for evicting it; `sync; echo 1 >
/proc/sys/vm/drop_caches` before the benchmark avoids that).

    .venv/bin/python bench/import.py [--size-mib 2048] [--runs 3] [--only raw,...] [--pin]

--pin runs SeaweedFS on CPU 1 and the measured commands on CPU 0, so the store's own CPU
(as much as the import's for raw) is off the measured core, as with a store elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import alternate, local_store, reclaim_stalls
from rehost.sample import write_sample_disk

FORMATS: dict[str, list[str]] = {
    "qcow2-zstd": ["-c", "-O", "qcow2", "-o", "compression_type=zstd"],
    "vmdk-stream": ["-O", "vmdk", "-o", "subformat=streamOptimized"],
    "vhd-dynamic": ["-O", "vpc", "-o", "subformat=dynamic"],
    "raw": [],
    # Out-of-order writes from 16 coroutines: clusters allocated in the order they land, so
    # guest-adjacent clusters lie apart in the file, as in a long-lived VM's disk.
    "qcow2-scattered": ["-W", "-m", "16", "-O", "qcow2"],
}
QEMU_FMT = {
    "qcow2-zstd": "qcow2",
    "vmdk-stream": "vmdk",
    "vhd-dynamic": "vpc",
    "raw": "raw",
    "qcow2-scattered": "qcow2",
}
BUCKET = "bench"
FLOORED = ("raw", "vhd-dynamic")
"""The formats whose import is measured against the single-stream GET, and so the floor."""

_GET = """
import sys, boto3
body = boto3.client("s3").get_object(Bucket=sys.argv[1], Key=sys.argv[2])["Body"]
while body.read(1 << 20):
    pass
"""
_FLOOR = """
import os, sys, boto3, xxhash
body = boto3.client("s3").get_object(Bucket=sys.argv[1], Key=sys.argv[2])["Body"]
fd = os.open(sys.argv[3], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
zero, size = bytes(1 << 16), 0
while piece := body.read(4 << 20):
    view = memoryview(piece)
    for i in range(0, len(piece), 1 << 16):
        if not piece.startswith(zero, i):
            xxhash.xxh3_128_digest(view[i : i + (1 << 16)])
            os.pwrite(fd, view[i : i + (1 << 16)], size + i)
    size += len(piece)
buf = bytearray(4 << 20)
pos = 0
while pos < size:
    try:
        pos = os.lseek(fd, pos, os.SEEK_DATA) // len(buf) * len(buf)
    except OSError:  # ENXIO: no data from pos on
        break
    xxhash.xxh3_128_digest(memoryview(buf)[: os.preadv(fd, [buf], pos)])
    pos += len(buf)
"""
_DOWNLOAD = """
import sys, boto3
boto3.client("s3").download_file(sys.argv[1], sys.argv[2], sys.argv[3])
"""


def _pair(low: float, mid: float) -> str:
    return f"{low:.2f}/{mid:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ",".join(FORMATS))
    ap.add_argument("--workdir", default="/dev/shm/rehost-bench-import")
    ap.add_argument("--pin", action="store_true",
                    help="run SeaweedFS on CPU 1 and the measured commands on CPU 0")  # fmt: skip
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    with local_store(pin=args.pin):
        py = sys.executable
        rehost = str(Path(py).parent / "rehost")
        out, downloaded, state = work / "out.raw", work / "downloaded.img", work / "state"
        floor_out = work / "floor.out"

        def clear() -> None:
            out.unlink(missing_ok=True)
            floor_out.unlink(missing_ok=True)
            downloaded.unlink(missing_ok=True)
            shutil.rmtree(state, ignore_errors=True)

        try:
            import boto3

            s3 = boto3.client("s3")
            s3.create_bucket(Bucket=BUCKET)
            raw = work / "guest.raw"
            write_sample_disk(raw, args.size_mib << 20, seed=2025)
            names = [n for n in FORMATS if not args.only or n in args.only.split(",")]
            pinned = ", SeaweedFS on CPU 1, the commands on CPU 0" if args.pin else ""
            print(f"# {args.size_mib} MiB mixed-content disk in local SeaweedFS{pinned}, "
                  f"{args.runs} runs")  # fmt: skip
            print("# each figure is min/median")
            print(f"{'format':<16}{'object MiB':>11}{'import s':>12}{'dl+convert s':>14}"
                  f"{'GET s':>12}{'ratio':>12}{'vs GET':>12}{'floor s':>12}{'floor vs GET':>14}"
                  f"{'fetched':>9}{'import RSS':>12}"
                  f"{'load':>11}{'stalls':>8}")  # fmt: skip
            for name in names:
                img = raw if name == "raw" else work / f"guest.{name}"
                if name != "raw":
                    subprocess.run(["qemu-img", "convert", *FORMATS[name], raw, img], check=True)
                s3.upload_file(str(img), BUCKET, name)
                size = img.stat().st_size
                if name != "raw":
                    img.unlink()
                load_before, stalls = os.getloadavg()[0], reclaim_stalls()
                commands: dict[str, list[str]] = {
                    "import": [
                        rehost, "import", f"s3://{BUCKET}/{name}", "--to", str(out),
                        "--state-dir", str(state),
                    ],
                    "dlconvert": [
                        "sh", "-c",
                        f'"{py}" -c \'{_DOWNLOAD}\' {BUCKET} {name} {downloaded} && '
                        f"qemu-img convert -f {QEMU_FMT[name]} -O raw {downloaded} {out}",
                    ],
                    "get": [py, "-c", _GET, BUCKET, name],
                }  # fmt: skip
                if name in FLOORED:
                    commands["floor"] = [py, "-c", _FLOOR, BUCKET, name, str(floor_out)]
                t = alternate(commands, args.runs, before=clear)
                clear()  # once more, untimed, for what it fetched from the store
                report = subprocess.run(
                    [rehost, "import", f"s3://{BUCKET}/{name}", "--to", str(out),
                     "--state-dir", str(state), "--json"],
                    check=True, capture_output=True, text=True,
                ).stdout  # fmt: skip
                fetched = json.loads(report)["bytes_fetched"] / size
                i, d, g = t["import"], t["dlconvert"], t["get"]
                f = t.get("floor")
                floor = (
                    f"{_pair(f.minimum, f.median):>12}"
                    f"{_pair(g.minimum / f.minimum, g.median / f.median):>14}"
                    if f
                    else "-"
                )
                # Throughput compares bytes of the object moved per second.
                print(
                    f"{name:<16}{size / 2**20:>11.0f}{_pair(i.minimum, i.median):>12}"
                    f"{_pair(d.minimum, d.median):>14}{_pair(g.minimum, g.median):>12}"
                    f"{_pair(i.minimum / d.minimum, i.median / d.median):>12}"
                    f"{_pair(g.minimum / i.minimum, g.median / i.median):>12}"
                    f"{floor:>26}"
                    f"{fetched:>8.2f}x"
                    f"{max(i.max_rss) / 2**20:>8.0f} MiB"
                    f"{load_before:>6.1f}>{os.getloadavg()[0]:.1f}"
                    f"{reclaim_stalls() - stalls:>8}",
                    flush=True,
                )
        finally:
            clear()
            if os.environ.get("REHOST_BENCH_KEEP") != "1":
                shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
