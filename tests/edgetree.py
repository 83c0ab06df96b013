"""A source tree with every kind of entry and attribute an online migration must keep.

Shared by the transfer-core tests and the end-to-end tests, so that both prove the same list:
sparse files, hardlinks, symlinks, device nodes, FIFOs, sockets, setuid/setgid/sticky modes,
odd owners, user/trusted/security xattrs, POSIX ACLs, file capabilities, nanosecond times,
unicode, undecodable and 255-byte names, and excluded directories with contents.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
from pathlib import Path

MiB = 1024 * 1024


def text_bytes(n: int) -> bytes:
    return "".join(f"log line {i}: something happened\n" for i in range(n // 20)).encode()[:n]


def urandom_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            step = min(left, 4 * MiB)
            f.write(os.urandom(step))
            left -= step


def make_edge_tree(root: Path) -> None:
    """Every entry kind and attribute the transfer must keep."""
    root.mkdir(parents=True)
    d = root / "a" / "b" / "c" / "d"
    d.mkdir(parents=True)
    (d / "deep.txt").write_text("deep\n")
    (root / "empty").write_bytes(b"")
    (root / "small.txt").write_text("hello\n" * 100)
    (root / "text.log").write_bytes(text_bytes(300_000))
    urandom_file(root / "big.bin", 6 * MiB)
    with open(root / "sparse.img", "wb") as f:
        f.truncate(64 * MiB)
        f.write(os.urandom(100_000))
        f.seek(10 * MiB + 12345)
        f.write(os.urandom(5000))
        f.seek(64 * MiB - 10)
        f.write(b"end of it!")
    # hardlinks across directories, one group of three
    (root / "a" / "linked").write_text("one inode, three names\n")
    os.link(root / "a" / "linked", root / "a" / "b" / "linked2")
    os.link(root / "a" / "linked", root / "hard3")
    # symlinks: relative, absolute, dangling, to a directory
    os.symlink("small.txt", root / "sym-rel")
    os.symlink("/etc/passwd", root / "sym-abs")
    os.symlink("nowhere/at/all", root / "sym-dangling")
    os.symlink("a/b", root / "sym-dir")
    os.mknod(root / "null-dev", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "loop-dev", 0o660 | stat.S_IFBLK, os.makedev(7, 200))
    os.mkfifo(root / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock"))
    sock.close()
    # modes and owners
    (root / "suid").write_text("#!/bin/sh\n")
    os.chmod(root / "suid", 0o4755)
    (root / "sgid-dir").mkdir()
    os.chmod(root / "sgid-dir", 0o2775)
    (root / "sticky").mkdir()
    os.chmod(root / "sticky", 0o1777)
    (root / "noperm").write_text("x")
    os.chmod(root / "noperm", 0)
    (root / "readonly-dir").mkdir()
    (root / "readonly-dir" / "inside").write_text("x")
    os.chmod(root / "readonly-dir", 0o555)
    (root / "owned").write_text("owned by nobody known\n")
    os.chown(root / "owned", 12345, 54321)
    os.chown(root / "sym-rel", 4242, 4343, follow_symlinks=False)
    os.chown(root / "sticky", 1000, 1000)
    # xattrs, ACLs, SELinux label, file capabilities
    os.setxattr(root / "small.txt", "user.comment", b"a user xattr")
    os.setxattr(root / "small.txt", "trusted.secret", b"\x00\x01binary\xff")
    os.setxattr(root / "a", "security.selinux", b"system_u:object_r:etc_t:s0\x00")
    subprocess.run(["setfacl", "-m", "u:1234:rwx,g:4321:r-x", str(root / "a")], check=True)
    subprocess.run(["setfacl", "-d", "-m", "u:1234:rwx", str(root / "a")], check=True)
    subprocess.run(["setfacl", "-m", "u:999:r--", str(root / "small.txt")], check=True)
    (root / "ping").write_bytes(b"\x7fELF fake")
    subprocess.run(["setcap", "cap_net_raw+ep", str(root / "ping")], check=True)
    os.chown(root / "ping", 0, 12)  # after setcap: the kernel would clear it otherwise
    subprocess.run(["setcap", "cap_net_raw+ep", str(root / "ping")], check=True)
    # names: unicode, undecodable bytes, 255 bytes (ascii and multibyte)
    (root / "héllo wörld 世界").write_text("unicode\n")
    with open(os.path.join(os.fsencode(root), b"bad-\xff\xfe-name"), "wb") as f:
        f.write(b"latin-1 name\n")
    (root / ("L" * 255)).write_text("long ascii name\n")
    (root / ("é" * 127)).mkdir()  # 254 bytes
    (root / ("é" * 127) / ("世" * 85)).write_text("255 bytes of utf-8\n")
    # excluded trees: their directories arrive empty
    (root / "proc" / "1").mkdir(parents=True)
    (root / "proc" / "1" / "status").write_text("excluded\n")
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    (root / "tmp" / "scratch").write_text("excluded\n")
    # odd times, directories last and bottom-up so that their times stick
    os.utime(root / "small.txt", ns=(1_000_000_123, 1_600_000_000_987_654_321))
    os.utime(root / "sym-dangling", ns=(5, 1_500_000_000_000_000_001), follow_symlinks=False)
    for dirpath, _dirs, _files in sorted(os.walk(root), key=lambda w: -len(w[0])):
        os.utime(dirpath, ns=(1_400_000_000_000_000_000, 1_450_000_000_111_222_333))
