"""The unixpeer helper (unixpeer.c beside this file): a static binary that busybox does not replace (its nc has no
unix datagram mode). Built with the host's gcc into a directory of its own, which tests bind-mount read-only into a
container; cached by the source's content, like the images.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from . import commands

SOURCE = Path(__file__).with_name("unixpeer.c")
FLAGS = ("-static", "-Os", "-Wall", "-Wextra", "-Werror")


def unavailable_reason() -> str | None:
    """Why the helper cannot be built here (no gcc), or None."""
    return None if shutil.which("gcc") else "gcc is needed to build the unixpeer helper (apt-get install gcc)"


def build_unixpeer(cache_dir: Path) -> Path:
    """The built helper, `<cache_dir>/unixpeer-<key>/unixpeer`: alone in its directory, to be mounted as it is."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:16]
    binary = cache_dir / f"unixpeer-{key}" / "unixpeer"
    if not binary.exists():
        binary.parent.mkdir(parents=True, exist_ok=True)
        partial = binary.with_suffix(f".tmp{os.getpid()}")
        commands.run(["gcc", *FLAGS, "-o", str(partial), str(SOURCE)], timeout=120)
        os.replace(partial, binary)
    return binary
