"""The checkpoint's own care of the task and the image around the dump: a failed dump leaves a
paused task paused and a running one running; the image keeps no freezer state a restore
would write back; an image path that cannot be used is refused before anything starts; the
error points at the dump log that is kept."""

from pathlib import Path

import pycriu.images
import pytest

from shim.background import BackgroundTasks
from shim.bundle.config import Bundle
from shim.children.reaper import Reaper
from shim.criu import checkpoint
from shim.criu.checkpoint import Checkpointer, CheckpointFailed, forget_frozen_freezer
from shim.criu.errors import CriuFailed, CriuTimeout
from shim.criu.plan import ContainerFacts
from shim.errors import FailedPrecondition, Interrupted, InvalidArgument

from .helpers import FakeDumper, FakeFirewall, run

PERMS = {"mode": 0o100644, "uid": 0, "gid": 0}


def cgroup_image(path, freezer_state: str) -> None:
    def prop(name, value):
        return {"name": name, "value": value, "perms": PERMS}

    image = {"magic": "CGROUP", "entries": [{
        "sets": [{"id": 1, "ctls": [{"name": "freezer", "path": "/ns/c"}, {"name": "memory", "path": "/ns/c"}]}],
        "controllers": [
            {"cnames": ["freezer"], "dirs": [{"dir_name": "ns/c", "dir_perms": PERMS, "properties": [
                prop("notify_on_release", "0"), prop("freezer.state", freezer_state)]}]},
            {"cnames": ["memory"], "dirs": [{"dir_name": "ns/c", "dir_perms": PERMS, "properties": [
                prop("memory.limit_in_bytes", "67108864")]}]},
        ]}]}
    with open(path, "wb") as f:
        pycriu.images.dump(image, f)


def properties(path) -> dict[str, str]:
    with open(path, "rb") as f:
        image = pycriu.images.load(f)
    return {p["name"]: p["value"] for c in image["entries"][0]["controllers"] for d in c["dirs"]
            for p in d.get("properties", [])}


def test_a_frozen_freezer_state_is_dropped_and_nothing_else(tmp_path):
    cgroup_image(tmp_path / "cgroup.img", "FROZEN")
    assert forget_frozen_freezer(str(tmp_path)) is True
    assert properties(tmp_path / "cgroup.img") == {"notify_on_release": "0", "memory.limit_in_bytes": "67108864"}


def test_a_thawed_state_or_no_cgroup_image_is_left_alone(tmp_path):
    cgroup_image(tmp_path / "cgroup.img", "THAWED")
    before = (tmp_path / "cgroup.img").read_bytes()
    assert forget_frozen_freezer(str(tmp_path)) is False
    assert (tmp_path / "cgroup.img").read_bytes() == before
    assert forget_frozen_freezer(str(tmp_path / "none")) is False


class FakeRuntime:
    binary = "runc"

    def state_dir(self, container_id):
        return "/nonexistent"


@pytest.mark.parametrize("paused,left", [(True, "FROZEN"), (False, "THAWED")])
def test_a_failed_dump_leaves_the_freezer_as_the_task_was(tmp_path, paused, left):
    freezer = tmp_path / "freezer"
    freezer.mkdir()
    (freezer / "freezer.state").write_text("THAWED" if paused else "FROZEN")  # what a killed CRIU may leave
    bundle = tmp_path / "bundle"
    bundle.mkdir()

    async def dump_killed(job):
        raise CriuFailed("dump", exit_status=137)

    checkpointer = Checkpointer(Reaper(), BackgroundTasks(), firewall=FakeFirewall(), dumper=FakeDumper(
        dump_killed, ContainerFacts(rootfs="/", pid=1, freezer_cgroup=str(freezer))))
    options = checkpoint.CheckpointOptions(image_path=str(tmp_path / "image")).validate()

    with pytest.raises(CheckpointFailed, match="status 137"):
        run(checkpointer.checkpoint(container_id="c", bundle=Bundle(str(bundle), {}), pid=1, options=options,
                                    runtime=FakeRuntime(), paused=paused))
    assert (freezer / "freezer.state").read_text() == left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "freezer"]  # no image, no partial one


def fake_checkpointer(dump) -> Checkpointer:
    return Checkpointer(Reaper(), BackgroundTasks(), dumper=FakeDumper(dump), firewall=FakeFirewall())


async def _never_dumps(job):
    raise AssertionError("the dump must not start")


@pytest.mark.parametrize("where,error,message", [
    ("a-file/image", InvalidArgument, "parent directory"),
    ("read-only/image", FailedPrecondition, "cannot be written: Permission denied"),
])
def test_an_unusable_image_path_is_refused_before_the_dump_leaving_nothing(tmp_path, monkeypatch, where, error,
                                                                           message):
    (tmp_path / "a-file").write_text("")
    (tmp_path / "read-only").mkdir(mode=0o500)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    if where.startswith("read-only"):
        # root ignores modes: make the directory creation itself fail as on a read-only mount
        def refuse(target, token=None):
            raise PermissionError(13, "Permission denied", str(tmp_path / "read-only" / ".image.pyshim-partial-x"))
        monkeypatch.setattr(checkpoint.images, "prepare", refuse)
    checkpointer = fake_checkpointer(_never_dumps)
    options = checkpoint.CheckpointOptions(image_path=str(tmp_path / where)).validate()
    with pytest.raises(error, match=message) as refused:
        run(checkpointer.checkpoint(container_id="c", bundle=Bundle(str(bundle), {}), pid=1, options=options,
                                    runtime=FakeRuntime(), paused=False))
    assert str(tmp_path / where) in str(refused.value)
    assert list(bundle.iterdir()) == []  # its own work dir removed too
    assert sorted(p.name for p in (tmp_path / "read-only").iterdir()) == []


