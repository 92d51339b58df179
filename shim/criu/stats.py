"""CRIU's own statistics of a dump or restore (stats-dump, stats-restore), read with pycriu."""

from __future__ import annotations

import os

from shim.criu import bindings


def read_stats(image_dir: str, kind: str = "dump") -> dict[str, int]:
    """The counters of stats-<kind> in image_dir (times in microseconds, pages in pages), or {}."""
    path = os.path.join(image_dir, f"stats-{kind}")
    try:
        with open(path, "rb") as f:
            entries = bindings.image_codec().load(f).get("entries") or []
    except (OSError, ValueError, Exception):  # a missing or unreadable file: no statistics, not a failure
        return {}
    return {key: int(value) for key, value in (entries[0].get(kind) or {}).items()} if entries else {}


def summary(stats: dict[str, int]) -> str:
    """One line for logs and events: 'frozen 7.8 ms, 30 pages written, ...'."""
    parts = []
    for key, label in (("freezing_time", "freezing"), ("frozen_time", "frozen"), ("memdump_time", "memdump"),
                       ("memwrite_time", "memwrite"), ("restore_time", "restore"), ("forking_time", "forking")):
        if key in stats:
            parts.append(f"{label} {stats[key] / 1000:.1f} ms")
    for key, label in (("pages_scanned", "pages scanned"), ("pages_written", "pages written"),
                       ("pages_restored", "pages restored")):
        if key in stats:
            parts.append(f"{stats[key]} {label}")
    return ", ".join(parts)
