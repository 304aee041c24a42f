"""Compare two directory trees: content, type, mode, mtime, symlink targets,
device numbers and extended attributes (POSIX ACLs among them).

Used by the demo to prove a restore is exact, and by tests.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def _entries(root: Path) -> dict[bytes, os.stat_result]:
    result: dict[bytes, os.stat_result] = {}
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            result[os.path.relpath(full, base)] = os.lstat(full)
    return result


def _xattrs(path: bytes) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}  # the filesystem keeps none
    return {name: os.getxattr(path, name, follow_symlinks=False) for name in names}


def same_content(a: str | bytes | os.PathLike[str], b: str | bytes | os.PathLike[str]) -> bool:
    """True if ``b`` is a regular file with exactly the bytes of ``a``
    (False, not an error, if either cannot be read)."""
    try:
        if not os.path.isfile(b) or os.path.getsize(a) != os.path.getsize(b):
            return False
        with open(a, "rb") as fa, open(b, "rb") as fb:
            while True:
                block = fa.read(1 << 20)
                if block != fb.read(1 << 20):
                    return False
                if not block:
                    return True
    except OSError:
        return False


def diff_trees(expected: Path, actual: Path, *, check_dir_mtime: bool = True) -> list[str]:
    """Human-readable differences between two trees; empty when they are equal."""
    left, right = _entries(expected), _entries(actual)
    problems: list[str] = []
    for rel in sorted(left.keys() - right.keys()):
        problems.append(f"missing: {os.fsdecode(rel)}")
    for rel in sorted(right.keys() - left.keys()):
        problems.append(f"unexpected: {os.fsdecode(rel)}")
    base_a, base_b = os.fsencode(expected), os.fsencode(actual)
    for rel in sorted(left.keys() & right.keys()):
        a, b = left[rel], right[rel]
        shown = os.fsdecode(rel)
        if stat.S_IFMT(a.st_mode) != stat.S_IFMT(b.st_mode):
            problems.append(f"type differs: {shown}")
            continue
        path_a, path_b = os.path.join(base_a, rel), os.path.join(base_b, rel)
        if _xattrs(path_a) != _xattrs(path_b):
            problems.append(f"extended attributes differ: {shown}")
        if (stat.S_ISCHR(a.st_mode) or stat.S_ISBLK(a.st_mode)) and a.st_rdev != b.st_rdev:
            problems.append(f"device number differs: {shown}")
        if stat.S_ISLNK(a.st_mode):
            if os.readlink(os.path.join(base_a, rel)) != os.readlink(os.path.join(base_b, rel)):
                problems.append(f"symlink target differs: {shown}")
            continue
        if stat.S_IMODE(a.st_mode) != stat.S_IMODE(b.st_mode):
            problems.append(f"mode differs: {shown}")
        if stat.S_ISREG(a.st_mode):
            if a.st_mtime_ns != b.st_mtime_ns:
                problems.append(f"mtime differs: {shown}")
            if a.st_size != b.st_size or not same_content(
                os.path.join(base_a, rel), os.path.join(base_b, rel)
            ):
                problems.append(f"content differs: {shown}")
        elif check_dir_mtime and a.st_mtime_ns != b.st_mtime_ns:
            problems.append(f"mtime differs: {shown}")
    return problems
