"""`lo` up in a restored tree's new network namespace: the action script CRIU runs, and the shim's end of it."""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import time
from pathlib import Path

import pytest

from shim.bundle.config import Bundle
from shim.criu import loopback
from shim.criu.restore import creates_network_namespace


def test_ifreq_is_the_kernels_struct_ifreq_size():
    # sizeof(struct ifreq) on Linux: IFNAMSIZ (16) + a 24-byte union.
    assert struct.calcsize(loopback.IFREQ.format) == 40


def test_the_script_is_named_only_for_a_restore_that_makes_a_network_namespace():
    def config(*namespaces):
        return Bundle("/b", {"linux": {"namespaces": list(namespaces)}})

    assert creates_network_namespace(config({"type": "pid"}, {"type": "network"}))  # ctr's default: a private one
    assert not creates_network_namespace(config({"type": "network", "path": "/var/run/netns/cni-1"}))  # CNI, pods
    assert not creates_network_namespace(config({"type": "pid"}))  # the host's network
    assert not creates_network_namespace(Bundle("/b", {}))


async def run_script(script: str, action: str, pid: int | str = "") -> tuple[int, str]:
    env = {**os.environ, "CRTOOLS_SCRIPT_ACTION": action, "CRTOOLS_INIT_PID": str(pid)}
    child = await asyncio.create_subprocess_exec(script, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = await asyncio.wait_for(child.communicate(), 10)
    return child.returncode, err.decode()


def test_other_stages_exit_at_once_without_the_shim(tmp_path):
    # No hook serves the fifos: a script that wrote its request would block (no fifo) or fail.
    script = tmp_path / loopback.SCRIPT
    script.write_text(loopback.script_text(str(tmp_path / "absent-request"), str(tmp_path / "absent-reply")))
    script.chmod(0o700)
    for action in ("pre-restore", "post-setup-namespaces", "post-restore", "network-unlock", "pre-resume"):
        assert asyncio.run(run_script(str(script), action)) == (0, "")
    assert sorted(p.name for p in tmp_path.iterdir()) == [loopback.SCRIPT]


def test_a_namespace_that_cannot_be_reached_fails_the_stage_with_the_reason(tmp_path):
    async def scenario():
        hook = loopback.LoopbackHook(str(tmp_path))
        try:
            return await run_script(hook.script, "setup-namespaces", 2**22 + 1), hook.raised  # above pid_max
        finally:
            hook.close()

    (code, err), raised = asyncio.run(scenario())
    assert code == 1 and raised == []
    assert f"lo of the restored tree (pid {2**22 + 1}) not raised" in err and "No such file" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [loopback.SCRIPT]  # close() removed the fifos


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the test makes a network namespace (unshare -n)")
def test_setup_namespaces_has_the_shim_raise_lo_of_the_restored_tree(tmp_path: Path):
    # The restored tree's stand-in: a process in a new network namespace, whose lo starts DOWN.
    holder = subprocess.Popen(["unshare", "-n", "sleep", "30"])
    try:
        ns = f"/proc/{holder.pid}/ns/net"
        deadline = time.monotonic() + 5
        while os.readlink(ns) == os.readlink("/proc/self/ns/net"):  # unshare has not switched yet
            assert time.monotonic() < deadline, "unshare -n did not make a namespace"
            time.sleep(0.01)

        async def scenario():
            hook = loopback.LoopbackHook(str(tmp_path))
            try:
                return await run_script(hook.script, "setup-namespaces", holder.pid), hook.raised
            finally:
                hook.close()

        assert asyncio.run(scenario()) == ((0, ""), [holder.pid])
        # Through netlink (`ip`), which answers for the namespace entered; /sys would show the host's lo.
        link = subprocess.run(["nsenter", f"--net={ns}", "ip", "-o", "link", "show", "lo"],
                              capture_output=True, text=True, timeout=10)
        assert "UP" in link.stdout.split("<", 1)[1].split(">", 1)[0].split(","), link
    finally:
        holder.kill()  # our own child, by pid
        holder.wait(10)
