"""pyshim migrate --pre-copy without containers: the round plan (directories, parent links, options per round), the
refusal where CRIU cannot track dirty memory, and the rounds and the final images crossing a real channel to the real
receiver, whose work directory ends with the parent chain CRIU reads at restore."""

from __future__ import annotations

import contextlib
import os
import threading
import types
from pathlib import Path

import grpc
import pytest

from shim.api.containerd.runc.options import oci_pb2
from shim.api.containerd.types import task_pb2
from shim.api.pyshim.checkpoint.v1 import options_pb2
from shim.criu import features
from shim.tool import archive
from shim.tool.errors import ToolError
from shim.tool.migrate import precopy, source, transport
from shim.tool.migrate import receiver as receiver_module
from shim.tool.migrate.channel import Channel
from shim.tool.migrate.dest import parse
from shim.tool.migrate.receiver import Receiver
from shim.tool.options import request_options


def test_each_round_pre_dumps_into_its_directory_with_the_round_before_as_parent():
    rounds = precopy.plan(3)
    assert [r.directory for r in rounds] == ["round-1", "round-2", "round-3"]
    assert [r.parent for r in rounds] == ["", "../round-1", "../round-2"]
    assert rounds[0].options(120) == {"pre-dump": "true", "leave-running": "true", "timeout": "120"}
    assert rounds[2].options(120) == {"pre-dump": "true", "leave-running": "true", "timeout": "120",
                                      "parent-path": "../round-2"}
    assert precopy.final_parent(rounds) == "../round-3"


def test_a_rounds_options_reach_the_shim_as_runc_pre_dump_with_parent_path():
    sent = request_options(precopy.Round(2).options(60), "/store/.migrate-web-x/round-2")
    runc = oci_pb2.CheckpointOptions.FromString(sent.value)
    assert (runc.exit, runc.image_path, runc.parent_path) == (False, "/store/.migrate-web-x/round-2", "../round-1")
    named = options_pb2.CheckpointOptionsExtension.FromString(sent.value).options
    assert named["pre-dump"] == "true" and named["parent-path"] == "../round-1"


def test_rounds_are_bounded_and_name_only_round_directories():
    assert precopy.check_rounds(1) == "" and precopy.check_rounds(precopy.MAX_ROUNDS) == ""
    for bad in (0, -1, precopy.MAX_ROUNDS + 1):
        assert "give 1 to 8 rounds" in precopy.check_rounds(bad)
    assert precopy.is_round("round-1") and precopy.is_round("round-8")
    for name in ("round-0", "round-9", "round-1/x", "checkpoint", "../round-1", "round-01"):
        assert not precopy.is_round(name), name


def args_for(rounds: int | None, mode: str = "stop-copy") -> types.SimpleNamespace:
    return types.SimpleNamespace(container="web", mode=mode, pre_copy=rounds, bandwidth=0.0, timeout=600.0,
                                 ssh_option=[], store=None)


def test_pre_copy_is_a_mode_and_its_rounds_out_of_range_are_a_usage_refusal():
    args = args_for(3)
    source.check_mode(args)
    assert args.mode == "pre-copy"
    with pytest.raises(source.UsageRefusal, match="--pre-copy 9: give 1 to 8"):
        source.check_mode(args_for(9))
    args = args_for(None)
    source.check_mode(args)
    assert args.mode == "stop-copy"


def test_without_dirty_tracking_the_preflight_refuses_naming_soft_dirty_and_the_other_modes(monkeypatch):
    monkeypatch.setattr(features, "missing", lambda feature: f"{feature}: no soft-dirty here")
    run = source.Migration(args_for(2, "pre-copy"), types.SimpleNamespace(namespace="default"),
                           parse("ssh://host-b/run/containerd.sock", default_namespace="default"))
    with pytest.raises(source.UsageRefusal) as refused:
        run._check_dirty_tracking()
    text = str(refused.value)
    for words in ("CONFIG_MEM_SOFT_DIRTY", "soft-dirty", "mem_dirty_track: no soft-dirty here", "--stream",
                  "--post-copy", "runs on here untouched", "nothing was sent to the destination"):
        assert words in text
    monkeypatch.setattr(features, "missing", lambda feature: "")
    assert [r.number for r in run._check_dirty_tracking()] == [1, 2]


