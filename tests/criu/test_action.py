"""The CRIU action script: only setup-namespaces does anything, and it says what went wrong."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time

import pytest

from shim.criu import action


def test_ifreq_is_the_kernels_struct_ifreq_size():
    # sizeof(struct ifreq) on Linux: IFNAMSIZ (16) + a 24-byte union.
    assert struct.calcsize(action.IFREQ_FLAGS_FORMAT) == 40


def test_other_stages_return_at_once_without_loading_ctypes():
    probe = ("import os, sys; from shim.criu.action import main; os.environ['CRTOOLS_SCRIPT_ACTION'] = 'pre-restore';"
             "code = main(); print(code, 'ctypes' in sys.modules)")
    result = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path[1:1] = {sys.path!r}; {probe}"],
                            capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["0", "False"]


def test_setup_namespaces_without_a_pid_fails(monkeypatch, capsys):
    monkeypatch.setenv("CRTOOLS_SCRIPT_ACTION", "setup-namespaces")
    monkeypatch.delenv("CRTOOLS_INIT_PID", raising=False)
    assert action.main() == 1
    assert "no CRTOOLS_INIT_PID" in capsys.readouterr().err


def test_setup_namespaces_names_the_pid_it_could_not_reach(monkeypatch, capsys):
    monkeypatch.setenv("CRTOOLS_SCRIPT_ACTION", "setup-namespaces")
    monkeypatch.setenv("CRTOOLS_INIT_PID", str(2**22 + 1))  # above pid_max's ceiling: never a process
    assert action.main() == 1
    assert f"loopback of {2**22 + 1} not raised" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the test makes a network namespace (unshare -n)")
def test_setup_namespaces_raises_lo_of_the_restored_tree_without_the_socket_module():
    # The restored tree's stand-in: a process in a new network namespace, whose lo starts DOWN.
    holder = subprocess.Popen(["unshare", "-n", "sleep", "30"])
    try:
        ns = f"/proc/{holder.pid}/ns/net"
        deadline = time.monotonic() + 5
        while os.readlink(ns) == os.readlink("/proc/self/ns/net"):  # unshare has not switched yet
            assert time.monotonic() < deadline, "unshare -n did not make a namespace"
            time.sleep(0.01)
        probe = ("import os, sys; from shim.criu.action import main; code = main(); "
                 "print(code, 'socket' in sys.modules)")
        env = {**os.environ, "CRTOOLS_SCRIPT_ACTION": "setup-namespaces", "CRTOOLS_INIT_PID": str(holder.pid)}
        result = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path[1:1] = {sys.path!r}; {probe}"],
                                capture_output=True, text=True, timeout=30, env=env)
        assert result.stdout.split() == ["0", "False"], result.stderr
        # Through netlink (`ip`), which answers for the namespace entered; /sys would show the host's lo.
        link = subprocess.run(["nsenter", f"--net={ns}", "ip", "-o", "link", "show", "lo"],
                              capture_output=True, text=True, timeout=10)
        assert "UP" in link.stdout.split("<", 1)[1].split(">", 1)[0].split(","), link
    finally:
        holder.kill()  # our own child, by pid
        holder.wait(10)


def test_the_script_is_named_only_for_a_restore_that_makes_a_network_namespace():
    from shim.criu.restore import creates_network_namespace

    def config(*namespaces):
        return {"linux": {"namespaces": list(namespaces)}}

    assert creates_network_namespace(config({"type": "pid"}, {"type": "network"}))  # ctr's default: a private one
    assert not creates_network_namespace(config({"type": "network", "path": "/var/run/netns/cni-1"}))  # CNI, pods
    assert not creates_network_namespace(config({"type": "pid"}))  # the host's network
    assert not creates_network_namespace({})
