"""Running a command with a timeout and turning failure into an error that shows everything needed to debug it."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence

DEFAULT_TIMEOUT = 30.0


class CommandFailed(RuntimeError):
    """A command exited non-zero (or timed out); the message carries argv, exit status, stdout and stderr."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stdout: str, stderr: str, reason: str = ""):
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        status = reason or f"exit status {returncode}"
        super().__init__(
            f"{' '.join(self.argv)}: {status}\n--- stdout ---\n{stdout.rstrip()}\n--- stderr ---\n{stderr.rstrip()}"
        )


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
    input: str | None = None,
    cwd: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv to completion, capturing text output; stdin is /dev/null unless input is given.

    A timeout always applies (subprocess kills the command when it expires) so a hung tool fails the test instead
    of hanging the suite.
    """
    try:
        result = subprocess.run(
            list(argv),
            env=dict(env) if env is not None else None,
            cwd=cwd,
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandFailed(argv, None, _text(exc.stdout), _text(exc.stderr), f"timed out after {timeout}s") from None
    if check and result.returncode != 0:
        raise CommandFailed(argv, result.returncode, result.stdout, result.stderr)
    return result
