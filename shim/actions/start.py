"""The `start` action: bind the shim's socket, have the server forked, print the address.

Runs on containerd's hot path, so it does no more than it must: no asyncio, no protobuf.
The socket is bound here, then handed to the fork server (shim/forkserver), which forks a
server that has everything imported already. When no fork server answers, the server is a
fork of this process (no second interpreter start-up; it imports the server's modules
itself) and a fork server is launched for the next containers. Either way the server is
detached from containerd's stdout/stderr pipes, because containerd reads them until every
writer has closed them.
"""

from __future__ import annotations

import _socket  # the C module: `socket` costs milliseconds of imports (enum, selectors)
import errno
import os
import sys

from shim.actions.cmdline import ShimArgs
from shim.bundle.layout import ADDRESS_FILE, group_id, socket_address, write_atomically
from shim.forkserver import client as forkserver


def listen(path: str) -> _socket.socket | None:
    """A listening socket at path, or None when a live shim already serves it (a group)."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    for _ in range(2):
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise
            if _answers(path):
                return None
            os.unlink(path)  # a stale socket of a shim that died
            continue
        os.chmod(path, 0o600)
        sock.listen(128)
        return sock
    raise OSError(errno.EADDRINUSE, f"cannot bind {path}")


def _answers(path: str) -> bool:
    probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def start(args: ShimArgs) -> int:
    bundle = os.getcwd()
    address = socket_address(args.address, args.namespace, group_id(bundle, args.id))
    sock = listen(address.removeprefix("unix://"))
    write_atomically(os.path.join(bundle, ADDRESS_FILE), address)
    if sock is not None:
        options = b"" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
        containerd_pid = os.getppid()
        sys.stdout.flush()
        target = _forkserver_target(containerd_pid)
        if target is None or not _hand_over(target, sock, bundle, options):
            _fork_server(args, sock, bundle, options, containerd_pid)
            if target is not None:
                _launch(target)  # for the next containers
        sock.close()
    sys.stdout.write(address)
    sys.stdout.flush()
    return 0


def _forkserver_target(containerd_pid: int) -> forkserver.Target | None:
    # Whatever goes wrong with the fork server, `start` forks the server itself.
    try:
        return forkserver.Target(containerd_pid) if forkserver.enabled() else None
    except Exception:
        return None


def _hand_over(target: forkserver.Target, sock: _socket.socket, bundle: str, options: bytes) -> bool:
    try:
        return forkserver.hand_over(target, sock, bundle, options) is not None
    except Exception:
        return False


def _launch(target: forkserver.Target) -> None:
    try:
        forkserver.launch(target)
    except Exception:
        pass


def _fork_server(args: ShimArgs, sock: _socket.socket, bundle: str, options: bytes, containerd_pid: int) -> None:
    if os.fork() == 0:
        _become_server(args, sock, bundle, options, containerd_pid)


def _become_server(args: ShimArgs, sock: _socket.socket, bundle: str, options: bytes, containerd_pid: int) -> None:
    code = 1
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        import socket

        from shim.server.daemon import serve

        code = serve(args, socket.socket(fileno=sock.detach()), bundle, options, containerd_pid=containerd_pid)
    finally:
        os._exit(code)
