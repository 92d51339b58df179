"""Reading cgroupfs and procfs files, with "not there" as a value instead of an error.

The only module here that opens stat files. A controller that is not enabled, a kernel
that lacks a file, or a cgroup removed while we read all look the same to a Stats call:
that value is skipped. Any other error is real and propagates.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

# ENODEV: reading a file of a cgroup that was removed after open. EOPNOTSUPP/EINVAL:
# deprecated v1 files (memory.kmem.*) some kernels still list but refuse to read.
_ABSENT = {errno.ENOENT, errno.ENOTDIR, errno.ENODEV, errno.ESRCH, errno.EOPNOTSUPP, errno.EINVAL}


def read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError as error:
        if error.errno in _ABSENT:
            return None
        raise


def read_parsed(path: Path, parse: Callable[[str], T]) -> T | None:
    """A file's content through `parse`, or None if the file is absent or unparseable
    (a garbled value is logged and skipped rather than failing the whole Stats call)."""
    text = read_text(path)
    if text is None:
        return None
    try:
        return parse(text)
    except ValueError:
        log.warning("cannot parse %s: %r", path, text[:100])
        return None


def list_names(directory: Path) -> list[str]:
    try:
        return [entry.name for entry in directory.iterdir()]
    except OSError as error:
        if error.errno in _ABSENT:
            return []
        raise
