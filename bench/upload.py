"""Benchmark `rehost upload` against `aws s3 cp` (multipart) into a local SeaweedFS.

A 2 GiB file is uploaded alternately by both, each run to a fresh key, and the
median throughputs are compared (target: rehost ≥ 0.9x aws s3 cp). Peak RSS of
each is reported too (target: ≤ 512 MiB). Both use their defaults, except that
`aws s3 cp` is given the same part size as rehost (16 MiB).

    .venv/bin/python bench/upload.py [--size-mib 2048] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import alternate, local_store
from rehost.sample import write_sample_disk

BUCKET = "bench"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", default="/dev/shm/rehost-bench-upload")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    with local_store():
        aws_config = work / "aws-config"
        aws_config.write_text("[default]\ns3 =\n  multipart_chunksize = 16MB\n")
        os.environ["AWS_CONFIG_FILE"] = str(aws_config)
        bindir = Path(sys.executable).parent
        try:
            import boto3

            boto3.client("s3").create_bucket(Bucket=BUCKET)
            data = work / "disk.raw"
            write_sample_disk(data, args.size_mib << 20, seed=77)
            state = work / "state"

            def fresh() -> None:
                shutil.rmtree(state, ignore_errors=True)

            # Each command gets a fresh key per run, so nothing is resumed or overwritten.
            runs = {
                name: [
                    [str(bindir / "rehost"), "upload", str(data), f"s3://{BUCKET}/{name}-{i}",
                     "--state-dir", str(state)]
                    if name == "rehost"
                    else [str(bindir / "aws"), "s3", "cp", "--only-show-errors", str(data),
                          f"s3://{BUCKET}/{name}-{i}"]
                    for i in range(args.runs)
                ]
                for name in ("rehost", "aws")
            }  # fmt: skip
            times: dict[str, list[float]] = {"rehost": [], "aws": []}
            rss: dict[str, list[int]] = {"rehost": [], "aws": []}
            for i in range(args.runs):
                t = alternate({name: argv[i] for name, argv in runs.items()}, 1, before=fresh)
                for name in times:
                    times[name] += t[name].seconds
                    rss[name] += t[name].max_rss
            size = data.stat().st_size
            med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
            print(f"# {args.size_mib} MiB file to local SeaweedFS, {args.runs} alternating runs")
            for name in ("rehost", "aws"):
                print(
                    f"{name:<7} median {med[name]:.2f} s ({size / med[name] / 2**20:.0f} MiB/s), "
                    f"min {min(times[name]):.2f} s, max {max(times[name]):.2f} s, "
                    f"peak RSS {max(rss[name]) / 2**20:.0f} MiB"
                )
            print(f"throughput ratio rehost / aws s3 cp: {med['aws'] / med['rehost']:.2f}")
        finally:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
