"""The last lines of a log file, for error messages and failure reports."""

from __future__ import annotations

from collections import deque
from pathlib import Path


def tail(path: Path, lines: int = 60) -> str:
    try:
        with open(path, errors="replace") as log:
            return "".join(deque(log, maxlen=lines))
    except FileNotFoundError:
        return f"({path} was not written)\n"
