"""Delete of a task whose checkpoint with exit left CRIU's network lock in a namespace that outlives it removes the
lock (shim.criu.netlock), once; a checkpoint that left none (or kept it) hands Delete nothing."""

from dataclasses import dataclass

from shim.api.containerd.task.v2 import shim_pb2 as api
from shim.criu import netlock
from shim.criu.netlock import Lock
from tests.task.test_service import run

LOCK = Lock("nftables", "c639771c-6ce9-4760-99b2-972a7ba41aad", "/var/run/netns/pod", 4026532999)


@dataclass
class Result:
    """A checkpoint's outcome as shim.process.checkpointer.CheckpointOutcome has it."""

    image_path: str = "/images"
    stats: dict = None
    stopped: bool = True
    network_lock: Lock | None = None
    completion: None = None  # not a lazy dump


class FakeCheckpointer:
    def __init__(self, lock):
        self.lock = lock

    async def checkpoint(self, **kwargs):
        return Result(network_lock=self.lock)


def delete_after_checkpoint(tmp_path, monkeypatch, lock):
    released = []

    async def release_logged(reaper, lock, why, **kwargs):
        released.append((lock, why))
        return ["removed"]

    monkeypatch.setattr(netlock, "release_logged", release_logged)

    async def scenario(h):
        await h.create("t", ["sleep", "30"])
        await h.call("Start", api.StartRequest(id="t"))
        init = h.service.containers["t"].init
        await init.checkpoint_to(FakeCheckpointer(lock), options=None)
        assert init.network_lock == lock
        await h.call("Kill", api.KillRequest(id="t", signal=9))  # what the dump with exit does to the task
        await h.call("Wait", api.WaitRequest(id="t"))
        assert released == [], "nothing is removed before Delete"
        await h.call("Delete", api.DeleteRequest(id="t"))
        return init.network_lock

    assert run(scenario, tmp_path) is None
    return released


def test_delete_removes_the_lock_the_checkpoint_left(tmp_path, monkeypatch):
    assert delete_after_checkpoint(tmp_path, monkeypatch, LOCK) == [(LOCK, "task t deleted")]


def test_delete_removes_nothing_when_the_checkpoint_left_nothing(tmp_path, monkeypatch):
    assert delete_after_checkpoint(tmp_path, monkeypatch, None) == []
