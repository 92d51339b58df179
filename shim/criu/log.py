"""The lines of a CRIU log that say why it failed, and the one way pyshim quotes them in an error.

A CRIU log at log level 4 runs to thousands of lines (and without end when CRIU loops: a restore from truncated
pages logs tens of MB a second), and the line that explains a failure is rarely the first error or the last line.
Every run logs errors that are not causes (`rlimit: Can't setup RLIMIT_NOFILE` when CRIU runs in a user namespace
or under a limit it cannot raise), CRIU logs the cause and then cleanup errors, and ends with "Dumping FAILED." or
"Restoring FAILED.". The quoted lines are therefore the last error lines before that mark (or the end), harmless ones
left out; a log without any (CRIU killed, or hung and killed) is quoted by its last lines: where CRIU stopped.
"""

from __future__ import annotations

import os
import shutil
from collections import deque
from collections.abc import Iterable

# CRIU prefixes its own messages with the level: "(00.012345) Error (criu/cr-dump.c:2093): ...",
# "(00.000812) Warn  (criu/kerndat.c:...): ...". BUG_ON() is logged through pr_err too.
_FLAGS = (b"Error (", b"Warn  (", b"BUG")
# Errors and warnings CRIU logs on runs that go on to succeed: never the cause of a failure.
HARMLESS = (
    "rlimit: Can't setup RLIMIT_NOFILE",  # CRIU cannot raise its own fd limit (a user namespace, a hard limit)
    "cpu: fpu:",  # the CPU's register sets, listed at start
    "Set CLONE_PARENT | CLONE_NEWPID but it might cause restore problem",  # every restore into a pid namespace
)
_FAILED = (b"Dumping FAILED", b"Restoring FAILED", b"Pre-dumping FAILED", b"FAILED.")
MAX_CAUSES = 4  # error lines quoted: the cause and what CRIU said right after it
TAIL = 3  # lines quoted from where a log without errors stops
MAX_LINE = 400  # characters kept of one line: paths and errnos fit, hex dumps do not
HEAD_BYTES = 32 << 20  # of a huge log, the start and the end are read: the cause is near one of them
TAIL_BYTES = 4 << 20


def quote(path: str | os.PathLike | None, *, source: str = "CRIU log") -> str:
    """". From the CRIU log <path>: <line> | <line>" for an error message, or "" when the log has nothing."""
    return format_quote(log_excerpt(path) if path else [], source=f"{source} {path}" if path else source)


def keep(source: str | os.PathLike, destination: str | os.PathLike, *, max_bytes: int | None = None) -> str | None:
    """Copy a file CRIU wrote in a work directory that is about to go (its log, its statistics) to where it stays:
    private (0600), never written through a symlink. With max_bytes, a larger file keeps its two ends only, with a
    line saying what was left out: a CRIU that looped until its timeout (a damaged image the checks did not catch)
    logs tens of MB a second. The destination, or None when the source is not there or the copy failed."""
    try:
        with open(source, "rb") as original:
            size = os.fstat(original.fileno()).st_size
            fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as copy:
                os.fchmod(fd, 0o600)  # a file that was there keeps its mode through O_CREAT
                if max_bytes is None or size <= max_bytes:
                    shutil.copyfileobj(original, copy)
                else:
                    copy.write(original.read(max_bytes // 2))
                    copy.write(f"\n[pyshim: {size - max_bytes} bytes of this {size}-byte log left out]\n".encode())
                    original.seek(size - max_bytes // 2)
                    shutil.copyfileobj(original, copy)
        return os.fspath(destination)
    except OSError:
        return None


def format_quote(lines: list[str], *, source: str) -> str:
    return f". From the {source}: " + " | ".join(lines) if lines else ""


def log_excerpt(path: str | os.PathLike) -> list[str]:
    """The lines to quote from the log at path (see excerpt); [] when it does not exist (CRIU failed before
    opening it). A log of more than HEAD_BYTES + TAIL_BYTES is read at both ends only."""
    try:
        handle = open(path, "rb")
    except OSError:
        return []
    with handle:
        size = os.fstat(handle.fileno()).st_size
        if size <= HEAD_BYTES + TAIL_BYTES:
            return excerpt(handle)
        head = handle.read(HEAD_BYTES).splitlines()[:-1]  # the last line is cut
        handle.seek(size - TAIL_BYTES)
        tail = handle.read(TAIL_BYTES).splitlines()[1:]  # the first line is cut
        return excerpt([*head, *tail])


def excerpt(lines: Iterable[bytes]) -> list[str]:
    """The last MAX_CAUSES error or warning lines before CRIU's FAILED line (or the end), harmless ones left out,
    the first with the line before it, and the last line when CRIU stopped without saying it failed (killed);
    without any error, the last TAIL lines. Each line once (the same failure logged per task or per retry differs only
    in its timestamp), in file order, clipped to MAX_LINE characters."""
    # Each cause with the line logged just before it when that is not an error itself: CRIU often says what it
    # was at there ("No inventory.img image", then "Unexpected EOF on (empty-image)").
    causes: deque[tuple[str | None, str]] = deque(maxlen=MAX_CAUSES)
    tail: deque[str] = deque(maxlen=TAIL * 4)  # repeats are dropped after: a looping CRIU logs the same few lines
    before: str | None = None
    failed = False  # CRIU said it failed; a log without that mark ends where CRIU was killed
    for raw in lines:
        raw = raw.rstrip(b"\r\n")
        if not raw.strip():
            continue
        if any(mark in raw for mark in _FAILED):
            failed = True
            break
        text = raw.decode("utf-8", "replace").replace("\t", " ")
        tail.append(text)
        flagged = any(flag in raw for flag in _FLAGS)
        if flagged and not is_harmless(text):
            causes.append((before, text))
        before = None if flagged else text
    if not causes:
        return _distinct(list(tail))[-TAIL:]
    chosen = [text for _, text in causes]
    context = causes[0][0]
    where = [] if failed or tail[-1] == chosen[-1] else [tail[-1]]  # the line CRIU was killed after
    return _distinct(([context] if context else []) + chosen + where)


def is_harmless(text: str) -> bool:
    """Whether a CRIU message (a log line, or cr_errmsg) is one logged on runs that succeed too."""
    return any(pattern in text for pattern in HARMLESS)


def _distinct(lines: list[str]) -> list[str]:
    """The lines without repeats (compared without CRIU's timestamp), the last of each kept, clipped."""
    seen: set[str] = set()
    kept: list[str] = []
    for text in reversed(lines):
        key = _without_timestamp(text)
        if key not in seen:
            seen.add(key)
            kept.append(text if len(text) <= MAX_LINE else text[:MAX_LINE - 3] + "...")
    return kept[::-1]


def _without_timestamp(text: str) -> str:
    """CRIU's "(00.012345) " prefix differs between otherwise identical lines."""
    if text.startswith("(") and ") " in text[:16]:
        return text.split(") ", 1)[1]
    return text
