"""The lockhold helper (lockhold.c beside this file): holds a flock and reports whether it still holds it, which no
busybox applet does (Debian 12's busybox has no flock). Built with the host's gcc into a directory of its own, which
tests bind-mount read-only into a container; cached by the source's content.
"""

from __future__ import annotations

from pathlib import Path

from . import cbuild

FLAGS = ("-static", "-Os", "-s", "-Wall", "-Wextra", "-Werror")


def unavailable_reason() -> str | None:
    return cbuild.unavailable_reason("lockhold")


def build_lockhold(cache_dir: Path) -> Path:
    return cbuild.build("lockhold", cache_dir, FLAGS)
