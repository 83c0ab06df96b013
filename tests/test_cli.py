"""The CLI as users run it: exit codes, error lines, JSON, and the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import run, sha256_file

REHOST = [sys.executable, "-m", "rehost"]


def rehost(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*REHOST, *map(str, args)], capture_output=True, text=True)


def test_inspect_json(guest_raw: Path, tmp_path: Path) -> None:
    qcow = tmp_path / "g.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", guest_raw, qcow)
    proc = rehost("image", "inspect", qcow, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["format"] == "qcow2"
    assert info["virtual_size"] == guest_raw.stat().st_size
    assert info["file_size"] == qcow.stat().st_size
    assert 0 < info["allocated_bytes"] <= info["virtual_size"]
    assert info["cluster_size"] == 65536
    assert info["checks"]


def test_convert_json_and_byte_exact(guest_raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.raw"
    proc = rehost("image", "convert", guest_raw, out, "--json", "--digest")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["virtual_size"] == guest_raw.stat().st_size
    assert len(result["digest"]) == 64
    assert sha256_file(out) == sha256_file(guest_raw)


def test_error_format_and_status(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.img"
    bad.write_bytes(os.urandom(1 << 16))
    proc = rehost("image", "check", bad)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith(
        "error: IMAGE_METADATA_UNREADABLE: failed to obtain the metadata of the image file: "
    )
    assert lines[1].startswith("hint: ")
    assert proc.stdout == ""
    # asked for JSON, a script gets the failure as JSON on stdout too, not an empty stdout
    proc = rehost("image", "check", bad, "--json")
    assert proc.returncode == 1 and proc.stderr.startswith("error: IMAGE_METADATA_UNREADABLE")
    failure = json.loads(proc.stdout)
    assert failure["status"] == "failed" and failure["error"]["code"] == "IMAGE_METADATA_UNREADABLE"
    assert set(failure["error"]) == {"code", "message", "reason", "hint"}


def test_convert_destination_too_small(guest_raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "small.raw"
    out.write_bytes(bytes(4096))
    proc = rehost("image", "convert", guest_raw, out)
    assert proc.returncode == 1
    assert "error: IMAGE_VERIFICATION_FAILED: image file verification failed" in proc.stderr
    assert out.read_bytes() == bytes(4096)


def test_failed_convert_leaves_no_new_file(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.img"
    bad.write_bytes(os.urandom(1 << 16))
    out = tmp_path / "out.raw"
    assert rehost("image", "convert", bad, out).returncode == 1
    assert not out.exists()


def test_a_refused_image_closes_its_source(tmp_path: Path) -> None:
    """In-process, as a library user of the CLI would run it: no descriptor is left open."""
    from rehost.cli.app import main

    bad = tmp_path / "truncated.qcow2"
    bad.write_bytes(b"QFI\xfb" + bytes(40))
    before = os.listdir("/proc/self/fd")
    for _ in range(3):
        sys.argv = ["rehost", "image", "inspect", str(bad)]
        try:
            main()
        except SystemExit as e:
            assert e.code == 1
    assert os.listdir("/proc/self/fd") == before


def test_usage_error_exits_2() -> None:
    proc = rehost("image", "convert")
    assert proc.returncode == 2
    proc = rehost("image", "pack", "a", "b", "--compression", "lzma")
    assert proc.returncode == 2


def test_missing_source() -> None:
    proc = rehost("image", "inspect", "/nonexistent/disk.qcow2")
    assert proc.returncode == 1
    assert "error: SOURCE_NOT_FOUND" in proc.stderr


def test_help_mentions_every_image_command() -> None:
    proc = rehost("image", "--help")
    assert proc.returncode == 0
    for cmd in ("inspect", "check", "convert", "pack"):
        assert cmd in proc.stdout


def test_every_command_loads_and_images_load_only_theirs() -> None:
    """Subcommands load lazily; each must still resolve, and `image` must not drag in the rest."""
    from rehost.cli.app import COMMANDS

    root = rehost("--help")
    assert root.returncode == 0
    for name in COMMANDS:
        assert name in root.stdout
        assert rehost(name, "--help").returncode == 0, name
    probe = (
        "import sys; from rehost.cli.app import main; "
        "sys.argv = ['rehost', 'image', 'inspect', '/nonexistent']\n"
        "try: main()\nexcept SystemExit: pass\n"
        "print(sorted(m for m in sys.modules if m.startswith(('rehost.online', 'rehost.offline', "
        "'rehost.objectstore', 'boto3'))))"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_demo(tmp_path: Path) -> None:
    """The README's first command: a whole offline migration that stops what it started."""
    env = dict(os.environ, REHOST_STATE_DIR=str(tmp_path / "state"))
    proc = subprocess.run(
        [*REHOST, "demo", "--workdir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "demo passed" in proc.stdout
    assert "byte for byte" in proc.stdout
    assert "stopped the object store" in proc.stdout
    assert not (tmp_path / "state" / "objectstore" / "store.json").exists()


def test_text_from_an_image_reaches_a_terminal_inert(tmp_path: Path) -> None:
    """A VHDX's creator is the image author's text: on a terminal it was taken for rich
    markup ("[/x]" failed as SYSTEM_ERROR), and its escape sequences reached the terminal
    (and any pipe or log) as they were."""
    image = tmp_path / "c.vhdx"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vhdx", image, "16M"], check=True)
    with open(image, "r+b") as f:
        f.seek(8)
        f.write("[/oops] \x1b]0;pwned\x07\x1b[2J".encode("utf-16-le") + b"\0\0")
    leader, follower = os.openpty()
    try:
        proc = subprocess.run(
            [*REHOST, "image", "inspect", str(image)], stdout=follower, stderr=follower, timeout=60
        )
        os.close(follower)
        follower = -1
        out = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO once the terminal has nothing more
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "[/oops]" in text and "\\x1b]0;pwned\\x07" in text, text
    assert "\x1b]0;" not in text and "\x07" not in text, text
    piped = rehost("image", "inspect", image)  # a pipe, a log: the same text, escaped
    assert piped.returncode == 0 and "\\x1b]0;pwned\\x07" in piped.stdout, piped.stdout
    assert "\x1b" not in piped.stdout and "\x07" not in piped.stdout, piped.stdout