def test_the_error_names_the_kept_dump_log_not_the_removed_work_dir(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    cause = "(00.1) Error (criu/cr-dump.c:1): page-pipe: splice: Bad file descriptor"

    async def dump_fails(job):  # as shim.criu.rpc raises it: the log in the work dir
        (Path(job.work) / "dump.log").write_text(f"{cause}\n(00.2) Dumping FAILED.\n")
        raise CriuFailed("dump", cr_errno=9, log_path=str(Path(job.work) / "dump.log"), log_lines=[cause])

    options = checkpoint.CheckpointOptions(image_path=str(tmp_path / "image")).validate()
    with pytest.raises(CheckpointFailed) as failed:
        run(fake_checkpointer(dump_fails).checkpoint(container_id="c", bundle=Bundle(str(bundle), {}), pid=1,
                                                     options=options, runtime=FakeRuntime(), paused=False))
    message = str(failed.value)
    assert message.startswith("criu dump failed: errno 9")  # the task's fate is the init process's to add
    assert not isinstance(failed.value, checkpoint.DumpInterrupted)
    assert message.endswith(f". From the CRIU log {bundle}/criu-dump.log: {cause}")
    assert "criu-work-" not in message
    assert (bundle / "criu-dump.log").read_text().endswith("Dumping FAILED.\n")


@pytest.mark.parametrize("criu_error, interrupted", [
    (CriuFailed("dump", reason="criu ended the conversation without a final response", exit_status=137), True),
    (CriuTimeout("dump", 30), True),
    (CriuFailed("dump", cr_errno=9), False),  # CRIU answered: it undid its work
    (CriuFailed("dump", notification="network-lock", reason="boom", exit_status=1), False),  # CRIU aborted itself
    (CriuFailed("dump", reason="criu ended the conversation without a final response", exit_status=1), False),
])
def test_a_criu_that_died_before_it_finished_is_told_apart(tmp_path, criu_error, interrupted):
    """Only a dump whose CRIU died (killed, timed out) may have left a process it was stepping unable to go on:
    that one is a DumpInterrupted (an errors.Interrupted across the worker boundary), so the init looks at the task."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()

    async def dump_fails(job):
        raise criu_error

    options = checkpoint.CheckpointOptions(image_path=str(tmp_path / "image")).validate()
    with pytest.raises(CheckpointFailed) as failed:
        run(fake_checkpointer(dump_fails).checkpoint(container_id="c", bundle=Bundle(str(bundle), {}), pid=1,
                                                     options=options, runtime=FakeRuntime(), paused=False))
    assert isinstance(failed.value, Interrupted) is interrupted
    assert str(failed.value).startswith("CRIU was killed before it finished: criu dump" if interrupted
                                        else "criu dump failed")
    assert not (tmp_path / "image").exists()


def test_a_lazy_dump_returns_when_its_page_server_is_ready():
    """What runc's --status-fd gives its users: Checkpoint returns at CRIU's status-ready, and
    the dump's completion follows."""
    import asyncio

    from shim.criu.checkpoint import CheckpointResult, until_ready

    async def scenario():
        ready = asyncio.Event()
        done = asyncio.Event()

        async def dump():
            ready.set()  # status-ready
            await done.wait()  # the pages are being served
            return CheckpointResult("/img", "criu", {"pages_written": 7}, stopped=False)

        finishing = asyncio.ensure_future(dump())
        early = await until_ready(finishing, ready, image_path="/img")
        pending_before = not early.completion.done()
        done.set()
        final = await early.completion
        return early, pending_before, final

    early, pending_before, final = run(scenario())
    assert early.image_path == "/img" and early.stats == {} and pending_before
    assert final.stats == {"pages_written": 7}


def test_a_lazy_dump_failing_before_ready_fails_the_checkpoint():
    import asyncio

    from shim.criu.checkpoint import until_ready

    async def scenario():
        async def dump():
            raise CheckpointFailed("page-pipe: splice: -1: Bad file descriptor")

        return await until_ready(asyncio.ensure_future(dump()), asyncio.Event(), image_path="/img")

    with pytest.raises(CheckpointFailed, match="splice"):
        run(scenario())


def test_a_plain_dump_waits_for_the_whole_dump():
    import asyncio

    from shim.criu.checkpoint import CheckpointResult, until_ready

    async def scenario():
        async def dump():
            await asyncio.sleep(0.05)
            return CheckpointResult("/img", "criu", {"frozen_time": 1}, stopped=True)

        return await until_ready(asyncio.ensure_future(dump()), None, image_path="/img")

    result = run(scenario())
    assert result.completion is None and result.stopped and result.stats == {"frozen_time": 1}


def test_a_frozen_state_in_a_child_cgroup_is_dropped_too(tmp_path):
    def prop(name, value):
        return {"name": name, "value": value, "perms": PERMS}

    image = {"magic": "CGROUP", "entries": [{"controllers": [{"cnames": ["freezer"], "dirs": [{
        "dir_name": "ns", "dir_perms": PERMS, "properties": [prop("freezer.state", "FROZEN")],
        "children": [{"dir_name": "c", "dir_perms": PERMS, "properties": [prop("freezer.state", "FROZEN"),
                                                                          prop("notify_on_release", "1")]}]}]}]}]}
    with open(tmp_path / "cgroup.img", "wb") as f:
        pycriu.images.dump(image, f)
    assert forget_frozen_freezer(str(tmp_path)) is True
    with open(tmp_path / "cgroup.img", "rb") as f:
        top = pycriu.images.load(f)["entries"][0]["controllers"][0]["dirs"][0]
    assert top.get("properties", []) == []
    assert [p["name"] for p in top["children"][0]["properties"]] == ["notify_on_release"]
