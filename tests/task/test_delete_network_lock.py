"""Delete of a task whose checkpoint with exit left CRIU's network lock in a namespace that outlives it removes the
lock (through the Checkpointer that left it), once; a checkpoint that left none (or kept it) hands Delete nothing."""

from dataclasses import dataclass

from shim.api.containerd.task.v2 import shim_pb2 as api
from shim.criu.netlock import Lock
from tests.task.test_service import run

LOCK = Lock("nftables", "c639771c-6ce9-4760-99b2-972a7ba41aad", "/var/run/netns/pod", 4026532999)


@dataclass
class Result:
    """A checkpoint's outcome as shim.process.criu_seam.CheckpointOutcome has it."""

    image_path: str = "/images"
    stats: dict = None
    stopped: bool = True
    network_lock: Lock | None = None
    completion: None = None  # not a lazy dump


class FakeCheckpointer:
    """A Checkpointer (shim.process.criu_seam) whose dumps leave `lock`, and which records what it is asked to
    release."""

    def __init__(self, lock):
        self.lock = lock
        self.released = []

    async def checkpoint(self, **kwargs):
        return Result(network_lock=self.lock)

    async def release_network_lock(self, lock, why):
        self.released.append((lock, why))


def delete_after_checkpoint(tmp_path, lock):
    checkpointer = FakeCheckpointer(lock)
    released = checkpointer.released

    async def scenario(h):
        await h.create("t", ["sleep", "30"])
        await h.call("Start", api.StartRequest(id="t"))
        init = h.service.containers["t"].init
        await init.checkpoint(options=None)
        assert init.network_lock == lock
        await h.call("Kill", api.KillRequest(id="t", signal=9))  # what the dump with exit does to the task
        await h.call("Wait", api.WaitRequest(id="t"))
        assert released == [], "nothing is removed before Delete"
        await h.call("Delete", api.DeleteRequest(id="t"))
        return init.network_lock

    assert run(scenario, tmp_path, checkpointer=checkpointer) is None
    return released


def test_delete_removes_the_lock_the_checkpoint_left(tmp_path):
    assert delete_after_checkpoint(tmp_path, LOCK) == [(LOCK, "task t deleted")]


def test_delete_removes_nothing_when_the_checkpoint_left_nothing(tmp_path):
    assert delete_after_checkpoint(tmp_path, None) == []
