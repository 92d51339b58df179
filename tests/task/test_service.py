"""The task service against a stand-in OCI runtime: lifecycle, event order, error codes."""

import asyncio
import functools
import json
import logging
import os
import signal
from pathlib import Path

import pytest

from shim.api.containerd.events import task_pb2 as events
from shim.api.containerd.runc.options.oci_pb2 import Options
from shim.api.containerd.task.v2 import shim_pb2 as api
from shim.api.containerd.types import task_pb2 as types
from shim.children.reaper import Reaper
from shim.errors import InvalidArgument
from shim.server.events import pack
from shim.task.service import TaskService
from shim.ttrpc import Code, TtrpcError

FAKE_RUNTIME = str(Path(__file__).with_name("fake_runtime.py"))


class RecordingPublisher:
    def __init__(self):
        self.events = []

    def publish(self, topic, event):
        self.events.append((topic, event))

    def topics(self):
        return [topic for topic, _ in self.events]


class NullIO:
    runtime_stdio = (None, None, None)
    console_socket = ""

    def close_after_start(self): pass
    def close_stdin(self): pass
    def resize(self, w, h): pass
    async def wait_drained(self, timeout): pass
    def close(self): pass


async def null_io(stdio, container_id, uid, gid):
    return NullIO()


class Harness:
    def __init__(self, tmp_path, **seams):
        """seams: the service's injected parts (io_factory, checkpointer, restorer, background), fakes of theirs."""
        self.tmp = tmp_path
        self.publisher = RecordingPublisher()
        self.reaper = Reaper()
        self.reaper.install(asyncio.get_running_loop())  # subreaper: the fake "containers" re-parent here
        self.service = TaskService(namespace="ns", reaper=self.reaper, publisher=self.publisher,
                                   **{"io_factory": null_io, **seams})

    def options(self):
        return pack(Options(binary_name=FAKE_RUNTIME, root=str(self.tmp / "root")))

    def bundle(self, id, args):
        bundle = self.tmp / id
        bundle.mkdir(exist_ok=True)
        (bundle / "config.json").write_text(json.dumps({"process": {"args": args}}))
        return str(bundle)

    async def create(self, id, args, **extra):
        request = api.CreateTaskRequest(id=id, bundle=self.bundle(id, args), options=self.options(), **extra)
        return await self.service.Create(request, None)

    async def call(self, name, request):
        return await getattr(self.service, name)(request, None)

    async def settle(self):
        for _ in range(50):  # let background exit handling publish
            await asyncio.sleep(0.01)

    def close(self):
        asyncio.get_running_loop().remove_signal_handler(signal.SIGCHLD)


def run(scenario, tmp_path, **seams):
    async def main():
        harness = Harness(tmp_path, **seams)
        try:
            return await asyncio.wait_for(scenario(harness), 20)
        finally:
            harness.close()

    return asyncio.run(main())


def test_lifecycle_events_and_exit_status(tmp_path):
    async def scenario(h):
        created = await h.create("c1", ["sh", "-c", "exit 3"])
        state = await h.call("State", api.StateRequest(id="c1"))
        started = await h.call("Start", api.StartRequest(id="c1"))
        waited = await h.call("Wait", api.WaitRequest(id="c1"))
        after = await h.call("State", api.StateRequest(id="c1"))
        deleted = await h.call("Delete", api.DeleteRequest(id="c1"))
        await h.settle()
        return created, state, started, waited, after, deleted, h.publisher

    created, state, started, waited, after, deleted, publisher = run(scenario, tmp_path)
    assert created.pid > 0 and state.status == types.CREATED and started.pid == created.pid
    assert waited.exit_status == 3 and after.status == types.STOPPED and after.exit_status == 3
    assert (deleted.pid, deleted.exit_status) == (created.pid, 3)
    assert publisher.topics() == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
    exit_event = publisher.events[2][1]
    assert (exit_event.container_id, exit_event.id, exit_event.exit_status) == ("c1", "c1", 3)


