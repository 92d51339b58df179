"""The command's errors: one line a person can act on, saying what failed, why, and what to do."""

from __future__ import annotations

import errno


class ToolError(Exception):
    """A failure the command reports as one line (exit status 1)."""


def from_rpc(exc, what: str, *, not_found: str | None = None, exists: str | None = None,
             precondition: str | None = None) -> ToolError:
    """containerd's gRPC error as a ToolError: the caller's words for the codes it expects, else containerd's."""
    # (grpc is not imported here: without it the command must still say how to install it)
    code = exc.code().name if hasattr(exc, "code") else ""
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    if code == "NOT_FOUND" and not_found:
        return ToolError(not_found)
    if code == "ALREADY_EXISTS" and exists:
        return ToolError(exists)
    if code == "FAILED_PRECONDITION" and precondition:
        return ToolError(f"{precondition}: {detail}")
    if code == "UNAVAILABLE" and "connect" in (detail or "").lower():
        return ToolError(f"{what}: containerd is not answering ({detail}); is it running, and is --address right?")
    if detail and detail.lower().startswith(what.lower().removeprefix("the ") + " failed"):
        return ToolError(detail)  # the shim's words already say what failed: not twice
    return ToolError(f"{what} failed: {detail or code}")


def from_os(exc: OSError, what: str) -> ToolError:
    """A filesystem failure as a ToolError, with the fix for the ones people hit (a full disk, permissions)."""
    if exc.errno == errno.ENOSPC:
        return ToolError(f"{what}: no space left on device{_where(exc)}; free some space or write elsewhere "
                         "(nothing half-written was kept)")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return ToolError(f"{what}: permission denied{_where(exc)}; run as root")
    return ToolError(f"{what}: {exc.strerror or exc}{_where(exc)}")


def _where(exc: OSError) -> str:
    return f" ({exc.filename})" if exc.filename else ""
