"""Runs OCI runtime commands through the reaper and turns failures into RuntimeFailed
with the runtime's own error message (from its JSON log, as go-runc does)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence

from shim.children.reaper import Reaper
from shim.children.spawn import Completed, run

DEFAULT_TIMEOUT = 60.0


class RuntimeFailed(Exception):
    def __init__(self, argv: Sequence[str], status: int, message: str) -> None:
        self.argv = list(argv)
        self.status = status
        self.message = message
        super().__init__(f"{os.path.basename(argv[0])} {_subcommand(argv)} failed: {message}")


def _subcommand(argv: Sequence[str]) -> str:
    takes_value = {"--root", "--log", "--log-format"}
    skip = False
    for arg in argv[1:]:
        if skip:
            skip = False
        elif arg in takes_value:
            skip = True
        elif not arg.startswith("-"):
            return arg
    return ""


def last_error(log_path: str, since: int = 0) -> str:
    """The last error-level message the runtime wrote to its JSON log after offset `since`."""
    try:
        with open(log_path, "rb") as log:
            log.seek(since)
            lines = log.read().splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal", "panic"):
            return str(entry.get("msg", ""))
    return ""


class Runner:
    def __init__(self, reaper: Reaper, log_path: str = "") -> None:
        self.reaper = reaper
        self.log_path = log_path

    async def __call__(self, argv: Sequence[str], *, input: bytes | None = None,
                       stdio: tuple[int | None, int | None, int | None] | None = None,
                       pass_fds: Mapping[int, int] | None = None, timeout: float = DEFAULT_TIMEOUT,
                       cwd: str | None = None, started: Callable[[int], object] | None = None) -> Completed:
        offset = _size(self.log_path)
        try:
            result = await run(self.reaper, argv, input=input, stdio=stdio, pass_fds=pass_fds, timeout=timeout,
                               cwd=cwd, started=started)
        except FileNotFoundError:
            raise RuntimeFailed(argv, 127, f"{argv[0]}: executable not found in PATH") from None
        except TimeoutError as exc:
            raise RuntimeFailed(argv, 137, str(exc)) from None
        if result.status != 0:
            message = last_error(self.log_path, offset) if self.log_path else ""
            message = message or result.stderr.decode(errors="replace").strip() or f"exit status {result.status}"
            raise RuntimeFailed(argv, result.status, message)
        return result


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size if path else 0
    except OSError:
        return 0