def test_exec_exit_is_published_before_init_exit(tmp_path):
    async def scenario(h):
        # A container with a pid namespace of its own: nothing is left to kill when its init exits, so the service
        # goes straight to waiting for the exec (with none, it first runs the runtime's `kill --all`).
        bundle = Path(h.bundle("c2", ["sleep", "30"]))
        (bundle / "config.json").write_text(json.dumps({"process": {"args": ["sleep", "30"]},
                                                        "linux": {"namespaces": [{"type": "pid"}]}}))
        await h.service.Create(api.CreateTaskRequest(id="c2", bundle=str(bundle), options=h.options()), None)
        await h.call("Start", api.StartRequest(id="c2"))
        spec = pack(events.TaskIO())  # placeholder type; the value is what matters
        spec.value = json.dumps({"args": ["sleep", "30"]}).encode()
        await h.call("Exec", api.ExecProcessRequest(id="c2", exec_id="e1", spec=spec))
        exec_started = await h.call("Start", api.StartRequest(id="c2", exec_id="e1"))
        pids = await h.call("Pids", api.PidsRequest(id="c2"))
        await h.call("Kill", api.KillRequest(id="c2", signal=9))
        container = h.service.containers["c2"]
        for _ in range(1000):  # bounded: until the reaper has the init's exit and the service has taken it
            if container.init_exited:
                break
            await asyncio.sleep(0.01)
        assert container.init_exited, "the init's exit never reached the service"
        for _ in range(5):  # the exit's handling, scheduled then, runs until it waits for the exec (no I/O between)
            await asyncio.sleep(0)
        early = list(h.publisher.topics())
        os.kill(exec_started.pid, signal.SIGTERM)
        exec_wait = await h.call("Wait", api.WaitRequest(id="c2", exec_id="e1"))
        init_wait = await h.call("Wait", api.WaitRequest(id="c2"))
        await h.settle()
        return early, exec_wait, init_wait, pids, h.publisher

    early, exec_wait, init_wait, pids, publisher = run(scenario, tmp_path)
    assert "/tasks/exit" not in early
    assert exec_wait.exit_status == 128 + 15 and init_wait.exit_status == 128 + 9
    exits = [(e.id, e.exit_status) for t, e in publisher.events if t == "/tasks/exit"]
    assert exits == [("e1", 143), ("c2", 137)]
    assert publisher.topics()[:4] == ["/tasks/create", "/tasks/start", "/tasks/exec-added", "/tasks/exec-started"]
    assert len(pids.processes) == 1  # the fake runtime lists only the init


def test_caller_mistakes_get_precise_codes(tmp_path):
    async def scenario(h):
        codes = {}

        async def code(name, coro):
            try:
                await coro
                codes[name] = Code.OK
            except TtrpcError as exc:
                codes[name] = exc.code

        await code("unknown task", h.call("State", api.StateRequest(id="nope")))
        await h.create("c3", ["sh", "-c", "exit 0"])
        await code("duplicate create", h.create("c3", ["true"]))
        await code("pause created", h.call("Pause", api.PauseRequest(id="c3")))
        await code("unknown exec", h.call("State", api.StateRequest(id="c3", exec_id="x")))
        await h.call("Start", api.StartRequest(id="c3"))
        await h.call("Wait", api.WaitRequest(id="c3"))
        await code("start twice", h.call("Start", api.StartRequest(id="c3")))
        await code("kill stopped", h.call("Kill", api.KillRequest(id="c3", signal=15)))
        spec = pack(events.TaskIO())
        spec.value = b'{"args": ["true"]}'
        await code("exec after exit", h.call("Exec", api.ExecProcessRequest(id="c3", exec_id="e", spec=spec)))
        bad = api.CreateTaskRequest(id="c4", bundle=h.bundle("c4", ["true"]))
        bad.options.type_url = "example.com/Unknown"
        await code("bad options", h.call("Create", bad))
        return codes

    assert run(scenario, tmp_path) == {
        "unknown task": Code.NOT_FOUND,
        "duplicate create": Code.ALREADY_EXISTS,
        "pause created": Code.FAILED_PRECONDITION,
        "unknown exec": Code.NOT_FOUND,
        "start twice": Code.FAILED_PRECONDITION,
        "kill stopped": Code.NOT_FOUND,
        "exec after exit": Code.FAILED_PRECONDITION,
        "bad options": Code.INVALID_ARGUMENT,
    }


def test_duplicate_exec_id_already_exists(tmp_path):
    async def scenario(h):
        await h.create("c5", ["sleep", "30"])
        await h.call("Start", api.StartRequest(id="c5"))
        spec = pack(events.TaskIO())
        spec.value = b'{"args": ["sleep", "1"]}'
        await h.call("Exec", api.ExecProcessRequest(id="c5", exec_id="e", spec=spec))
        with pytest.raises(TtrpcError) as err:
            await h.call("Exec", api.ExecProcessRequest(id="c5", exec_id="e", spec=spec))
        await h.call("Kill", api.KillRequest(id="c5", signal=9))
        await h.call("Wait", api.WaitRequest(id="c5"))
        return err.value.code

    assert run(scenario, tmp_path) == Code.ALREADY_EXISTS


class FailingRestorer:
    """A Restorer (shim.process.criu_seam) whose restore fails as one from a missing image does."""

    async def restore(self, *, container_id, bundle, image_path, **rest):
        raise InvalidArgument(f"checkpoint {image_path} does not exist")


