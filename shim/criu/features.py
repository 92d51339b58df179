"""Kernel features asked of the CRIU binary on this host, outside the shim (`pyshim migrate`'s preflight).

The shim asks CRIU's feature check over RPC before a dump (shim/criu/checkpoint.py); a command that must refuse
before it asks the shim for anything runs `criu check --feature` itself, as `pyshim doctor` does.
"""

from __future__ import annotations

import shutil
import subprocess

DIRTY_TRACKING = "mem_dirty_track"  # `criu check --feature` name of soft-dirty memory tracking


def missing(feature: str, *, criu: str | None = None, timeout: float = 30) -> str:
    """Why CRIU on this host cannot use feature: what it said; "" when it can."""
    binary = criu or shutil.which("criu")
    if binary is None:
        return "criu is not on PATH"
    try:
        result = subprocess.run([binary, "check", "--feature", feature], capture_output=True, text=True,
                                timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`criu check --feature {feature}` could not run: {exc}"
    if result.returncode == 0:
        return ""
    said = " ".join((result.stderr + result.stdout).split()).rstrip(".")
    return f"`criu check --feature {feature}` failed: {said[:300] or f'exit status {result.returncode}'}"
