"""The server's access to CRIU, as the process layer's Checkpointer and Restorer (shim.process.criu_seam).

Made by the composition root (shim/server/daemon.py) with the server's reaper and its background-task owner.
CRIU's code is imported on first use, not at start-up: checkpoints run in a worker process (shim/criu/offload.py)
so that the server stays at its idle RSS; PYSHIM_CHECKPOINT_WORKER=0 runs them in the server (imported on the first
checkpoint). A restore runs in the server: `runc restore` is a child of the shim, which must reap what it leaves.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from shim.background import BackgroundTasks
from shim.bundle.config import Bundle
from shim.children.reaper import Reaper

if TYPE_CHECKING:
    from shim.criu.checkpoint import Checkpointer, CheckpointResult
    from shim.criu.offload import Checkpointed, OffloadedCheckpointer
    from shim.criu.options import CheckpointOptions
    from shim.oci.runtime import OciRuntime


def in_worker() -> bool:
    """Whether checkpoints run in a worker process (the default) rather than in the server."""
    return os.environ.get("PYSHIM_CHECKPOINT_WORKER", "1").lower() not in ("0", "off", "false", "no")


class CriuAccess:
    def __init__(self, reaper: Reaper, background: BackgroundTasks, *, containerd_pid: int | None = None,
                 namespace: str = "") -> None:
        self.reaper = reaper
        self.background = background
        self.containerd_pid = containerd_pid
        self.namespace = namespace
        self._checkpointer: Checkpointer | OffloadedCheckpointer | None = None

    def _dumper(self) -> Checkpointer | OffloadedCheckpointer:
        if self._checkpointer is None:
            if in_worker():
                from shim.criu.offload import OffloadedCheckpointer

                self._checkpointer = OffloadedCheckpointer(self.reaper, self.background,
                                                           containerd_pid=self.containerd_pid,
                                                           namespace=self.namespace)
            else:
                from shim.criu.checkpoint import Checkpointer

                self._checkpointer = Checkpointer(self.reaper, self.background)
        return self._checkpointer

    async def checkpoint(self, *, container_id: str, bundle: Bundle, pid: int, options: CheckpointOptions,
                         runtime: OciRuntime, paused: Callable[[], bool]) -> CheckpointResult | Checkpointed:
        return await self._dumper().checkpoint(container_id=container_id, bundle=bundle, pid=pid, options=options,
                                               runtime=runtime, paused=paused)

    async def release_network_lock(self, lock: object, why: str) -> None:
        from shim.criu.netlock import Lock, NamespaceFirewall, release_logged

        assert isinstance(lock, Lock), f"not a network lock a checkpoint left: {lock!r}"
        await release_logged(NamespaceFirewall(self.reaper), lock, why)

    async def restore(self, *, container_id: str, bundle: Bundle, image_path: str, work_path: str,
                      runtime: OciRuntime, stdio: tuple[int | None, int | None, int | None], pid_file: str,
                      console_socket: str, no_pivot: bool,
                      end_container: Callable[[str], Awaitable[None]] | None = None) -> Bundle:
        from shim.criu.restore import restore

        return await restore(self.reaper, self.background, container_id=container_id, bundle=bundle,
                             image_path=image_path, work_path=work_path, runtime=runtime, stdio=stdio,
                             pid_file=pid_file, console_socket=console_socket, no_pivot=no_pivot,
                             end_container=end_container)

