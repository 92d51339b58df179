"""Extracting one member of an untrusted tar archive, on every Python pyshim runs on.

tarfile's extraction filters ("data", "tar") came with Python 3.11.4; Debian 12's python3 is 3.11.2, which has
neither the filters nor tarfile.FilterError. Where they exist they are used; elsewhere the same refusals that matter
for checkpoint archives are made here: nothing lands outside the destination (through `..`, an absolute name, a link
or a symlink already extracted), and in "data" mode no link points outside, no device or fifo is made and no
setuid/setgid/sticky or group/other write bit survives.
"""

from __future__ import annotations

import os
import stat
import tarfile

HAS_FILTERS = hasattr(tarfile, "data_filter")


class UnsafeMember(tarfile.TarError):
    """A member that would land or point outside the destination, or that "data" mode does not allow."""


# What an unsafe member raises: tarfile's own FilterError (a TarError) where the filters exist, ours elsewhere.
REFUSED: tuple[type[Exception], ...] = (UnsafeMember, *((tarfile.FilterError,) if HAS_FILTERS else ()))

_DROPPED_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | stat.S_IWGRP | stat.S_IWOTH


def extract(tar: tarfile.TarFile, member: tarfile.TarInfo, destination: str, *, data: bool,
            use_filters: bool = HAS_FILTERS) -> None:
    """Extract member into destination: data=True for files that must be plain data (tarfile's "data" filter),
    False for a root filesystem's diff, whose absolute symlinks, devices and modes are the point ("tar" filter)."""
    if use_filters:
        tar.extract(member, destination, filter="data" if data else "tar")
        return
    _check(member, destination, data)
    if data and member.isfile():
        member.mode &= ~_DROPPED_BITS
    tar.extract(member, destination)


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root + os.sep)


def _check(member: tarfile.TarInfo, destination: str, data: bool) -> None:
    root = os.path.realpath(destination)
    target = os.path.realpath(os.path.join(root, member.name.lstrip("/")))
    if not _inside(root, target):
        raise UnsafeMember(f"{member.name!r} would be extracted outside {destination}")
    if member.islnk():
        linked = os.path.realpath(os.path.join(root, member.linkname.lstrip("/")))
        if not _inside(root, linked):
            raise UnsafeMember(f"{member.name!r} links to {member.linkname!r}, outside {destination}")
    if not data:
        return
    if member.isdev() or member.isfifo():
        raise UnsafeMember(f"{member.name!r} is a device or fifo, which a data archive does not hold")
    if member.issym():
        if os.path.isabs(member.linkname):
            raise UnsafeMember(f"{member.name!r} is a symlink to the absolute path {member.linkname!r}")
        pointed = os.path.realpath(os.path.join(os.path.dirname(target), member.linkname))
        if not _inside(root, pointed):
            raise UnsafeMember(f"{member.name!r} is a symlink to {member.linkname!r}, outside {destination}")
