"""Finding and removing mounts below a directory (what a test's containerd, shims or runc left mounted)."""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path

MNT_DETACH = 2
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def mounts_under(directory: Path) -> list[str]:
    """Mount points at or below directory, in mount order (so reversed() unmounts children before parents)."""
    prefix = str(directory).rstrip("/")
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = _unescape(line.split()[4])
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return points


def _umount2(target: str, flags: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(target), flags) != 0:
        return ctypes.get_errno()
    return 0


def unmount_all_under(directory: Path, rounds: int = 5) -> list[str]:
    """Unmount everything at or below directory; a busy mount is detached lazily. Returns what was unmounted."""
    unmounted: list[str] = []
    for _ in range(rounds):  # stacked mounts on one point need one pass each
        points = mounts_under(directory)
        if not points:
            break
        for point in reversed(points):
            if _umount2(point, 0) != 0:
                _umount2(point, MNT_DETACH)
            unmounted.append(point)
    return unmounted