def test_the_feature_check_says_what_criu_said(tmp_path):
    fake = tmp_path / "criu"
    fake.write_text("#!/bin/sh\necho \"Dirty tracking is OFF. Memory snapshot will not work.\" >&2\nexit 1\n")
    fake.chmod(0o755)
    said = features.missing(features.DIRTY_TRACKING, criu=str(fake))
    assert "mem_dirty_track" in said and "Dirty tracking is OFF" in said
    fake.write_text("#!/bin/sh\n[ \"$*\" = \"check --feature mem_dirty_track\" ] || exit 3\n")
    assert features.missing(features.DIRTY_TRACKING, criu=str(fake)) == ""
    assert "could not run" in features.missing(features.DIRTY_TRACKING, criu=str(tmp_path / "absent"))


class FakeClient:
    """A containerd whose Checkpoint writes images as CRIU would: pages, and a `parent` link of the parent-path
    given, which must name an existing directory from the images directory (CRIU checks it so)."""

    namespace = "default"

    def __init__(self, fail_at: int = 0, status_after_failure: int = task_pb2.RUNNING) -> None:
        self.asked: list[tuple[str, str, bool]] = []
        self.fail_at = fail_at
        self.status = task_pb2.RUNNING
        self.status_after_failure = status_after_failure

    def task(self, container_id):
        return task_pb2.Process(container_id=container_id, status=self.status,
                                exit_status=137 if self.status == task_pb2.STOPPED else 0)

    @contextlib.contextmanager
    def lease(self):
        yield

    def checkpoint(self, container_id, request, timeout):
        runc = oci_pb2.CheckpointOptions.FromString(request.value)
        named = options_pb2.CheckpointOptionsExtension.FromString(request.value).options
        self.asked.append((os.path.basename(runc.image_path), runc.parent_path, named.get("pre-dump") == "true"))
        if len(self.asked) == self.fail_at:
            self.status = self.status_after_failure
            raise FailedCheckpoint()
        os.makedirs(runc.image_path, exist_ok=True)
        if runc.parent_path:
            assert os.path.isdir(os.path.join(runc.image_path, runc.parent_path))
            os.symlink(runc.parent_path, os.path.join(runc.image_path, "parent"))
        with open(os.path.join(runc.image_path, "pages-1.img"), "wb") as f:
            f.write(os.urandom(4096 * len(self.asked)))
        with open(os.path.join(runc.image_path, "inventory.img"), "wb") as f:
            f.write(b"inventory")


