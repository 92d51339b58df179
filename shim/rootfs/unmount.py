"""Unmounting everything below a path: what `delete` does to a rootfs on containerd's hot
path, so it needs nothing beyond ctypes."""

from __future__ import annotations

import ctypes
import os

MNT_DETACH = 0x2
EINVAL = 22

_libc = ctypes.CDLL(None, use_errno=True)


def mount_points_under(path: str, mountinfo: str | None = None) -> list[str]:
    """Mount points at or below path, deepest first (the order to unmount them in)."""
    if mountinfo is None:
        with open("/proc/self/mountinfo") as f:
            mountinfo = f.read()
    path = os.path.normpath(path)
    points = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4:
            point = fields[4].encode().decode("unicode_escape")  # mountinfo escapes spaces as \040
            if point == path or point.startswith(path + "/"):
                points.append(point)
    return sorted(points, key=lambda p: p.count("/"), reverse=True)


def unmount_all(path: str) -> None:
    """Unmount everything at and below path; busy mounts are detached rather than left."""
    for _ in range(8):  # stacked mounts on one point need one pass each
        points = mount_points_under(path)
        if not points:
            return
        for point in points:
            if _libc.umount2(point.encode(), 0) != 0 and ctypes.get_errno() != EINVAL:  # gone already
                _libc.umount2(point.encode(), MNT_DETACH)
