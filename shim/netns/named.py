"""Named network namespaces in /var/run/netns, made and removed as `ip netns add/del` does
(pyroute2's netns module: the shared run directory, one bind mount per namespace)."""

from __future__ import annotations

import os
import threading

from pyroute2 import netns as pyroute2_netns

from shim.netns.enter import in_thread
from shim.netns.refs import RUN_DIR, path_of
from shim.netns.syscalls import unshare


def names() -> list[str]:
    """The named namespaces, sorted."""
    return sorted(pyroute2_netns.listnetns(RUN_DIR))


def exists(name: str) -> bool:
    return os.path.exists(path_of(name))


def _unshare_and_attach(name: str) -> None:
    unshare()  # this thread only: a fresh, empty network namespace
    # pyroute2's attach() bind-mounts /proc/<pid>/ns/net; naming this thread's entry keeps the
    # process (and every other thread) where it is, and nothing is forked.
    pyroute2_netns.attach(name, f"self/task/{threading.get_native_id()}")


def create(name: str) -> str:
    """A new empty network namespace bound at /var/run/netns/<name>; its path. Refuses an existing name."""
    path = path_of(name)
    if os.path.dirname(path) != RUN_DIR:
        raise ValueError(f"{name!r}: named namespaces live in {RUN_DIR}")
    if os.path.lexists(path):
        raise FileExistsError(f"network namespace {name} already exists")
    try:
        in_thread(_unshare_and_attach, name, name="netns-create")
    except BaseException:
        if os.path.exists(path) and not os.path.ismount(path):
            os.unlink(path)  # the empty mount point a failed bind leaves
        raise
    return path


def remove(name: str, *, missing_ok: bool = False) -> None:
    """Unmount and unlink /var/run/netns/<name>. The namespace itself lives on while a process or
    an open descriptor holds it."""
    path = path_of(name)
    if os.path.dirname(path) != RUN_DIR:
        raise ValueError(f"{name!r}: named namespaces live in {RUN_DIR}")
    if not os.path.lexists(path):
        if missing_ok:
            return
        raise FileNotFoundError(f"network namespace {name} does not exist")
    pyroute2_netns.remove(name)
