"""Building the tests' small static C helpers (integration/harness/*.c) with gcc, cached by
source and flags, each alone in its directory so it can be bind-mounted as it is."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from . import commands

HERE = Path(__file__).parent


def unavailable_reason(name: str) -> str | None:
    """Why helper `name` cannot be built here (no gcc), or None."""
    return None if shutil.which("gcc") else f"gcc is needed to build the {name} helper (apt-get install gcc)"


def build(name: str, cache_dir: Path, flags: tuple[str, ...]) -> Path:
    """`<cache_dir>/<name>-<key>/<name>` built from `<name>.c` beside this module."""
    source_path = HERE / f"{name}.c"
    source = source_path.read_bytes()
    key = hashlib.sha256(source + " ".join(flags).encode()).hexdigest()[:16]
    binary = cache_dir / f"{name}-{key}" / name
    if not binary.exists():
        binary.parent.mkdir(parents=True, exist_ok=True)
        partial = binary.with_suffix(f".tmp{os.getpid()}")
        commands.run(["gcc", *flags, "-o", str(partial), str(source_path)], timeout=120)
        os.replace(partial, binary)
    return binary
