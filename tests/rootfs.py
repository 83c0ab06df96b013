"""Cached Debian roots built with debootstrap, for the online-migration tests.

A debootstrap takes a minute or more and downloads ~100 MiB, so each root is built once
and kept in a cache directory that survives between test runs ($REHOST_TEST_CACHE, default
/var/cache/rehost-tests). A root is keyed by a hash of its recipe, so changing the recipe
builds a new one; a build runs under a file lock (parallel test processes wait for it) into
a scratch directory that is renamed into place only when complete.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

MIRROR = "http://deb.debian.org/debian"
RECIPE_VERSION = 1  # bump to force a rebuild of every root


def cache_dir() -> Path:
    return Path(os.environ.get("REHOST_TEST_CACHE") or "/var/cache/rehost-tests")


def recipe_key(suite: str, include: tuple[str, ...]) -> str:
    recipe = {
        "v": RECIPE_VERSION,
        "suite": suite,
        "variant": "minbase",
        "include": sorted(include),
        "mirror": MIRROR,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def debian_root(suite: str, include: tuple[str, ...] = ()) -> Path:
    """The cached minbase root for `suite` with `include`d packages; built on first use.

    Skips the calling test when debootstrap is missing or the mirror is unreachable.
    """
    if shutil.which("debootstrap") is None:
        pytest.skip("debootstrap is not installed (apt-get install debootstrap)")
    base = cache_dir()
    base.mkdir(parents=True, exist_ok=True)
    name = f"{suite}-minbase-{recipe_key(suite, include)}"
    root = base / name
    if (base / f"{name}.done").exists():
        return root
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (base / f"{name}.done").exists():
            return root
        scratch = base / f"{name}.building"
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        cmd = ["debootstrap", "--variant=minbase"]
        if include:
            cmd.append("--include=" + ",".join(include))
        cmd += [suite, str(scratch), MIRROR]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(scratch, ignore_errors=True)
            pytest.skip(f"debootstrap {suite} failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        scratch.rename(root)
        (base / f"{name}.done").write_text(" ".join(cmd) + "\n")
    return root


def bookworm_minbase() -> Path:
    """Debian 12 minbase: the realistic tree the transfer tests migrate."""
    return debian_root("bookworm")


def bullseye_python() -> Path:
    """Debian 11 minbase with its python3 (3.9): the oldest-Python host the agent runs on here."""
    return debian_root("bullseye", ("python3",))


if __name__ == "__main__":  # `python tests/rootfs.py` pre-builds the cache
    print(bookworm_minbase())
    print(bullseye_python())
