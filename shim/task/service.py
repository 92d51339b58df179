"""The Task service: containerd's calls, served under both containerd.task.v2.Task and
containerd.task.v3.Task by one set of handlers.

This is where protobuf stops: requests are unpacked into plain values for the container
and process objects, and replies and events are built from what those report back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from google.protobuf.empty_pb2 import Empty

from shim.api.containerd.events import task_pb2 as events
from shim.api.containerd.runc.options import oci_pb2
from shim.api.containerd.task.v2 import shim_pb2 as api
from shim.api.containerd.types import task_pb2 as types
from shim.background import BackgroundTasks
from shim.bundle.config import Bundle
from shim.bundle.layout import RUNTIME_FILE, RUNTIME_LOG, write_settings
from shim.children.reaper import Exit, Reaper
from shim.errors import InvalidArgument, NotFound
from shim.oci.commands import RuntimeConfig, runtime_root
from shim.oci.runner import Runner
from shim.oci.runtime import OciRuntime
from shim.process.base import Process, Stdio
from shim.process.container import Container
from shim.process.execs import ExecProcess
from shim.process.init import InitProcess
from shim.process.state import State
from shim.server.events import Publisher, pack
from shim.task import convert
from shim.task.checkpoint_pauses import CheckpointPauses
from shim.task.convert import rpc
from shim.task.exits import ExitRouter, StartWindow
from shim.ttrpc import Code, TtrpcError
from shim.ttrpc.server import CallContext

if TYPE_CHECKING:
    from google.protobuf import any_pb2

    from shim.process.criu_seam import Checkpointer, CheckpointOutcome, Restorer
    from shim.stdio.process_io import ProcessIO

log = logging.getLogger(__name__)
EMPTY = Empty()

# Creates a process's stdio: (stdio, container id, uid, gid) -> ProcessIO
IOFactory = Callable[[Stdio, str, int, int], Awaitable["ProcessIO"]]
# OOM events of the cgroup of a pid: yields how many happened since the last yield.
OomWatcher = Callable[[int], AsyncGenerator[int, None]]


class TaskService:
    def __init__(self, *, namespace: str, reaper: Reaper, publisher: Publisher, io_factory: IOFactory,
                 background: BackgroundTasks | None = None, stats: Callable[[int], any_pb2.Any] | None = None,
                 oom_watcher: OomWatcher | None = None, checkpointer: Checkpointer | None = None,
                 restorer: Restorer | None = None, on_shutdown: Callable[[], None] = lambda: None) -> None:
        self.namespace = namespace
        self.reaper = reaper
        self.publisher = publisher
        self.io_factory = io_factory
        self.background = background or BackgroundTasks()  # the server's one owner of work that outlives a call
        self.stats = stats
        self.oom_watcher = oom_watcher
        self.checkpointer = checkpointer  # injected into each init process, with the restorer
        self.restorer = restorer
        self._oom_watches: dict[str, asyncio.Task[None]] = {}
        self.on_shutdown = on_shutdown
        self.containers: dict[str, Container] = {}
        self.exits = ExitRouter()
        self.checkpoint_pauses = CheckpointPauses(self._resume_abandoned, self.background)
        reaper.add_listener(self._on_exit)

    # -- helpers -------------------------------------------------------------------------

    def _container(self, id: str) -> Container:
        try:
            return self.containers[id]
        except KeyError:
            raise NotFound(f"task {id!r} not found: container not created") from None

    def _publish(self, topic: str, event: Any) -> None:
        self.publisher.publish(topic, event)

    def _runtime(self, bundle: str, options: convert.RuntimeOptions) -> OciRuntime:
        log_path = os.path.join(bundle, RUNTIME_LOG)
        config = RuntimeConfig(binary=options.binary_name, root=runtime_root(options.root, self.namespace),
                               log=log_path, systemd_cgroup=options.systemd_cgroup)
        return OciRuntime(config, Runner(self.reaper, log_path))

    # -- lifecycle -----------------------------------------------------------------------

    @rpc
    async def Create(self, request: api.CreateTaskRequest, context: CallContext | None) -> api.CreateTaskResponse:
        if request.id in self.containers:
            raise TtrpcError(Code.ALREADY_EXISTS, f"task {request.id!r} already exists")
        if not request.id or not request.bundle:
            raise InvalidArgument("Create needs an id and a bundle")
        options = convert.runtime_options(request.options if request.HasField("options") else None)
        bundle = Bundle.read(request.bundle)  # config.json, read once for the container's life
        write_settings(os.path.join(request.bundle, RUNTIME_FILE), {
            "binary": options.binary_name, "root": options.root, "systemd_cgroup": str(int(options.systemd_cgroup))})
        runtime = self._runtime(request.bundle, options)
        stdio = Stdio(request.stdin, request.stdout, request.stderr, request.terminal)
        init = InitProcess(request.id, bundle, stdio, runtime=runtime, background=self.background,
                           checkpointer=self.checkpointer, restorer=self.restorer, no_pivot=options.no_pivot_root,
                           no_new_keyring=options.no_new_keyring)
        container = Container(request.id, self.namespace, init, runtime, io_owner=(options.io_uid, options.io_gid))
        self.containers[request.id] = container  # reserve the id while creating
        window = self.exits.open_window()
        try:
            io = await self.io_factory(stdio, request.id, options.io_uid, options.io_gid)
            await init.create(convert.mounts(request.rootfs), io,
                              checkpoint=request.checkpoint or options.criu_image_path,
                              checkpoint_work=options.criu_work_path)
        except BaseException:
            window.close()
            del self.containers[request.id]
            raise
        self._publish("/tasks/create", events.TaskCreate(
            container_id=request.id, bundle=request.bundle, rootfs=request.rootfs,
            io=events.TaskIO(stdin=request.stdin, stdout=request.stdout, stderr=request.stderr,
                             terminal=request.terminal),
            checkpoint=request.checkpoint, pid=init.pid))
        self._handle_started(window, container, init)
        return api.CreateTaskResponse(pid=init.pid)

    @rpc
    async def Start(self, request: api.StartRequest, context: CallContext | None) -> api.StartResponse:
        container = self._container(request.id)
        process = container.process(request.exec_id)
        if request.exec_id:
            container.exec_may_start()
            process.check("start")
            await container.exec_count_changed(+1)
            window = self.exits.open_window()
        else:
            window = self.exits.open_window(restarting=container)
        try:
            pid = await process.start()
        except BaseException:
            if request.exec_id:
                await container.exec_count_changed(-1)
            self._handle_started(window, container, process if process.pid else None)
            raise
        if request.exec_id:
            self._publish("/tasks/exec-started", events.TaskExecStarted(
                container_id=container.id, exec_id=request.exec_id, pid=pid))
        else:
            self._publish("/tasks/start", events.TaskStart(container_id=container.id, pid=pid))
            self._watch_oom(container)
        self._handle_started(window, container, process)
        return api.StartResponse(pid=pid)

    @rpc
    async def Delete(self, request: api.DeleteRequest, context: CallContext | None) -> api.DeleteResponse:
        container = self._container(request.id)
        process = container.process(request.exec_id)
        self.checkpoint_pauses.called(request.id)
        await process.delete()
        if request.exec_id:
            del container.execs[request.exec_id]
        else:
            self.containers.pop(request.id, None)
            self.checkpoint_pauses.resumed(request.id)
            watch = self._oom_watches.pop(request.id, None)
            if watch is not None:
                watch.cancel()
            self._publish("/tasks/delete", events.TaskDelete(
                container_id=container.id, pid=process.pid, exit_status=process.exit_status,
                exited_at=convert.timestamp(process.exited_at)))
        return api.DeleteResponse(pid=process.pid, exit_status=process.exit_status,
                                  exited_at=convert.timestamp(process.exited_at))

    @rpc
    async def Exec(self, request: api.ExecProcessRequest, context: CallContext | None) -> Empty:
        container = self._container(request.id)
        if not request.exec_id:
            raise InvalidArgument("Exec needs an exec id")
        try:
            spec = json.loads(request.spec.value or b"{}")
        except ValueError as exc:
            raise InvalidArgument(f"exec spec is not valid JSON: {exc}") from None
        uid, gid = container.io_owner

        async def open_io(stdio: Stdio) -> ProcessIO:
            return await self.io_factory(stdio, container.id, uid, gid)

        process = ExecProcess(container.id, request.exec_id, spec,
                              Stdio(request.stdin, request.stdout, request.stderr, request.terminal),
                              runtime=container.runtime, bundle=container.bundle, open_io=open_io)
        container.add_exec(process)
        self._publish("/tasks/exec-added", events.TaskExecAdded(container_id=container.id, exec_id=request.exec_id))
        return EMPTY

    @rpc
    async def State(self, request: api.StateRequest, context: CallContext | None) -> api.StateResponse:
        container = self._container(request.id)
        self.checkpoint_pauses.called(request.id)
        process = container.process(request.exec_id)
        return api.StateResponse(
            id=process.id, bundle=container.bundle.path, pid=process.pid, status=convert.status(process.state),
            stdin=process.stdio.stdin, stdout=process.stdio.stdout, stderr=process.stdio.stderr,
            terminal=process.stdio.terminal, exit_status=process.exit_status,
            exited_at=convert.timestamp(process.exited_at), exec_id=request.exec_id)

    @rpc
    async def Pause(self, request: api.PauseRequest, context: CallContext | None) -> Empty:
        container = self._container(request.id)
        was_running = container.init.state is State.RUNNING
        await container.init.pause()
        self.checkpoint_pauses.paused(container.id, getattr(context, "disconnected", None), was_running=was_running)
        self._publish("/tasks/paused", events.TaskPaused(container_id=container.id))
        return EMPTY

    @rpc
    async def Resume(self, request: api.ResumeRequest, context: CallContext | None) -> Empty:
        container = self._container(request.id)
        self.checkpoint_pauses.called(request.id)
        await container.init.resume()
        self.checkpoint_pauses.resumed(request.id)
        self._publish("/tasks/resumed", events.TaskResumed(container_id=container.id))
        return EMPTY

    async def _resume_abandoned(self, container_id: str, why: str) -> None:
        """Resume a task paused for a checkpoint whose caller will never send the Resume (see
        shim.task.checkpoint_pauses), if it is still paused."""
        container = self.containers.get(container_id)
        if container is None or container.init.state is not State.PAUSED:
            return
        try:
            await container.init.resume()
        except Exception as exc:  # noqa: BLE001 - logged: no caller is left to tell
            log.error("task %s stays paused: containerd paused it for a checkpoint and %s, and resuming it "
                      "failed: %s", container_id, why, exc)
            return
        log.warning("resumed task %s: containerd paused it for a checkpoint and %s; it runs again, as before "
                    "the checkpoint began", container_id, why)
        self._publish("/tasks/resumed", events.TaskResumed(container_id=container_id))

    @rpc
    async def Kill(self, request: api.KillRequest, context: CallContext | None) -> Empty:
        container = self._container(request.id)
        process = container.process(request.exec_id)
        self.checkpoint_pauses.called(request.id)
        ended = await process.kill(request.signal, all=request.all)
        if ended is not None:  # nothing was running to exit (a restore that had not run): the kill is its exit
            container.note_exit(process)
            self._process_exited(ended, container, process)
        return EMPTY

    @rpc
    async def Pids(self, request: api.PidsRequest, context: CallContext | None) -> api.PidsResponse:
        container = self._container(request.id)
        pids = await container.init.pids()
        exec_ids = {p.pid: p.id for p in container.execs.values() if p.pid}
        processes = []
        for pid in pids:
            info = types.ProcessInfo(pid=pid)
            if pid in exec_ids:
                info.info.CopyFrom(pack(oci_pb2.ProcessDetails(exec_id=exec_ids[pid])))
            processes.append(info)
        return api.PidsResponse(processes=processes)

    @rpc
    async def CloseIO(self, request: api.CloseIORequest, context: CallContext | None) -> Empty:
        process = self._container(request.id).process(request.exec_id)
        if request.stdin:
            process.close_io()
        return EMPTY

    @rpc
    async def ResizePty(self, request: api.ResizePtyRequest, context: CallContext | None) -> Empty:
        process = self._container(request.id).process(request.exec_id)
        await process.resize(request.width, request.height)
        return EMPTY

    @rpc
    async def Update(self, request: api.UpdateTaskRequest, context: CallContext | None) -> Empty:
        container = self._container(request.id)
        await container.init.update(request.resources.value)
        return EMPTY

    @rpc
    async def Checkpoint(self, request: api.CheckpointTaskRequest, context: CallContext | None) -> Empty:
        container = self._container(request.id)
        container.init.check("checkpoint")
        options = convert.checkpoint_options(request, container.bundle.annotations)
        if self.checkpointer is None:
            raise TtrpcError(Code.UNIMPLEMENTED, "this shim was started without checkpoint support")
        self.checkpoint_pauses.checkpoint_started(container.id, getattr(context, "disconnected", None))
        dump = asyncio.ensure_future(container.init.checkpoint(options))
        try:
            result = await asyncio.shield(dump)
        except asyncio.CancelledError:
            # The call's connection closed (containerd died): the dump still runs to its end (bounded by its
            # timeout), nobody takes its result. Cut short, CRIU or a checkpoint worker would go on restoring the
            # task's frozen state behind a resume; ended, the task is resumed after it if containerd paused it.
            await asyncio.gather(dump, return_exceptions=True)
            raise
        finally:
            self.checkpoint_pauses.checkpoint_ended(container.id)
        if result.completion is None:
            self._checkpointed(container, result)
        else:  # a lazy dump: ready to serve its pages; the event follows when they have been served
            self._spawn(self._checkpointed_later(container, result.completion), f"lazy checkpoint of {container.id}")
        return EMPTY

    def _checkpointed(self, container: Container, result: CheckpointOutcome) -> None:
        self._publish("/tasks/checkpointed", events.TaskCheckpointed(
            container_id=container.id, checkpoint=result.image_path, stats=result.stats))

    async def _checkpointed_later(self, container: Container, completion: asyncio.Future[Any]) -> None:
        try:
            result = await completion
        except Exception as exc:  # nobody waits on the RPC any more: the log is where it is told
            log.error("lazy checkpoint of %s failed after its page server was ready: %s", container.id, exc)
            return
        container.init.checkpoint_completed(result)
        self._checkpointed(container, result)

    @rpc
    async def Wait(self, request: api.WaitRequest, context: CallContext | None) -> api.WaitResponse:
        process = self._container(request.id).process(request.exec_id)
        await process.wait()
        return api.WaitResponse(exit_status=process.exit_status, exited_at=convert.timestamp(process.exited_at))

    @rpc
    async def Stats(self, request: api.StatsRequest, context: CallContext | None) -> api.StatsResponse:
        container = self._container(request.id)
        if self.stats is None or not container.init.pid or container.init.exited:
            raise NotFound(f"task {request.id}: cgroup does not exist")
        try:
            return api.StatsResponse(stats=self.stats(container.init.pid))
        except LookupError as exc:
            raise NotFound(f"task {request.id}: {exc}") from None

    @rpc
    async def Connect(self, request: api.ConnectRequest, context: CallContext | None) -> api.ConnectResponse:
        container = self.containers.get(request.id)
        return api.ConnectResponse(shim_pid=os.getpid(), task_pid=container.init.pid if container else 0)

    @rpc
    async def Shutdown(self, request: api.ShutdownRequest, context: CallContext | None) -> Empty:
        if not self.containers:
            self.on_shutdown()
        return EMPTY

    # -- OOM -------------------------------------------------------------------------------

    def _watch_oom(self, container: Container) -> None:
        if self.oom_watcher is None or not container.init.pid:
            return
        task = self.background.spawn(self._publish_ooms(container, self.oom_watcher), f"OOM watch of {container.id}")
        self._oom_watches[container.id] = task
        task.add_done_callback(lambda _: self._oom_watches.pop(container.id, None))

    async def _publish_ooms(self, container: Container, watcher: OomWatcher) -> None:
        try:
            async with contextlib.aclosing(watcher(container.init.pid)) as ooms:
                async for count in ooms:
                    for _ in range(count):
                        self._publish("/tasks/oom", events.TaskOOM(container_id=container.id))
        except LookupError as exc:  # no memory cgroup to watch: nothing to report, as the Go shim
            log.info("not watching task %s for OOM: %s", container.id, exc)

    # -- exits -----------------------------------------------------------------------------

    def _handle_started(self, window: StartWindow, container: Container, process: Process | None) -> None:
        exits = window.started(container, process)  # none without a process
        if process is not None:
            for exit in exits:
                self._dispatch_exit(exit, container, process)

    def _on_exit(self, exit: Exit) -> None:
        for container, process in self.exits.route(exit):
            self._dispatch_exit(exit, container, process)

    def _dispatch_exit(self, exit: Exit, container: Container, process: Process) -> None:
        if container.note_exit(process):
            self._spawn(self._init_exited(exit, container), f"exit of task {container.id}")
        else:
            self._process_exited(exit, container, process)
            self._spawn(container.exec_count_changed(-1), f"exit of exec {process.id} in {container.id}")

    async def _init_exited(self, exit: Exit, container: Container) -> None:
        """Publish the init's exit last: after killing what it leaves behind and after its execs' exits."""
        init = container.init
        if init.shares_host_pid_namespace():
            try:
                await init.kill_all()
            except Exception as exc:
                log.warning("killing what task %s left behind failed: %s", container.id, exc)
        await container.wait_for_execs()
        self._process_exited(exit, container, init)

    def _process_exited(self, exit: Exit, container: Container, process: Process) -> None:
        process.set_exited(exit.status, exit.timestamp)
        self._publish("/tasks/exit", events.TaskExit(
            container_id=container.id, id=process.id, pid=exit.pid, exit_status=exit.status,
            exited_at=convert.timestamp(process.exited_at)))

    def _spawn(self, work: Coroutine[Any, Any, None], what: str) -> None:
        self.background.spawn(work, what)
