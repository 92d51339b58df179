"""Mounting a container's rootfs from containerd's Mount list (unmounting: shim.rootfs.unmount).

Options are split into mount(2) flags and filesystem data the way containerd's mount
package does, so a Mount behaves the same under pyshim as under the Go shim.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field

from shim.rootfs.unmount import unmount_all

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24

# option -> (clear?, flag)
FLAGS: dict[str, tuple[bool, int]] = {
    "async": (True, MS_SYNCHRONOUS), "atime": (True, MS_NOATIME), "bind": (False, MS_BIND),
    "defaults": (False, 0), "dev": (True, MS_NODEV), "diratime": (True, MS_NODIRATIME),
    "dirsync": (False, MS_DIRSYNC), "exec": (True, MS_NOEXEC), "mand": (False, MS_MANDLOCK),
    "noatime": (False, MS_NOATIME), "nodev": (False, MS_NODEV), "nodiratime": (False, MS_NODIRATIME),
    "noexec": (False, MS_NOEXEC), "nomand": (True, MS_MANDLOCK), "norelatime": (True, MS_RELATIME),
    "nostrictatime": (True, MS_STRICTATIME), "nosuid": (False, MS_NOSUID), "rbind": (False, MS_BIND | MS_REC),
    "relatime": (False, MS_RELATIME), "remount": (False, MS_REMOUNT), "ro": (False, MS_RDONLY),
    "rw": (True, MS_RDONLY), "strictatime": (False, MS_STRICTATIME), "suid": (True, MS_NOSUID),
    "sync": (False, MS_SYNCHRONOUS),
}
PROPAGATION = {"private": MS_PRIVATE, "rprivate": MS_PRIVATE | MS_REC, "slave": MS_SLAVE,
               "rslave": MS_SLAVE | MS_REC, "shared": MS_SHARED, "rshared": MS_SHARED | MS_REC}

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True, slots=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class MountPlan:
    flags: int
    propagation: int
    data: str
    options: tuple[str, ...] = field(default=())


def plan(options: tuple[str, ...] | list[str]) -> MountPlan:
    flags = propagation = 0
    data = []
    for option in options:
        if option in FLAGS:
            clear, flag = FLAGS[option]
            flags = flags & ~flag if clear else flags | flag
        elif option in PROPAGATION:
            propagation |= PROPAGATION[option]
        else:
            data.append(option)
    return MountPlan(flags, propagation, ",".join(data), tuple(options))


def _mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    if _libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                   data.encode() if data else None) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {source} on {target} ({fstype or 'none'}): {os.strerror(errno)}")


def mount(m: Mount, target: str) -> None:
    p = plan(m.options)
    fstype = "" if p.flags & MS_BIND else m.type
    _mount(m.source, target, fstype, p.flags & ~MS_REMOUNT if p.flags & MS_BIND else p.flags, p.data)
    if p.flags & MS_BIND and p.flags & (MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC):
        # A bind mount ignores most flags on creation; a remount applies them.
        _mount("", target, "", p.flags | MS_REMOUNT, "")
    if p.propagation:
        _mount("", target, "", p.propagation, "")


def mount_all(mounts: list[Mount], target: str) -> None:
    done = []
    try:
        for m in mounts:
            mount(m, target)
            done.append(m)
    except OSError:
        if done:
            unmount_all(target)
        raise
