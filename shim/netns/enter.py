"""Being inside a network namespace: the calling thread switched and back, a function run by a
thread of its own inside one, a socket created inside one.

A network namespace belongs to a thread, not to the process: a socket (netlink included) stays in
the namespace of the thread that created it, and a child forked by a thread starts in that
thread's namespace. run_in() uses a fresh thread so the caller never changes namespace, which is
what an asyncio event loop thread needs.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

from shim.netns.refs import NamespaceRef, open_namespace
from shim.netns.syscalls import setns

T = TypeVar("T")
DEFAULT_TIMEOUT = 30.0


@contextlib.contextmanager
def entered(ref: NamespaceRef) -> Iterator[None]:
    """The calling thread inside `ref` for the duration, then back where it was. Never use this
    on an event loop thread: everything that thread does meanwhile happens in `ref`."""
    if ref is None:
        yield
        return
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = open_namespace(ref)
        try:
            setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            setns(home)
    finally:
        os.close(home)


def in_thread(function: Callable[..., T], *args, timeout: float = DEFAULT_TIMEOUT, name: str = "netns") -> T:
    """function(*args) run by a new thread (which may change its namespaces freely: it ends with
    the call); its result, or its exception re-raised here."""
    outcome: dict[str, object] = {}

    def body() -> None:
        try:
            outcome["value"] = function(*args)
        except BaseException as exc:  # handed to the caller
            outcome["error"] = exc

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"{name}: still running after {timeout}s")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def run_in(ref: NamespaceRef, function: Callable[..., T], *args, timeout: float = DEFAULT_TIMEOUT) -> T:
    """function(*args) run by a new thread inside `ref` (None: the caller's namespace, same thread)."""
    if ref is None:
        return function(*args)

    def inside() -> T:
        fd = open_namespace(ref)
        try:
            setns(fd)
        finally:
            os.close(fd)
        return function(*args)

    return in_thread(inside, timeout=timeout, name=f"netns:{ref}")


def socket_in(ref: NamespaceRef, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket that lives in `ref` (usable from any thread afterwards)."""
    return run_in(ref, socket.socket, family, kind)