class FailedCheckpoint(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.FAILED_PRECONDITION

    def details(self):
        return "pre-dump needs kernel soft-dirty memory tracking (CONFIG_MEM_SOFT_DIRTY)"


@pytest.fixture
def linked(tmp_path):
    """A Migration whose session is one end of a pipe pair, the real Receiver serving the other end."""
    a_read, b_write = os.pipe()
    b_read, a_write = os.pipe()
    near = Channel(a_read, a_write, peer="the destination").start()
    far = Channel(b_read, b_write, peer="the source").start()
    work = tmp_path / "dest-work"
    (work / archive.CHECKPOINT_DIR).mkdir(parents=True)
    receiver = Receiver(types.SimpleNamespace(store=str(tmp_path / "dest-store")), far)
    receiver.work = str(work)
    served: list[int] = []
    thread = threading.Thread(target=lambda: served.append(receiver.serve()), daemon=True)
    thread.start()
    assert near.next_message(10)["type"] == "hello"

    def make(client: FakeClient) -> source.Migration:
        run = source.Migration(args_for(3, "pre-copy"), client,  # type: ignore[arg-type]
                               parse("ssh://host-b/run/containerd.sock", default_namespace="default"))
        session = transport.Session(run.dest, [])
        session.channel = near
        run.session = session
        staging = tmp_path / "staging"
        staging.mkdir()
        run.staging = str(staging)
        return run

    yield make, work, receiver, served
    near.close_sending()
    thread.join(10)
    far.close_sending()


def test_rounds_and_final_images_reach_the_destination_with_the_parent_chain(linked):
    make, work, receiver, served = linked
    client = FakeClient()
    run = make(client)
    rounds = precopy.plan(3)
    run._pre_copy(rounds)
    assert client.asked == [("round-1", "", True), ("round-2", "../round-1", True), ("round-3", "../round-2", True)]
    for one in rounds:  # each round already on the destination before the final dump
        sent = os.path.join(str(run.staging), one.directory, "pages-1.img")
        assert (work / one.directory / "pages-1.img").read_bytes() == Path(sent).read_bytes()
    # the final dump, as _run asks it: its parent the last round; then the archive without the rounds
    chosen = {"leave-running": "false", "parent-path": precopy.final_parent(rounds)}
    client.checkpoint("web", request_options(chosen, run._images()), timeout=60)
    assert client.asked[-1] == ("checkpoint", "../round-3", False)
    with open(os.path.join(run.staging, archive.SPEC_DUMP), "w") as f:
        f.write("{}")
    run._send_archive()
    assert os.readlink(work / "checkpoint" / "parent") == "../round-3"
    assert os.readlink(work / "round-3" / "parent") == "../round-2"
    assert os.readlink(work / "round-2" / "parent") == "../round-1"
    assert not (work / "round-1" / "parent").exists()
    chain = work / "checkpoint" / "parent" / "parent" / "parent"  # as CRIU's restore walks it
    assert chain.resolve() == (work / "round-1").resolve()
    run._abort()  # ends the conversation: the receiver undoes its work directory
    assert not work.exists()


def test_a_failed_round_aborts_the_destination_and_stops_nothing(linked):
    make, work, receiver, served = linked
    client = FakeClient(fail_at=2)
    run = make(client)
    with pytest.raises(ToolError, match="pre-copy round 2 of web.*runs on here, nothing was left on the destination"):
        run._pre_copy(precopy.plan(3))
    assert [asked[0] for asked in client.asked] == ["round-1", "round-2"]  # no final dump: the task ran on
    assert run.staging is None
    assert not work.exists()  # the receiver undid round-1 and its work directory on the abort


def test_a_round_that_ended_the_task_says_so_rather_than_that_it_runs_on(linked):
    make, work, receiver, served = linked
    run = make(FakeClient(fail_at=1, status_after_failure=task_pb2.STOPPED))
    with pytest.raises(ToolError) as failed:
        run._pre_copy(precopy.plan(2))
    message = str(failed.value)
    assert "web's task here did not survive the failed dump (exit status 137)" in message and "runs on" not in message
    assert not work.exists()


def test_the_receiver_takes_a_round_only_under_its_own_directory(linked, tmp_path):
    make, work, receiver, served = linked
    run = make(FakeClient())
    os.makedirs(os.path.join(run.staging, "round-1"))
    os.makedirs(os.path.join(run.staging, "round-2"))
    with pytest.raises(transport.RemoteRefusal, match="holds 'round-2', outside round-1/"):
        run._send_tar("round", ["round-2"], expect="round-received", round="round-1")
    assert not work.exists()  # refused: everything this side made is undone


def test_a_destination_that_does_not_list_rounds_is_refused_before_anything_is_dumped(linked):
    make, work, receiver, served = linked
    assert "round" in receiver_module.REQUESTS and "prepare" in receiver_module.REQUESTS
    assert precopy.destination_refusal("web", {"host": "b", "requests": receiver_module.REQUESTS}) is None
    older = {"type": "hello", "protocol_name": "pyshim-migrate", "protocol": 1, "host": "host-b"}  # no requests
    said = precopy.destination_refusal("web", older)
    assert said is not None and "the pyshim on host-b does not take them" in said and "--stream" in said
