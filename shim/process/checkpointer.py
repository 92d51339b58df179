"""What the process layer asks of a checkpointer, as types: the seam between the task's init process and CRIU.

shim.criu.checkpoint.Checkpointer (in the server) and shim.criu.offload.OffloadedCheckpointer (in a worker) both
fit; the task service makes one on first use and the init process calls it. Types only: nothing here runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from shim.criu.netlock import Lock
    from shim.criu.options import CheckpointOptions
    from shim.oci.runtime import OciRuntime


class CheckpointOutcome(Protocol):
    """A dump's result: shim.criu.checkpoint.CheckpointResult's fields the shim reads."""

    @property
    def image_path(self) -> str: ...
    @property
    def stats(self) -> dict[str, int]: ...
    # CRIU's network lock left for Delete to remove (None: none left, or kept for a restore there).
    @property
    def network_lock(self) -> Lock | None: ...
    # A lazy dump's pages being served: completes with the final outcome.
    @property
    def completion(self) -> asyncio.Future | None: ...


class Checkpointer(Protocol):
    async def checkpoint(self, *, container_id: str, bundle: str, pid: int, options: CheckpointOptions,
                         runtime: OciRuntime, paused: Callable[[], bool]) -> CheckpointOutcome: ...
