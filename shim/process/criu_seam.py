"""What the process layer asks of CRIU, as types: the seam between a container's init process and shim/criu.

The composition root (shim/server/daemon.py) hands the task service one object that fits both Checkpointer and
Restorer (shim.criu.access.CriuAccess); tests hand in fakes. Types only: nothing here runs, and nothing of shim/criu
is imported but the options' type.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from shim.bundle.config import Bundle
    from shim.criu.options import CheckpointOptions
    from shim.oci.runtime import OciRuntime

# The fds the OCI runtime gets as 0, 1 and 2 (None: /dev/null), as shim.stdio.process_io.ProcessIO has them.
RuntimeStdio = tuple[int | None, int | None, int | None]


class CheckpointOutcome(Protocol):
    """A dump's result: the fields of shim.criu.checkpoint.CheckpointResult the shim reads."""

    @property
    def image_path(self) -> str: ...
    @property
    def stats(self) -> dict[str, int]: ...
    # CRIU's network lock left for Delete to remove (None: none left, or kept for a restore there). Opaque here:
    # the process layer only hands it back to Checkpointer.release_network_lock.
    @property
    def network_lock(self) -> object | None: ...
    # A lazy dump's pages being served: completes with the final outcome (a CheckpointOutcome).
    @property
    def completion(self) -> asyncio.Future[Any] | None: ...


class Checkpointer(Protocol):
    async def checkpoint(self, *, container_id: str, bundle: Bundle, pid: int, options: CheckpointOptions,
                         runtime: OciRuntime, paused: Callable[[], bool]) -> CheckpointOutcome:
        """Dump the container (running or paused); `paused` says, when asked, whether the task is paused now."""

    async def release_network_lock(self, lock: object, why: str) -> None:
        """Remove CRIU's network lock a checkpoint left (its outcome's network_lock); failures are logged."""


class Restorer(Protocol):
    async def restore(self, *, container_id: str, bundle: Bundle, image_path: str, work_path: str,
                      runtime: OciRuntime, stdio: RuntimeStdio, pid_file: str, console_socket: str,
                      no_pivot: bool, end_container: Callable[[str], Awaitable[None]] | None = None) -> Bundle:
        """Restore the container from image_path through the OCI runtime; the bundle as the restore left it (its
        config.json names the CRIU configuration the restore used). end_container(reason) is called if a lazy
        restore's memory stops coming after the restore returned: it must kill the container's processes."""
