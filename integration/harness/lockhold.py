"""The lockhold helper (lockhold.c beside this file): holds a flock and reports whether it still holds it, which no
busybox applet does (Debian 12's busybox has no flock). Built with the host's gcc into a directory of its own, which
tests bind-mount read-only into a container; cached by the source's content.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from . import commands

SOURCE = Path(__file__).with_name("lockhold.c")
FLAGS = ("-static", "-Os", "-s", "-Wall", "-Wextra", "-Werror")


def unavailable_reason() -> str | None:
    """Why the helper cannot be built here (no gcc), or None."""
    return None if shutil.which("gcc") else "gcc is needed to build the lockhold helper (apt-get install gcc)"


def build_lockhold(cache_dir: Path) -> Path:
    """The built helper, `<cache_dir>/lockhold-<key>/lockhold`: alone in its directory, to be mounted as it is."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:16]
    binary = cache_dir / f"lockhold-{key}" / "lockhold"
    if not binary.exists():
        binary.parent.mkdir(parents=True, exist_ok=True)
        partial = binary.with_suffix(f".tmp{os.getpid()}")
        commands.run(["gcc", *FLAGS, "-o", str(partial), str(SOURCE)], timeout=120)
        os.replace(partial, binary)
    return binary
