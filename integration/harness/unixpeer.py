"""The unixpeer helper (unixpeer.c beside this file): a static binary that busybox does not replace (its nc has no
unix datagram mode). Built with the host's gcc into a directory of its own, which tests bind-mount read-only into a
container; cached by the source's content, like the images.
"""

from __future__ import annotations

from pathlib import Path

from . import cbuild

FLAGS = ("-static", "-Os", "-Wall", "-Wextra", "-Werror")


def unavailable_reason() -> str | None:
    return cbuild.unavailable_reason("unixpeer")


def build_unixpeer(cache_dir: Path) -> Path:
    return cbuild.build("unixpeer", cache_dir, FLAGS)
