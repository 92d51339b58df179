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


TIMES = ("freezing_time", "frozen_time", "memdump_time", "memwrite_time", "restore_time", "forking_time")


def within(stats: dict[str, int], elapsed_us: int) -> dict[str, int]:
    """stats without the times longer than the whole call took: CRIU's lazy dump leaves frozen_time counted from a
    start it never set (an hour, for a dump of a second), which no reader should take for a measurement."""
    return {key: value for key, value in stats.items() if key not in TIMES or value <= elapsed_us}


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
