"""The part of a CRIU log worth quoting to a user.

A CRIU log at log level 4 runs to thousands of lines (megabytes for a big container), and the
line that explains a failure is rarely the last one: CRIU logs the cause ("Error (criu/...)")
and then pages of cleanup. An excerpt is therefore every Error/Warn line plus the last few
lines, in file order, without repeats, each line and the whole bounded so that the result
fits in an error message sent to containerd.
"""

from __future__ import annotations

import os
from collections import deque

# CRIU prefixes its own messages with the level: "(00.012345) Error (criu/cr-dump.c:2093): ...",
# "(00.000812) Warn  (criu/kerndat.c:...): ...". BUG_ON() is logged through pr_err too.
_FLAGS = (b"Error (", b"Warn ", b"BUG")
MAX_LINE = 400  # characters kept of one line: paths and errnos fit, hex dumps do not
MAX_FLAGGED = 20  # Error/Warn lines kept: the first ones are the causes, the rest follow from them


def log_excerpt(path: str | os.PathLike, max_lines: int = 10, max_chars: int = 4000) -> list[str]:
    """Error/Warn lines and the last max_lines lines of the log at path, in file order.

    A log that does not exist (CRIU failed before opening it) gives an empty list; reading is
    streamed, so a huge log costs time, not memory."""
    try:
        handle = open(path, "rb")
    except OSError:
        return []
    with handle:
        return excerpt(handle, max_lines=max_lines, max_chars=max_chars)


def excerpt(lines, max_lines: int = 10, max_chars: int = 4000) -> list[str]:
    """The excerpt of any iterable of (bytes) lines; see log_excerpt."""
    flagged: list[tuple[int, bytes]] = []
    tail: deque[tuple[int, bytes]] = deque(maxlen=max_lines)
    for number, line in enumerate(lines):
        line = line.rstrip(b"\r\n")
        if not line.strip():
            continue
        if len(flagged) < MAX_FLAGGED and any(flag in line for flag in _FLAGS):
            flagged.append((number, line))
        tail.append((number, line))
    chosen = dict(flagged)
    chosen.update(tail)
    result: list[str] = []
    seen: set[str] = set()
    for number in sorted(chosen):
        text = _clip(chosen[number].decode("utf-8", "replace").replace("\t", " "))
        # The same failure is often logged once per task or per retry: quote it once.
        key = _without_timestamp(text)
        if key not in seen:
            seen.add(key)
            result.append(text)
    return _bound(result, max_chars)


def _bound(lines: list[str], max_chars: int) -> list[str]:
    """Drop lines from the middle until the rest fits: the first errors are the causes and the
    last lines say where CRIU stopped, so both ends are worth more than what lies between."""
    if sum(map(len, lines)) <= max_chars:
        return lines
    head, tail = lines[: len(lines) // 2], lines[len(lines) // 2:]
    while head or tail:
        if sum(map(len, head)) + sum(map(len, tail)) + 3 <= max_chars:
            break
        if len(head) >= len(tail):
            head.pop()
        else:
            tail.pop(0)
    return head + ["..."] + tail


def _clip(text: str) -> str:
    return text if len(text) <= MAX_LINE else text[:MAX_LINE - 3] + "..."


def _without_timestamp(text: str) -> str:
    """CRIU's "(00.012345) " prefix differs between otherwise identical lines."""
    if text.startswith("(") and ") " in text[:16]:
        return text.split(") ", 1)[1]
    return text
