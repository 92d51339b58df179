"""Process states and which operations each allows.

Every operation is defined in every state: it is allowed, or it fails with an error that
says why — FailedPrecondition, or NotFound once the process has finished. The rules are a
table, readable in one place, instead of one class per state.
"""

from __future__ import annotations

import enum

from shim.errors import FailedPrecondition, NotFound


class State(enum.Enum):
    CREATED = "created"
    RESTORE_PENDING = "created from checkpoint"  # Create recorded a checkpoint; Start restores it
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    DELETED = "deleted"

    @property
    def status(self) -> str:
        """The status name containerd knows (a pending restore is simply "created")."""
        return "created" if self is State.RESTORE_PENDING else self.value


_LIVE = {State.CREATED, State.RESTORE_PENDING, State.RUNNING, State.PAUSED}

INIT_ALLOWED: dict[str, set[State]] = {
    "start": {State.CREATED, State.RESTORE_PENDING},
    "pause": {State.RUNNING},
    "resume": {State.PAUSED},
    "kill": _LIVE,
    "delete": {State.CREATED, State.RESTORE_PENDING, State.STOPPED},
    "exec": {State.CREATED, State.RUNNING, State.PAUSED},
    "update": {State.CREATED, State.RUNNING, State.PAUSED},
    "checkpoint": {State.RUNNING, State.PAUSED},
    # As upstream (Init.Resize looks only at the console): an init that has exited keeps its pty master until
    # Delete, and `ctr run -t` resizes right after Start, which may be after a short-lived process ended.
    "resize": _LIVE | {State.STOPPED},
    "pids": {State.CREATED, State.RUNNING, State.PAUSED, State.STOPPED},
}

EXEC_ALLOWED: dict[str, set[State]] = {
    "start": {State.CREATED},
    "kill": {State.CREATED, State.RUNNING},
    "delete": {State.CREATED, State.STOPPED},
    "resize": {State.CREATED, State.RUNNING},
}


def check(allowed: dict[str, set[State]], operation: str, state: State, what: str) -> None:
    """Raise the error a caller gets for `operation` on a process in `state`."""
    if state in allowed[operation]:
        return
    if state in (State.STOPPED, State.DELETED) and operation in ("kill", "resize", "pids"):
        raise NotFound(f"{what}: process already finished")
    if state is State.DELETED:
        raise NotFound(f"{what}: process has been deleted")
    raise FailedPrecondition(f"cannot {operation} {what}: it is {state.value}")
