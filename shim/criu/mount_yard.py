"""CRIU's root yard: the directory /tmp/.criu.mntns.XXXXXX a restore makes in the host's /tmp (the mounts it holds
live in CRIU's own mount namespace, so here it is empty) and removes when the restore ends. A CRIU killed
mid-restore leaves it behind. The shim removes it after a failed or killed restore, finding its name in that
restore's log (at -v4 CRIU logs every mount it makes there), so that only this restore's yard is touched, and only
while it is empty."""

from __future__ import annotations

import os
import re

YARD = re.compile(rb"/tmp/\.criu\.mntns\.[A-Za-z0-9]{6}(?![A-Za-z0-9])")  # CRIU's mkdtemp template
SCAN_BYTES = 8 << 20  # the yard is named while the mounts are prepared, near the log's start


def named_in(log_path: str) -> str | None:
    try:
        with open(log_path, "rb") as f:
            found = YARD.search(f.read(SCAN_BYTES))
    except OSError:
        return None
    return found.group().decode() if found else None


def remove_left_behind(log_path: str) -> str | None:
    """Remove the yard the restore logged in log_path if it is still there and empty; the path removed."""
    path = named_in(log_path)
    if path is None:
        return None
    try:
        os.rmdir(path)
    except OSError:  # gone (CRIU removed it), or not empty: not what a killed CRIU leaves, so not ours to remove
        return None
    return path