class BlockingRestorer:
    """A Restorer whose restore runs until it is stopped, and says whether it was."""

    def __init__(self):
        self.running = asyncio.Event()
        self.stopped = False

    async def restore(self, *, bundle, **rest):
        self.running.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.stopped = True
            raise
        return bundle


def test_killing_a_task_whose_restore_never_ran_ends_it(tmp_path):
    """A task created from a checkpoint runs nothing until Start restores it; if that restore
    fails, `ctr task rm -f` kills and waits: the kill must end the task."""
    async def scenario(h):
        await h.create("r1", ["true"], checkpoint=str(tmp_path / "no-such-image"))
        with pytest.raises(TtrpcError) as refused:
            await h.call("Start", api.StartRequest(id="r1"))  # the image does not exist
        await h.call("Kill", api.KillRequest(id="r1", signal=9))
        waited = await h.call("Wait", api.WaitRequest(id="r1"))
        deleted = await asyncio.wait_for(h.call("Delete", api.DeleteRequest(id="r1")), 1)  # no drain wait
        await h.settle()
        return refused.value, waited, deleted, h.publisher.topics()

    refused, waited, deleted, topics = run(scenario, tmp_path, restorer=FailingRestorer())
    assert refused.code == Code.INVALID_ARGUMENT and "no-such-image does not exist" in str(refused)
    assert waited.exit_status == 137 and deleted.exit_status == 137
    assert topics == ["/tasks/create", "/tasks/exit", "/tasks/delete"]


def test_killing_a_task_while_it_is_being_restored_stops_the_restore_and_ends_it(tmp_path):
    """The rule lives in the init process: a kill before the restore is over stops the restore (runc and CRIU
    killed, what they left removed), Start fails saying why, and the task ends with the signal as its exit."""
    restorer = BlockingRestorer()

    async def scenario(h):
        await h.create("r2", ["true"], checkpoint=str(tmp_path / "image"))
        start = asyncio.ensure_future(h.call("Start", api.StartRequest(id="r2")))
        await restorer.running.wait()
        await h.call("Kill", api.KillRequest(id="r2", signal=15))
        with pytest.raises(TtrpcError) as failed:
            await start
        waited = await h.call("Wait", api.WaitRequest(id="r2"))
        return failed.value, waited, h.publisher.topics()

    failed, waited, topics = run(scenario, tmp_path, restorer=restorer)
    assert restorer.stopped
    assert failed.code == Code.FAILED_PRECONDITION and "killed while it was being restored" in str(failed)
    assert waited.exit_status == 128 + 15
    assert topics == ["/tasks/create", "/tasks/exit"]


class CallerContext:
    """What the ttrpc server gives a handler: here only the call's connection."""

    def __init__(self, disconnected):
        self.disconnected = disconnected


class BlockingCheckpointer:
    """Dumps nothing, and not before it is let go."""

    def __init__(self):
        self.started = asyncio.Event()
        self.go = asyncio.Event()

    async def checkpoint(self, *, container_id, bundle, pid, options, runtime, paused):
        self.started.set()
        await self.go.wait()

        class Result:
            image_path, stats, completion, network_lock = options.image_path, {}, None, None

        return Result()


def test_a_task_paused_for_a_checkpoint_whose_connection_closed_is_resumed(tmp_path):
    """containerd's client: Pause, Checkpoint, (Resume never comes: containerd died). The task runs again once the
    checkpoint, left to finish, is over; a task the user paused on that connection stays paused."""
    async def scenario(h):
        checkpointer = h.service.checkpointer
        connection = CallerContext(asyncio.get_running_loop().create_future())
        for id in ("c1", "user"):
            await h.create(id, ["sleep", "100"])
            await h.call("Start", api.StartRequest(id=id))
        await h.service.Pause(api.PauseRequest(id="user"), connection)  # ctr task pause
        await h.service.State(api.StateRequest(id="user"), connection)
        await h.service.Pause(api.PauseRequest(id="c1"), connection)  # ctr task checkpoint
        checkpoint = asyncio.ensure_future(h.service.Checkpoint(
            api.CheckpointTaskRequest(id="c1", path=str(tmp_path / "image")), connection))
        await checkpointer.started.wait()
        connection.disconnected.set_result(None)  # the server cancels the connection's calls
        checkpoint.cancel()
        await h.settle()
        during = (await h.call("State", api.StateRequest(id="c1"))).status  # the dump runs to its end first
        checkpointer.go.set()
        await asyncio.gather(checkpoint, return_exceptions=True)
        await h.settle()
        states = [during] + [(await h.call("State", api.StateRequest(id=id))).status for id in ("c1", "user")]
        for id in ("c1", "user"):
            await h.call("Kill", api.KillRequest(id=id, signal=9, all=True))
        await h.settle()
        return states, h.publisher.topics()

    states, topics = run(scenario, tmp_path, checkpointer=BlockingCheckpointer())
    assert states == [types.PAUSED, types.RUNNING, types.PAUSED]
    assert topics.count("/tasks/resumed") == 1


