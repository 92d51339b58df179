"""A container's changes to its image's filesystem: taken from its overlay snapshot's upper directory as a tar
with OCI whiteouts (what containerd's CRI writes as rootfs-diff.tar), and applied to a new container's snapshot.

Deleted files are `.wh.<name>` entries, a directory whose lower contents were hidden gets `.wh..wh..opq` right
after its own entry. Applying writes into the new snapshot's upper directory as overlayfs stores changes
(whiteouts as 0:0 character devices, opaque directories by xattr), or straight into a snapshot that is a plain
directory (a bind mount), deleting what the whiteouts name. Podman's `deleted.files` list is honoured the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tarfile

from shim.tool.errors import ToolError

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"


def mount_option(mount, key: str) -> str | None:
    for option in mount.options:
        name, _, value = option.partition("=")
        if name == key:
            return value
    return None


def writable_layer(mounts) -> tuple[str, str]:
    """("overlay", upperdir) or ("directory", path) of a snapshot's mounts; ToolError for anything else."""
    if len(mounts) == 1 and mounts[0].type == "overlay":
        upper = mount_option(mounts[0], "upperdir")
        if upper:
            return "overlay", upper
    if len(mounts) == 1 and mounts[0].type == "bind":
        return "directory", mounts[0].source
    kinds = ", ".join(m.type for m in mounts) or "none"
    raise ToolError(f"the container's snapshot mounts as {kinds}: pyshim reads and writes rootfs changes of the "
                    "overlayfs snapshotter only; use --ignore-rootfs to checkpoint without them")


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _opaque(path: str) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def write_diff(upper: str, target: str) -> int:
    """The upper directory as a tar at target; the number of entries (whiteouts included)."""
    count = 0
    with tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as tar:
        for root, dirs, files in os.walk(upper):
            dirs.sort()
            relative_root = os.path.relpath(root, upper)
            for name in sorted(dirs + files):
                path = os.path.join(root, name)
                arcname = os.path.normpath(os.path.join(relative_root, name))
                st = os.lstat(path)
                if _is_whiteout(st):
                    marker = tarfile.TarInfo(os.path.join(os.path.dirname(arcname), WHITEOUT + name)
                                             if os.path.dirname(arcname) else WHITEOUT + name)
                    marker.mtime = int(st.st_mtime)
                    tar.addfile(marker)
                else:
                    info = tar.gettarinfo(path, arcname)
                    info.uname = info.gname = ""
                    if info.isreg():
                        with open(path, "rb") as f:
                            tar.addfile(info, f)
                    else:
                        tar.addfile(info)
                    if stat.S_ISDIR(st.st_mode) and _opaque(path):
                        marker = tarfile.TarInfo(os.path.join(arcname, OPAQUE))
                        marker.mtime = int(st.st_mtime)
                        tar.addfile(marker)
                        count += 1
                count += 1
    return count


def apply_diff(tar_path: str, kind: str, layer: str, deleted_files: str | None = None) -> int:
    """Apply a rootfs diff (and a Podman deleted.files list) to a snapshot's writable layer; entries applied."""
    count = 0
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            for member in tar:
                directory, name = os.path.split(member.name)
                if name == OPAQUE:
                    _make_opaque(kind, layer, directory)
                elif name.startswith(WHITEOUT):
                    _delete(kind, layer, os.path.join(directory, name[len(WHITEOUT):]))
                else:
                    existing = _inside(layer, member.name)
                    if os.path.lexists(existing) and not (member.isdir() and os.path.isdir(existing)):
                        _remove_any(existing)
                    tar.extract(member, layer, filter="tar")
                count += 1
    except (tarfile.TarError, EOFError) as exc:
        raise ToolError(f"the checkpoint's rootfs-diff.tar is corrupt ({exc}); export the checkpoint again") from None
    except tarfile.FilterError as exc:
        raise ToolError(f"the checkpoint's rootfs-diff.tar has an entry outside the container's rootfs ({exc}); "
                        "refusing it") from None
    if deleted_files and os.path.exists(deleted_files):
        with open(deleted_files) as f:
            for path in json.load(f) or []:
                _delete(kind, layer, str(path).lstrip("/"))
                count += 1
    return count


def _inside(layer: str, name: str) -> str:
    path = os.path.normpath(os.path.join(layer, name.lstrip("/")))
    if not (path + "/").startswith(os.path.normpath(layer) + "/"):
        raise ToolError(f"the checkpoint's rootfs-diff.tar names {name!r}, outside the container's rootfs; refusing it")
    return path


def _remove_any(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _delete(kind: str, layer: str, name: str) -> None:
    path = _inside(layer, name)
    if os.path.lexists(path):
        _remove_any(path)
    if kind == "overlay":
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def _make_opaque(kind: str, layer: str, directory: str) -> None:
    path = _inside(layer, directory)
    os.makedirs(path, exist_ok=True)
    if kind == "overlay":
        os.setxattr(path, OPAQUE_XATTR, b"y")
    else:
        for name in os.listdir(path):
            _remove_any(os.path.join(path, name))
