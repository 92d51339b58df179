"""Errors of a CRIU call, carrying what a user needs to see: what was asked, what CRIU said
(cr_errno, cr_errmsg, how it exited) and the lines of its log that explain it.

They are ShimErrors, so the task service reports them like any other failure of the shim;
str() is one readable paragraph, fit to be quoted in a containerd error.
"""

from __future__ import annotations

import os

from shim.criu.log import format_quote, is_harmless
from shim.errors import ShimError, Unavailable


class CriuError(ShimError):
    """A CRIU call that did not succeed. action is the request type in CRIU's CLI spelling
    ("dump", "restore", "feature-check"...); log_lines is an excerpt of log_path (or of CRIU's
    stderr when there is no log file); pid is the criu process's (None if it never started)."""

    def __init__(self, action: str, *, log_path: str | None = None, log_lines: list[str] | None = None,
                 pid: int | None = None) -> None:
        super().__init__(action)
        self.action = action
        self.pid = pid
        self.log_path = log_path
        self.log_lines = list(log_lines or [])

    def log_moved(self, old: str, new: str) -> None:
        """The log at old was copied to new before old's directory went: the error names the copy."""
        if self.log_path == old:
            self.log_path = new

    def _what(self) -> str:
        raise NotImplementedError

    def __str__(self) -> str:
        text = f"criu {self.action} {self._what()}"
        if self.log_lines:
            text += format_quote(self.log_lines, source=f"CRIU log {self.log_path}" if self.log_path else "CRIU output")
        elif self.log_path:
            text += f" (CRIU log {self.log_path} has nothing to quote)"
        return text


class CriuFailed(CriuError):
    """CRIU answered with success=false, exited without a final answer, or was aborted because
    a notification handler failed (notification names it; the handler's exception is the
    __cause__)."""

    def __init__(self, action: str, *, cr_errno: int | None = None, cr_errmsg: str | None = None,
                 exit_status: int | None = None, notification: str | None = None, reason: str | None = None,
                 log_path: str | None = None, log_lines: list[str] | None = None, response=None,
                 pid: int | None = None) -> None:
        super().__init__(action, log_path=log_path, log_lines=log_lines, pid=pid)
        self.cr_errno = cr_errno
        self.cr_errmsg = cr_errmsg
        self.exit_status = exit_status
        self.notification = notification
        self.reason = reason
        self.response = response  # the final criu_resp when there was one

    def _what(self) -> str:
        parts = []
        if self.notification is not None:
            parts.append(f"aborted: the {self.notification!r} notification handler failed: {self.reason}")
        elif self.reason:
            parts.append(self.reason)
        if self.cr_errno:
            parts.append(f"errno {self.cr_errno} ({os.strerror(self.cr_errno)})")
        if self.cr_errmsg and not is_harmless(self.cr_errmsg):
            # CRIU's cr_errmsg is the FIRST error it logged, often incidental (an rlimit it could not raise, left
            # out then) rather than the cause, which the quoted log lines give: say which it is.
            parts.append(f"first error logged: {self.cr_errmsg.strip()}")
        if self.exit_status is not None:
            parts.append(f"criu exited with status {self.exit_status}")
        return "failed" + (": " + "; ".join(parts) if parts else "")


class CriuMissing(CriuFailed, Unavailable):
    """The criu binary could not be started (not installed, not executable)."""


class CriuTimeout(CriuError):
    """The call did not finish in time; CRIU was SIGKILLed and reaped before this was raised."""

    def __init__(self, action: str, timeout: float, *, waiting_for: str = "",
                 log_path: str | None = None, log_lines: list[str] | None = None, pid: int | None = None) -> None:
        super().__init__(action, log_path=log_path, log_lines=log_lines, pid=pid)
        self.timeout = timeout
        self.waiting_for = waiting_for

    def _what(self) -> str:
        during = f" while {self.waiting_for}" if self.waiting_for else ""
        return f"timed out after {self.timeout:g}s{during}; criu was killed"
