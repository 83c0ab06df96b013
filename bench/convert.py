"""Benchmark `rehost image convert` against `qemu-img convert -O raw`.

Builds a 2 GiB disk with mixed content (zeros, random data, compressible text)
in every supported format, then alternates rehost, qemu-img (default) and
qemu-img -m 8 -W, writing to tmpfs so disk write-back stays out of the figure.
Prints median time ratios against qemu-img's default, and rehost's peak RSS.

    .venv/bin/python bench/convert.py [--size-mib 2048] [--runs 3] [--only qcow2-zstd,...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import alternate
from rehost.sample import write_sample_disk

FORMATS: dict[str, list[str]] = {
    "raw": [],
    "qcow2": ["-O", "qcow2"],
    "qcow2-zlib": ["-c", "-O", "qcow2", "-o", "compression_type=zlib"],
    "qcow2-zstd": ["-c", "-O", "qcow2", "-o", "compression_type=zstd"],
    "vhd-fixed": ["-O", "vpc", "-o", "subformat=fixed"],
    "vhd-dynamic": ["-O", "vpc", "-o", "subformat=dynamic"],
    "vhdx-dynamic": ["-O", "vhdx", "-o", "subformat=dynamic"],
    "vmdk-sparse": ["-O", "vmdk", "-o", "subformat=monolithicSparse"],
    "vmdk-stream": ["-O", "vmdk", "-o", "subformat=streamOptimized"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ",".join(FORMATS))
    ap.add_argument("--workdir", default="/dev/shm/rehost-bench-convert")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rehost = str(Path(sys.executable).parent / "rehost")
    size = args.size_mib << 20
    raw = work / "guest.raw"
    if not raw.exists() or raw.stat().st_size != size:
        write_sample_disk(raw, size, seed=2024)
    out = work / "out.raw"

    def clear() -> None:
        out.unlink(missing_ok=True)

    names = [n for n in FORMATS if not args.only or n in args.only.split(",")]
    print(
        f"# {args.size_mib} MiB mixed-content disk, {args.runs} alternating runs, output on tmpfs"
    )
    print(f"{'format':<14}{'rehost s':>10}{'qemu s':>9}{'qemu -m8 -W':>13}"
          f"{'ratio':>8}{'vs -W':>8}{'rehost RSS':>12}")  # fmt: skip
    try:
        for name in names:
            img = raw if name == "raw" else work / f"guest.{name}"
            if name != "raw" and not img.exists():
                subprocess.run(
                    ["qemu-img", "convert", *FORMATS[name], str(raw), str(img)], check=True
                )
            fmt = [] if name != "raw" else ["-f", "raw"]
            t = alternate(
                {
                    "rehost": [rehost, "image", "convert", str(img), str(out)],
                    "qemu": ["qemu-img", "convert", *fmt, "-O", "raw", str(img), str(out)],
                    "qemu-W": [
                        "qemu-img",
                        "convert",
                        *fmt,
                        "-m",
                        "8",
                        "-W",
                        "-O",
                        "raw",
                        str(img),
                        str(out),
                    ],
                },
                args.runs,
                before=clear,
            )
            r, q, w = t["rehost"], t["qemu"], t["qemu-W"]
            print(
                f"{name:<14}{r.median:>10.2f}{q.median:>9.2f}{w.median:>13.2f}"
                f"{r.median / q.median:>8.2f}{r.median / w.median:>8.2f}"
                f"{max(r.max_rss) / 2**20:>10.0f} MiB",
                flush=True,
            )
    finally:
        clear()
    if os.environ.get("REHOST_BENCH_KEEP") != "1":
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
