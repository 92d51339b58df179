"""The one owner of a server's background tasks: work that outlives the call that started it.

A task given to `spawn` is held until it ends (asyncio keeps only weak references to tasks), its failure is logged
rather than lost, and at Shutdown `close` lets what is running finish for a bounded time, then cancels the rest and
says which. Every layer that starts such work is handed the server's one instance (no module-level task sets).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class BackgroundTasks:
    def __init__(self) -> None:
        self._running: dict[asyncio.Task[Any], str] = {}
        self._closed = False

    def spawn(self, work: Coroutine[Any, Any, T], what: str) -> asyncio.Task[T]:
        """Run `work` in the background; `what` names it in the log (its failure, or its cancellation at close)."""
        task = asyncio.get_running_loop().create_task(work)
        if self._closed:  # started after close() returned: nobody waits for it any more
            log.warning("background task started after shutdown: %s", what)
        self._running[task] = what
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        what = self._running.pop(task, "?")
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed: %s", what, task.exception(), exc_info=task.exception())

    @property
    def running(self) -> list[str]:
        """What is still running, by the names given to spawn."""
        return sorted(self._running.values())

    async def close(self, grace: float) -> None:
        """Wait up to `grace` seconds for the running tasks (and what they start meanwhile), then cancel the rest,
        logging what was cut short."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self._running and (left := deadline - loop.time()) > 0:
            await asyncio.wait(set(self._running), timeout=left)
        if not self._running:
            log.debug("background tasks: all finished")
            self._closed = True
            return
        log.warning("shutting down: cancelling %d background task(s) still running after %gs: %s",
                    len(self._running), grace, ", ".join(self.running))
        pending = set(self._running)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self._closed = True
