"""ResizePty against the process states, as the Go shim answers it: `ctr run -t` resizes right after Start, and a
short-lived process may have ended by then (seen in integration/test_terminal.py as ctr's "resize pty" error)."""

import asyncio
import json

import pytest

from shim.api.containerd.events import task_pb2 as events
from shim.api.containerd.task.v2 import shim_pb2 as api
from shim.server.events import pack
from shim.ttrpc import TtrpcError
from tests.task.test_service import Harness, NullIO


class TerminalIO(NullIO):
    """A terminal process's IO without a pty: records the sizes it is given."""

    def __init__(self):
        self.sizes = []

    async def receive_console(self, timeout):
        pass

    def resize(self, w, h):
        self.sizes.append((w, h))

    def process_exited(self):
        pass


def run(scenario, tmp_path):
    async def main():
        harness = Harness(tmp_path)
        ios = []

        async def terminal_io(stdio, container_id, uid, gid):
            ios.append(TerminalIO())
            return ios[-1]

        harness.service.io_factory = terminal_io
        try:
            return await asyncio.wait_for(scenario(harness), 20), ios
        finally:
            harness.close()

    return asyncio.run(main())


def test_init_resizes_until_deleted_even_after_exit(tmp_path):
    async def scenario(h):
        await h.create("t1", ["true"], terminal=True)
        await h.call("ResizePty", api.ResizePtyRequest(id="t1", width=80, height=24))  # created
        await h.call("Start", api.StartRequest(id="t1"))
        await h.call("Wait", api.WaitRequest(id="t1"))
        await h.call("ResizePty", api.ResizePtyRequest(id="t1", width=100, height=30))  # exited: still fine
        await h.call("Delete", api.DeleteRequest(id="t1"))
        with pytest.raises(TtrpcError):
            await h.call("ResizePty", api.ResizePtyRequest(id="t1", width=90, height=20))

    _, ios = run(scenario, tmp_path)
    assert ios[0].sizes == [(80, 24), (100, 30)]


def test_exec_refuses_resize_once_exited(tmp_path):
    async def scenario(h):
        await h.create("t2", ["sleep", "30"])
        await h.call("Start", api.StartRequest(id="t2"))
        spec = pack(events.TaskIO())
        spec.value = json.dumps({"args": ["true"]}).encode()
        await h.call("Exec", api.ExecProcessRequest(id="t2", exec_id="e", spec=spec, terminal=True))
        await h.call("Start", api.StartRequest(id="t2", exec_id="e"))
        await h.call("Wait", api.WaitRequest(id="t2", exec_id="e"))
        with pytest.raises(TtrpcError):  # upstream: "cannot resize a stopped container"
            await h.call("ResizePty", api.ResizePtyRequest(id="t2", exec_id="e", width=100, height=30))
        await h.call("Kill", api.KillRequest(id="t2", signal=9))
        await h.call("Wait", api.WaitRequest(id="t2"))

    run(scenario, tmp_path)
