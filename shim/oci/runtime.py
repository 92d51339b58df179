"""One OCI runtime (runc or crun) for one containerd namespace: the subcommands the shim
uses, as coroutines that run through the reaper."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from shim.children.spawn import Completed
from shim.oci import commands
from shim.oci.commands import RuntimeConfig
from shim.oci.runner import Runner, RuntimeFailed

Stdio = tuple[int | None, int | None, int | None]
# Messages with which runc and crun say "that process is gone" (go-runc checks the same).
GONE = ("process already finished", "container not running", "no such process", "not running",
        "container does not exist", "does not exist")


def is_gone(error: RuntimeFailed) -> bool:
    text = error.message.lower()
    return any(marker in text for marker in GONE)


@dataclass
class OciRuntime:
    config: RuntimeConfig
    run: Runner

    @property
    def binary(self) -> str:
        return self.config.binary

    async def create(self, id: str, *, bundle: str, pid_file: str, stdio: Stdio, console_socket: str = "",
                     no_pivot: bool = False, no_new_keyring: bool = False) -> None:
        await self.run(commands.create(self.config, id, bundle=bundle, pid_file=pid_file,
                                       console_socket=console_socket, no_pivot=no_pivot,
                                       no_new_keyring=no_new_keyring), stdio=stdio, cwd=bundle)

    async def start(self, id: str) -> None:
        await self.run(commands.start(self.config, id))

    async def exec(self, id: str, process_spec: dict, *, pid_file: str, stdio: Stdio,
                   console_socket: str = "", work_dir: str) -> None:
        fd, spec_path = tempfile.mkstemp(prefix=".exec-", suffix=".json", dir=work_dir)
        try:
            os.write(fd, json.dumps(process_spec).encode())
            os.close(fd)
            await self.run(commands.exec_(self.config, id, process_file=spec_path, pid_file=pid_file,
                                          console_socket=console_socket), stdio=stdio)
        finally:
            os.unlink(spec_path)

    async def kill(self, id: str, signal: int, *, all: bool = False) -> None:
        await self.run(commands.kill(self.config, id, signal, all=all))

    async def delete(self, id: str, *, force: bool = False) -> None:
        await self.run(commands.delete(self.config, id, force=force))

    async def pause(self, id: str) -> None:
        await self.run(commands.pause(self.config, id))

    async def resume(self, id: str) -> None:
        await self.run(commands.resume(self.config, id))

    async def state(self, id: str) -> dict:
        return json.loads((await self.run(commands.state(self.config, id))).stdout or b"{}")

    async def ps(self, id: str) -> list[int]:
        result: Completed = await self.run(commands.ps(self.config, id))
        return [int(pid) for pid in json.loads(result.stdout or b"[]") or []]

    async def update(self, id: str, resources: bytes, *, work_dir: str) -> None:
        fd, path = tempfile.mkstemp(prefix=".resources-", suffix=".json", dir=work_dir)
        try:
            os.write(fd, resources)
            os.close(fd)
            await self.run(commands.update(self.config, id, resources_file=path))
        finally:
            os.unlink(path)

    async def checkpoint(self, id: str, flags: list[str], *, timeout: float) -> None:
        await self.run(commands.checkpoint(self.config, id, flags), timeout=timeout)

    async def restore(self, id: str, *, bundle: str, pid_file: str, image_path: str, work_path: str, stdio: Stdio,
                      console_socket: str = "", no_pivot: bool = False, flags: list[str] | tuple[str, ...] = (),
                      timeout: float, started: Callable[[int], object] | None = None) -> None:
        """started(pid) is called as soon as the runtime is spawned (the restore records it for `delete`)."""
        await self.run(commands.restore(self.config, id, bundle=bundle, pid_file=pid_file, image_path=image_path,
                                        work_path=work_path, console_socket=console_socket, no_pivot=no_pivot,
                                        flags=flags), stdio=stdio, cwd=bundle, timeout=timeout, started=started)

    def state_dir(self, id: str) -> str:
        return os.path.join(self.config.root, id)
