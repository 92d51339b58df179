"""A real dump and restore through the RPC client, notifications on.

The target is `unshare -n sleep` in its own session, so that CRIU dumps a network namespace and
sends the namespace notifications too (network-lock on dump, setup-namespaces on restore). The
network lock is SKIP: the test does not depend on iptables. The sequences asserted are what
CRIU 4.2.1 sends for this tree."""

import os

from pycriu import rpc_pb2

from shim.criu.rpc import CriuRpc

from .helpers import images_dir, needs_criu, ppid, reaping, run, state, target

pytestmark = needs_criu


def test_dump_then_restore(tmp_path):
    images = images_dir(tmp_path)
    calls = []

    async def notify(script, pid, fds):
        calls.append((script, pid))

    async def scenario():
        async with reaping() as reaper:
            rpc = CriuRpc(reaper, timeout=20)
            async with target(reaper, "unshare", "-n", "sleep", "1000") as (pid, exits):
                req = rpc_pb2.criu_req(type=rpc_pb2.DUMP)
                req.opts.images_dir_fd = images
                req.opts.pid = pid
                req.opts.log_level = 4
                req.opts.log_file = "dump.log"
                req.opts.notify_scripts = True
                req.opts.network_lock = rpc_pb2.SKIP
                dumped = await rpc.call(req, notify=notify)
                killed = await exits.wait(pid)  # not leave_running: CRIU kills the tree after post-dump
                dump_calls = calls[:]
                calls.clear()

                req = rpc_pb2.criu_req(type=rpc_pb2.RESTORE)
                req.opts.images_dir_fd = images
                req.opts.log_level = 4
                req.opts.log_file = "restore.log"
                req.opts.notify_scripts = True
                req.opts.rst_sibling = True  # the restored root is CRIU's sibling: our child, reaped by us
                req.opts.network_lock = rpc_pb2.SKIP
                restored = await rpc.call(req, notify=notify)
                new = restored.restore.pid
                alive = (state(new), ppid(new), open(f"/proc/{new}/cmdline", "rb").read())
                os.kill(new, 9)
                gone = await exits.wait(new)
                return dumped, killed, dump_calls, restored, alive, gone

    dumped, killed, dump_calls, restored, alive, gone = run(scenario())
    assert dumped.type == rpc_pb2.DUMP and dumped.success and not dumped.dump.restored
    assert killed.status == 128 + 9
    assert (tmp_path / "images" / "inventory.img").exists() and (tmp_path / "images" / "dump.log").exists()
    assert dump_calls == [("pre-dump", 0), ("network-lock", 0), ("query-ext-files", 0), ("post-dump", 0)]

    new = restored.restore.pid
    assert restored.type == rpc_pb2.RESTORE and restored.success and new == killed.pid  # CRIU restores pids
    assert calls == [("pre-restore", 0), ("setup-namespaces", new), ("post-setup-namespaces", 0),
                     ("post-restore", new), ("network-unlock", 0), ("pre-resume", 0), ("post-resume", 0)]
    assert alive[0] in "RS" and alive[1] == os.getpid() and alive[2] == b"sleep\x001000\x00"
    assert gone.status == 128 + 9
    os.close(images)
