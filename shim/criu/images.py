"""Checkpoint image directories: made private, written aside, and only then put in place.

A dump goes into a fresh 0700 directory next to the requested one; only a dump that
succeeded, with its record written last, is renamed into place. So a half-written image is
never found where a checkpoint is expected, and a failed dump leaves what was there before
untouched. The requested path must be absolute and is not followed through symlinks.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from typing import Any

RECORD = "pyshim-checkpoint.json"


class ImageError(ValueError):
    pass


class PartialImage:
    def __init__(self, target: str, path: str) -> None:
        self.target = target
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)

    def commit(self, record: dict[str, Any]) -> None:
        """Write the record (the mark of a complete image) and move the image into place."""
        write_private(os.path.join(self.path, RECORD), json.dumps(record, indent=1, sort_keys=True).encode())
        for name in os.listdir(self.path):  # images hold process memory: owner only
            path = os.path.join(self.path, name)
            if os.path.isfile(path) and not os.path.islink(path):
                os.chmod(path, 0o600)
        self.close()
        old = None
        if os.path.lexists(self.target):
            if os.path.islink(self.target) or not os.path.isdir(self.target):
                raise ImageError(f"{self.target} exists and is not a directory")
            if os.listdir(self.target):
                old = _sibling(self.target, "old")
                os.rename(self.target, old)
            else:
                os.rmdir(self.target)
        os.rename(self.path, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _sibling(target: str, kind: str, token: str | None = None) -> str:
    parent, name = os.path.split(target.rstrip("/"))
    return os.path.join(parent, f".{name}.pyshim-{kind}-{token or secrets.token_hex(4)}")


def partial_path(target: str, token: str) -> str:
    """Where a dump named by token writes its image before the commit (prepare(target, token))."""
    return _sibling(os.path.normpath(target), "partial", token)


def own_work_dir(bundle: str, token: str) -> str:
    """The work directory a dump named by token makes in the bundle when it is given none: CRIU's log is there."""
    return os.path.join(bundle, f"criu-work-{token}")


def write_private(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def prepare(target: str, token: str | None = None) -> PartialImage:
    """A private directory beside `target` for a dump to write into; its name ends with token when given (so that
    whoever started the dump can find it: partial_path()), else with a random one."""
    if not target or not os.path.isabs(target):
        raise ImageError(f"image path {target!r} must be absolute")
    target = os.path.normpath(target)
    parent = os.path.dirname(target)
    if os.path.islink(target):
        raise ImageError(f"image path {target} is a symbolic link; refusing to follow it")
    if not os.path.isdir(parent):
        raise ImageError(f"image path {target}: parent directory {parent} does not exist")
    path = _sibling(target, "partial", token)
    os.mkdir(path, 0o700)
    return PartialImage(target, path)


def read_record(image_dir: str) -> dict[str, Any] | None:
    """The record pyshim wrote beside a complete image, or None (an image from runc, the Go
    shim or anyone else)."""
    try:
        fd = os.open(os.path.join(image_dir, RECORD), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        try:
            return json.load(f)
        except ValueError as exc:
            raise ImageError(f"{image_dir}/{RECORD} is not valid JSON: {exc}") from None


def private_dir(path: str) -> None:
    """Create (or tighten) a directory only its owner can enter."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    if os.path.islink(path):
        raise ImageError(f"{path} is a symbolic link; refusing to follow it")
    os.chmod(path, 0o700)
