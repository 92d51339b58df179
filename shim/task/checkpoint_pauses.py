"""The pause containerd's client makes around a checkpoint, and resuming the task when its caller is gone.

containerd's client checkpoints a running task as State, Pause, Checkpoint, (the checkpoint written to content), and
a Resume deferred in the client's own process. When containerd dies after the Pause (kill -9 mid-checkpoint), that
Resume never comes and the task stays frozen for good; the Go shim leaves it so. pyshim recognises the sequence on
one connection: a Pause of a running task followed by that task's Checkpoint with no other call for the task in
between. If that connection closes before the Resume, the task is resumed as soon as the checkpoint is over (a dump in
progress runs to its end first: the task service lets it finish), and the log says so. A new containerd reconnecting
finds the task as it was before the checkpoint began.

A pause a user asked for (`ctr task pause`) is left alone: ctr's checkpoint asks the task's State first and, seeing
it paused, sends no Pause of its own, so a State (or any other call) comes between that pause and the Checkpoint.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from shim.background import BackgroundTasks


@dataclass(eq=False)
class _Pause:
    disconnected: asyncio.Future  # the connection the Pause came on; done once it has closed
    checkpoint: bool = False  # that connection's next call for the task was its Checkpoint
    checkpointing: bool = False  # ... which is still running


class CheckpointPauses:
    """Per task: the pause of the checkpoint in progress, until its Resume. resume(id, why) resumes a task."""

    def __init__(self, resume: Callable[[str, str], Coroutine[Any, Any, None]], background: BackgroundTasks) -> None:
        self._resume = resume
        self._pauses: dict[str, _Pause] = {}
        self._background = background

    def paused(self, container_id: str, disconnected: asyncio.Future | None, *, was_running: bool) -> None:
        """A Pause succeeded: it may be a checkpoint's, if the task ran before and a Checkpoint comes next."""
        self._pauses.pop(container_id, None)
        if was_running and disconnected is not None and not disconnected.done():
            self._pauses[container_id] = _Pause(disconnected)

    def called(self, container_id: str) -> None:
        """Another call for the task: a pause before it is not a checkpoint's (once the Checkpoint came, only the
        Resume ends it: containerd writes content meanwhile)."""
        pause = self._pauses.get(container_id)
        if pause is not None and not pause.checkpoint:
            del self._pauses[container_id]

    def checkpoint_started(self, container_id: str, disconnected: asyncio.Future | None) -> None:
        pause = self._pauses.get(container_id)
        if pause is None or pause.checkpoint or pause.disconnected is not disconnected:
            self.called(container_id)
            return
        pause.checkpoint = pause.checkpointing = True
        disconnected.add_done_callback(lambda _: self._caller_gone(container_id, pause))

    def checkpoint_ended(self, container_id: str) -> None:
        pause = self._pauses.get(container_id)
        if pause is not None and pause.checkpointing:
            pause.checkpointing = False
            if pause.disconnected.done():
                self._resume_now(container_id, pause, "its checkpoint ended after containerd's connection closed")

    def resumed(self, container_id: str) -> None:
        """The Resume came (or the task is gone): nothing left to do for it."""
        self._pauses.pop(container_id, None)

    def pending(self, container_id: str) -> bool:
        return container_id in self._pauses and self._pauses[container_id].checkpoint

    def _caller_gone(self, container_id: str, pause: _Pause) -> None:
        if self._pauses.get(container_id) is pause and not pause.checkpointing:
            self._resume_now(container_id, pause, "containerd's connection closed between its checkpoint and "
                                                  "the Resume")

    def _resume_now(self, container_id: str, pause: _Pause, why: str) -> None:
        del self._pauses[container_id]
        self._background.spawn(self._resume(container_id, why), f"resume {container_id} (checkpoint caller gone)")