def test_create_refuses_a_bundle_whose_config_cannot_be_read_and_leaves_nothing(tmp_path):
    async def scenario(h):
        bundle = tmp_path / "b1"
        bundle.mkdir()
        request = api.CreateTaskRequest(id="b1", bundle=str(bundle), options=h.options())
        with pytest.raises(TtrpcError) as refused:
            await h.call("Create", request)
        left = (sorted(os.listdir(bundle)), list(h.service.containers))
        (bundle / "config.json").write_text(json.dumps({"process": {"args": ["true"]}}))
        created = await h.call("Create", request)  # the same call succeeds once the bundle is right
        await h.call("Kill", api.KillRequest(id="b1", signal=9))
        return refused.value, left, created.pid

    refused, left, pid = run(scenario, tmp_path)
    assert refused.code == Code.INVALID_ARGUMENT and "cannot read config.json" in str(refused)
    assert left == ([], []) and pid > 0


class Outcome:
    """A checkpoint's outcome as shim.process.criu_seam.CheckpointOutcome has it."""

    def __init__(self, completion=None):
        self.image_path, self.stats, self.network_lock, self.completion = "/images/c1", {}, None, completion


class LazyCheckpointer:
    """A Checkpointer whose dump is lazy: Checkpoint returns at once, the outcome completes when `pages` does."""

    def __init__(self):
        self.pages = None

    async def checkpoint(self, **kwargs):
        self.pages = asyncio.get_running_loop().create_future()
        return Outcome(completion=self.pages)


def test_a_lazy_checkpoint_s_event_is_owned_by_the_server_s_background_tasks(tmp_path, caplog):
    """What follows a lazy dump runs under the server's one owner: drained at shutdown when it can finish (its
    event published), cancelled with a log line when it cannot."""
    async def scenario(h, checkpointer, finish):
        await h.create("c1", ["sleep", "30"])
        await h.call("Start", api.StartRequest(id="c1"))
        await h.call("Checkpoint", api.CheckpointTaskRequest(id="c1", path=str(h.tmp / "image")))
        if finish:
            checkpointer.pages.set_result(Outcome())
        await h.call("Kill", api.KillRequest(id="c1", signal=9))
        await h.service.background.close(grace=5 if finish else 0.05)
        return h.publisher.topics()

    for finish in (True, False):
        checkpointer = LazyCheckpointer()
        caplog.clear()
        (tmp_path / str(finish)).mkdir()
        with caplog.at_level(logging.WARNING, logger="shim.background"):
            topics = run(functools.partial(scenario, checkpointer=checkpointer, finish=finish), tmp_path / str(finish),
                         checkpointer=checkpointer)
        assert ("/tasks/checkpointed" in topics) is finish
        assert ("lazy checkpoint of c1" in caplog.text) is not finish


def test_an_exec_s_io_is_opened_through_the_factory_with_its_own_stdio_and_the_container_s_owner(tmp_path):
    opened = []

    async def recording_io(stdio, container_id, uid, gid):
        opened.append((stdio.stdout, stdio.stderr, container_id, uid, gid))
        return NullIO()

    async def scenario(h):
        options = pack(Options(binary_name=FAKE_RUNTIME, root=str(h.tmp / "root"), io_uid=1234, io_gid=5678))
        await h.call("Create", api.CreateTaskRequest(id="c6", bundle=h.bundle("c6", ["sleep", "30"]), options=options,
                                                     stdout="/run/init-out"))
        await h.call("Start", api.StartRequest(id="c6"))
        spec = pack(events.TaskIO())
        spec.value = json.dumps({"args": ["sleep", "30"]}).encode()
        await h.call("Exec", api.ExecProcessRequest(id="c6", exec_id="e6", spec=spec, stdout="/run/exec-out",
                                                    stderr="/run/exec-err"))
        assert len(opened) == 1, "an exec's IO is opened when it starts, not when it is added"
        await h.call("Start", api.StartRequest(id="c6", exec_id="e6"))
        await h.call("Kill", api.KillRequest(id="c6", signal=9, all=True))

    run(scenario, tmp_path, io_factory=recording_io)
    assert opened == [("/run/init-out", "", "c6", 1234, 5678), ("/run/exec-out", "/run/exec-err", "c6", 1234, 5678)]
