"""The fork server: everything the shim server imports, already imported; a blocking accept loop; a spare
process, forked in advance, that becomes the next container's shim server.

No event loop, no threads run here: forking a process with a running asyncio loop is unsafe, and a plain
blocking loop is all a fork server needs.

Every process made here is made by a double fork (an intermediate process forks it and exits at once), so
it is re-parented as a server forked by `start` would be once `start` exits: to containerd's subreaper, or
init. The fork server never has a child to reap but the short-lived intermediates.

The spare: forking a process of this size twice costs milliseconds, so it is done before a request comes.
The spare waits on a socketpair; a request's connection and listening socket are passed to it (SCM_RIGHTS),
and the next spare is forked after that, off `start`'s path. It exits when the fork server does (EOF). With
no spare at hand (a burst), the request is served by a double fork on the spot.

Run as `containerd-shim-pyshim-v2 forkserver <containerd pid> <its start time> <digest> <lock fd>` by
`start` (shim.forkserver.client.launch), never by hand.
"""

from __future__ import annotations

import errno
import gc
import os
import select
import signal
import sys
import time

from shim.forkserver import wire

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing, which the fork server does not need
if TYPE_CHECKING:
    import socket
    from collections.abc import Callable

IDLE_TIMEOUT = 600.0  # seconds without a request, then exit
CHECK_INTERVAL = 5.0  # how often the code on disk is compared with what was imported
REQUEST_TIMEOUT = 2.0  # reading a request; waiting for `start`'s "go"
SPARE_RETRY = 1.0  # after a spare died before it was used (it should not), wait this long before the next
SPARE_TOKEN = "forkserver-spare"  # the spare's command line has this instead of "forkserver"
# What the shim server imports, from serving through a container's whole lifecycle (create, start, exec,
# pause, stats, kill, delete).
PRELOAD = (
    "shim.server.notls", "socket", "ctypes", "resource", "shim.actions.cmdline", "shim.server.daemon",
    "shim.server.events", "shim.children.reaper", "shim.stdio",
    "shim.task.service", "shim.task.convert", "shim.ttrpc", "shim.cgroups", "shim.cgroups.procs",
    "shim.api.containerd.task.v2.shim_pb2", "shim.api.containerd.task.v3.shim_pb2", "google.protobuf.any_pb2",
    "shim.forkserver.proctitle",
    # The server's side of a checkpoint (the worker does the rest: shim/criu/offload.py), about 3 ms of imports
    # off its first Checkpoint; a server imports them at its first checkpoint anyway.
    "shim.criu.access", "shim.criu.offload", "shim.criu.options", "shim.forkserver.criu_spare",
    "shim.api.pyshim.checkpoint.v1.options_pb2",
)
# What a checkpoint or a restore imports besides, only with PYSHIM_FORKSERVER_PRELOAD_CRIU=1: 22 ms of
# imports (pycriu's generated messages most of it) that a server otherwise pays in its first Checkpoint,
# against 2.8 MiB more RSS in every server (measured: docs/forkserver.md). Missing pycriu is not the fork
# server's failure: a checkpoint reports it.
PRELOAD_CRIU = ("shim.criu.checkpoint", "shim.criu.restore", "pycriu.images")


class Exit(Exception):
    """Why the server stops (logged nowhere: the server has no log; the reason is the exit status)."""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")


def _env_seconds(name: str, default: float) -> float:
    try:
        return max(0.05, float(os.environ[name]))
    except (KeyError, ValueError):
        return default


class ForkServer:
    def __init__(self, directory: str, containerd_pid: int, containerd_start: int, digest: str, lock_fd: int):
        self.directory = directory
        self.containerd_pid = containerd_pid
        self.containerd_start = containerd_start
        self.digest = digest
        self.key = wire.server_key(digest, containerd_pid, containerd_start)
        self.socket_path = wire.socket_path(directory, self.key)
        self.lock_path = wire.lock_path(directory, self.key)
        self.lock_fd = lock_fd
        self.listener: socket.socket | None = None  # listen() makes it, before anything else runs
        self.spare: socket.socket | None = None  # our end of the socketpair to the spare, or None
        self.criu_spare: socket.socket | None = None  # ours to the checkpoint spare (criu_spare.py), or None
        self.poller = select.poll()
        self.pidfd = -1
        self.socket_ino = 0
        self.idle_timeout = _env_seconds("PYSHIM_FORKSERVER_IDLE", IDLE_TIMEOUT)
        self.check_interval = _env_seconds("PYSHIM_FORKSERVER_CHECK", CHECK_INTERVAL)

    # --- start-up --------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        os.chdir("/")
        if wire.source_digest() != self.digest:
            raise Exit("code changed before the imports")
        for name in PRELOAD:
            __import__(name)
        for name in PRELOAD_CRIU if _env_flag("PYSHIM_FORKSERVER_PRELOAD_CRIU") else ():
            try:
                __import__(name)
            except ImportError:
                pass
        if wire.source_digest() != self.digest:
            raise Exit("code changed during the imports")
        # Imported objects go to the permanent generation: collections in the forked servers then do not
        # touch (and copy) the pages holding them.
        gc.collect()
        gc.freeze()
        if not _probe_child(_proctitle_works):
            raise Exit("prctl(PR_SET_MM_MAP) refused: a forked server could not show its own command line")
        try:
            self.pidfd = os.pidfd_open(self.containerd_pid)
        except OSError:
            raise Exit("containerd is gone") from None
        if wire.process_start_time(self.containerd_pid) != self.containerd_start:
            raise Exit("containerd is gone (pid reused)")
        try:
            if os.stat(self.lock_path).st_ino != os.fstat(self.lock_fd).st_ino:
                raise Exit("lock file replaced")
        except OSError:
            raise Exit("lock file gone") from None
        self._bind()

    def _bind(self) -> None:
        import socket

        # We hold the lock, so no live server has this path: a socket file is one a killed server left.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
            sock.bind(self.socket_path)
            os.chmod(self.socket_path, 0o600)
            sock.listen(64)
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        self.listener = sock
        self.socket_ino = os.stat(self.socket_path).st_ino

    # --- the loop ----------------------------------------------------------------------------------------------

    def _listening(self) -> socket.socket:
        if self.listener is None:
            raise RuntimeError("the fork server is not listening: listen() first")
        return self.listener

    def run(self) -> str:
        self.poller.register(self._listening().fileno(), select.POLLIN)
        self.poller.register(self.pidfd, select.POLLIN)
        last_request = next_check = spare_at = criu_spare_at = time.monotonic()
        while True:
            now = time.monotonic()
            deadline = min(last_request + self.idle_timeout, next_check, spare_at if self.spare is None else now + 3600)
            for fd, _ in self.poller.poll(max(0.0, deadline - now) * 1000):
                if fd == self.pidfd:
                    return "containerd exited"
                if fd == self._listening().fileno():
                    self._accept_all()
                    last_request = time.monotonic()
                elif self.spare is not None and fd == self.spare.fileno():
                    self._take_spare().close()  # it died unused (EOF): try again later, not in a loop
                    spare_at = time.monotonic() + SPARE_RETRY
                elif self.criu_spare is not None and fd == self.criu_spare.fileno():
                    self._drop_criu_spare()  # it died: made again later, not in a loop
                    criu_spare_at = time.monotonic() + SPARE_RETRY
            _reap()
            now = time.monotonic()
            if self.spare is None and now >= spare_at:
                try:
                    self._make_spare()
                except OSError:
                    spare_at = now + SPARE_RETRY
            # The checkpoint spare only once a shim spare is ready: `start` comes first.
            if self.criu_spare is None and self.spare is not None and now >= criu_spare_at:
                try:
                    self._make_criu_spare()
                except OSError:
                    criu_spare_at = now + SPARE_RETRY
            if now >= last_request + self.idle_timeout:
                return "idle"
            if now >= next_check:
                if wire.source_digest() != self.digest:
                    return "code changed"
                try:
                    if os.stat(self.socket_path).st_ino != self.socket_ino:
                        return "socket replaced"
                except OSError:
                    return "socket removed"
                next_check = now + self.check_interval

    def _accept_all(self) -> None:
        while True:
            try:
                conn, _ = self._listening().accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return
                raise
            try:
                self._handle(conn)
            finally:
                conn.close()

    def _handle(self, conn) -> None:
        conn.setblocking(True)
        conn.settimeout(REQUEST_TIMEOUT)
        peer_pid, uid, _ = wire.peer_credentials(conn)
        if not wire.trusted_uid(uid):
            return
        try:
            fields, fds = wire.recv_frame(conn, max_fds=wire.MAX_FDS)
        except (OSError, ValueError):
            return
        try:
            request = Request.parse(fields, fds)
            if request.digest != self.digest:
                raise wire.ProtocolError("digest mismatch")
            if request.containerd_pid != self.containerd_pid:
                raise wire.ProtocolError("request from another containerd")
        except (ValueError, UnicodeError) as exc:
            for fd in fds:
                os.close(fd)
            _try_send(conn, [("status", b"error"), ("error", str(exc).encode())])
            return
        server_pid = os.getpid()
        if self.spare is not None:
            spare = self._take_spare()
            job = [*fields, ("start_pid", str(peer_pid).encode())]
            try:
                wire.send_frame(spare, wire.encode(job), [conn.fileno(), request.listener_fd])
                handed = True
            except OSError:
                handed = False  # it died: serve this one by a double fork
            finally:
                spare.close()
            if handed:
                for fd in fds:
                    os.close(fd)
                return
        try:
            intermediate = os.fork()
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            _try_send(conn, [("status", b"error"), ("error", f"fork: {exc}".encode())])
            return
        if intermediate == 0:
            code = 1
            try:
                # This copy of the server's socket object must never close a descriptor number that the
                # shim server may by then use for something else: the descriptor itself is closed below.
                self._listening().detach()
                intermediate = os.getpid()
                if os.fork() == 0:
                    _become_shim(conn, request, peer_pid, server_pid, intermediate)
                code = 0
            finally:
                os._exit(code)
        for fd in fds:
            os.close(fd)
        _wait(intermediate)

    def _make_spare(self) -> None:
        server_pid = os.getpid()
        self.spare = self._fork_detached(SPARE_TOKEN, lambda theirs: _spare_main(theirs, server_pid))

    def _make_criu_spare(self) -> None:
        from shim.forkserver import criu_spare

        path = criu_spare.socket_path(self.directory, self.key)
        self.criu_spare = self._fork_detached(criu_spare.TOKEN, lambda theirs: criu_spare.main(theirs, path))

    def _fork_detached(self, token: str, child_main: Callable[[socket.socket], object]) -> socket.socket:
        """Double-fork a detached process (see _detach; token in its command line) that runs child_main on its end
        of a new socketpair (it never returns here: the intermediate exits); our end, watched by the poller, tells
        when the process is gone."""
        import socket

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            intermediate = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            raise
        if intermediate == 0:
            try:
                self._listening().detach()  # see _handle
                ours.detach()
                if os.fork() == 0:
                    _detach(theirs, token)
                    child_main(theirs)
            finally:
                os._exit(0)
        theirs.close()
        _wait(intermediate)
        self.poller.register(ours.fileno(), select.POLLIN)
        return ours

    def _drop_criu_spare(self) -> None:
        """Forget the checkpoint spare (it exits on EOF) and remove its socket: a dead spare's socket would only
        refuse connections."""
        from shim.forkserver import criu_spare

        spare, self.criu_spare = self.criu_spare, None
        try:
            os.unlink(criu_spare.socket_path(self.directory, self.key))
        except OSError:
            pass
        if spare is not None:
            try:
                self.poller.unregister(spare.fileno())
            except (KeyError, ValueError):
                pass
            spare.close()

    def _take_spare(self) -> socket.socket:
        """Our socket to the spare, no longer ours to poll (the caller hands it a job, or closes it). Only called
        when there is one."""
        spare, self.spare = self.spare, None
        assert spare is not None, "a spare is taken only when there is one"
        try:
            self.poller.unregister(spare.fileno())
        except (KeyError, ValueError):
            pass
        return spare

    def close(self) -> None:
        """Remove our socket and lock file (only if they are still ours), release everything."""
        if self.spare is not None:
            self._take_spare().close()  # the spare sees EOF and exits
        self._drop_criu_spare()  # and so does the checkpoint spare
        if self.listener is not None:
            try:
                if os.stat(self.socket_path).st_ino == self.socket_ino:
                    os.unlink(self.socket_path)
            except OSError:
                pass
            self.listener.close()
            self.listener = None
        try:
            if os.stat(self.lock_path).st_ino == os.fstat(self.lock_fd).st_ino:
                os.unlink(self.lock_path)  # under the lock: a racing launcher re-checks the inode
        except OSError:
            pass
        for fd in (self.pidfd, self.lock_fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.pidfd = self.lock_fd = -1


class Request:
    """What `start` sent: how to become its server."""

    def __init__(self) -> None:
        self.digest = ""
        self.cwd = ""
        self.containerd_pid = 0
        self.options = b""
        self.umask = 0o022
        self.argv: list[str] = []
        self.cmdline: list[bytes] = []
        self.env: list[bytes] = []
        self.listener_fd = -1

    @classmethod
    def parse(cls, fields: list[tuple[str, bytes]], fds: list[int]) -> Request:
        if len(fds) != 1:
            raise wire.ProtocolError(f"expected the listening socket, got {len(fds)} descriptors")
        r = cls()
        r.digest = wire.first(fields, "digest").decode()
        r.cwd = os.fsdecode(wire.first(fields, "cwd"))
        r.containerd_pid = int(wire.first(fields, "containerd_pid"))
        r.options = wire.first(fields, "options", b"")
        r.umask = int(wire.first(fields, "umask", b"18"))
        r.argv = [os.fsdecode(a) for a in wire.every(fields, "argv")]
        r.cmdline = wire.every(fields, "cmdline") or [os.fsencode(a) for a in r.argv]
        r.env = [e for e in wire.every(fields, "env") if b"=" in e[1:]]
        if not r.cwd.startswith("/") or not r.argv:
            raise wire.ProtocolError("request without cwd or argv")
        r.listener_fd = fds[0]
        return r


def _spare_main(sock, server_pid: int) -> None:
    """The spare: detached, holding nothing but its socket to the fork server, it waits for one job."""
    try:
        sock.setblocking(True)
        try:
            fields, fds = wire.recv_frame(sock, max_fds=2)
        except (OSError, ValueError):
            return  # the fork server is gone
        sock.close()
        if len(fds) != 2:
            return
        import socket

        conn = socket.socket(fileno=fds[0])
        conn.settimeout(REQUEST_TIMEOUT)
        request = Request.parse(fields, fds[1:])
        _become_shim(conn, request, int(wire.first(fields, "start_pid")), server_pid, None)
    except BaseException:
        pass
    finally:
        os._exit(0)


def _detach(sock, token: str) -> None:
    """What a spare (a shim spare or the checkpoint spare) does first: a session of its own, the fork server's
    signal handlers gone, nothing held but stdio and its socket to the fork server, the root as cwd, and
    `forkserver` become token in its command line (ps, and tools that look for the server, tell them apart)."""
    os.setsid()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    _close_all_but({0, 1, 2, sock.fileno()})
    os.chdir("/")
    _mark_as(token)


def _mark_as(token: str) -> None:
    """`forkserver` becomes token in our command line."""
    from shim.forkserver import proctitle

    try:
        with open("/proc/self/cmdline", "rb") as f:
            argv = f.read().split(b"\0")[:-1]
        with open("/proc/self/environ", "rb") as f:
            env = f.read().split(b"\0")[:-1]
        proctitle.set_cmdline_environ([token.encode() if a == b"forkserver" else a for a in argv], env)
    except OSError:
        pass


def _become_shim(conn, request: Request, start_pid: int, server_pid: int, intermediate: int | None) -> None:
    """In a spare, or the grandchild of a request: become the shim server `start` (start_pid) would have forked,
    then serve. Never returns."""
    code = 1
    try:
        if os.getsid(0) != os.getpid():
            os.setsid()
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        # The fork server's listener, containerd's pidfd, the lock: only the connection to `start` and the
        # shim's own listening socket are kept.
        _close_all_but({0, 1, 2, conn.fileno(), request.listener_fd})
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        os.umask(request.umask)
        os.chdir(request.cwd)
        os.environb.clear()
        for item in request.env:
            key, _, value = item.partition(b"=")
            os.environb[key] = value
        sys.argv = list(request.argv)
        wire.SERVED_DIGEST = request.digest  # the fork server's own: checked equal in _handle
        notes = _match_start(start_pid, request)
        if intermediate is not None:
            _wait_reparented(intermediate)
        wire.send_frame(conn, wire.encode([("status", b"ready"), ("pid", str(os.getpid()).encode())]))
        reply, _ = wire.recv_frame(conn)
        if wire.first(reply, "status", b"") != b"go":
            return  # `start` gave up (and forked a server itself)
        conn.close()

        import socket

        from shim.actions.cmdline import parse
        from shim.server.daemon import serve

        args = parse(request.argv[1:])
        code = serve(args, socket.socket(fileno=request.listener_fd), request.cwd, request.options,
                     containerd_pid=request.containerd_pid, origin=f"forked by fork server {server_pid}",
                     notes=notes)
    except BaseException:
        code = 1
    finally:
        os._exit(code)


def _match_start(start_pid: int, request: Request) -> list[str]:
    """What a fork of `start` would have inherited from it: cgroups, priority, resource limits, its
    /proc cmdline, environ and comm. Returns what could not be matched (logged once serving)."""
    import resource

    from shim.cgroups.procs import join_like
    from shim.forkserver import proctitle

    notes = []
    try:
        notes += join_like(start_pid, os.getpid())
    except Exception as exc:  # noqa: BLE001 - placement is best effort, as Options.shim_cgroup's
        notes.append(f"cgroups of start not joined: {exc}")
    try:
        priority = os.getpriority(os.PRIO_PROCESS, start_pid)
        if priority != os.getpriority(os.PRIO_PROCESS, 0):
            os.setpriority(os.PRIO_PROCESS, 0, priority)
    except OSError as exc:
        notes.append(f"priority of start not taken: {exc}")
    for name in dir(resource):
        if name.startswith("RLIMIT_"):
            limit = getattr(resource, name)
            try:
                wanted = resource.prlimit(start_pid, limit)
                if wanted != resource.getrlimit(limit):
                    resource.setrlimit(limit, wanted)
            except (OSError, ValueError) as exc:
                notes.append(f"{name} of start not taken: {exc}")
    try:
        proctitle.set_cmdline_environ(request.cmdline, request.env)
    except OSError as exc:
        notes.append(str(exc))
    try:
        with open(f"/proc/{start_pid}/comm", "rb") as f:
            proctitle.set_comm(f.read().rstrip(b"\n"))
    except OSError as exc:
        notes.append(f"comm of start not taken: {exc}")
    return notes


def _wait_reparented(intermediate: int, timeout: float = 1.0) -> None:
    """Until the intermediate has exited: once `start` has its answer, the server must already be where a
    fork of `start` would be after `start` exits (a child of containerd's subreaper, or of init)."""
    deadline = time.monotonic() + timeout
    while os.getppid() == intermediate and time.monotonic() < deadline:
        time.sleep(0.0002)


def _close_all_but(keep: set[int]) -> None:
    low = 3
    for fd in sorted(k for k in keep if k >= 3):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)


def _try_send(conn, fields) -> None:
    try:
        wire.send_frame(conn, wire.encode(fields))
    except OSError:
        pass


def _wait(pid: int) -> None:
    while True:
        try:
            os.waitpid(pid, 0)
            return
        except InterruptedError:
            continue
        except ChildProcessError:
            return


def _reap() -> None:
    """Reap any child that is done (an intermediate whose wait was interrupted, a probe)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _proctitle_works() -> bool:
    from shim.forkserver import proctitle

    with open("/proc/self/cmdline", "rb") as f:
        argv = f.read().split(b"\0")[:-1]
    with open("/proc/self/environ", "rb") as f:
        env = f.read().split(b"\0")[:-1]
    proctitle.set_cmdline_environ(argv, env)
    return True


def _probe_child(check) -> bool:
    """Run check() in a forked child; True if it returned True there."""
    pid = os.fork()
    if pid == 0:
        ok = False
        try:
            ok = bool(check())
        except BaseException:
            pass
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def _on_sigterm(signum, frame):
    raise Exit("SIGTERM")


def main(rest: list[str]) -> int:
    """The `forkserver` action. Exit status: 0 after a normal end (idle, containerd gone, code changed,
    SIGTERM), 3 when it could not start serving."""
    try:
        containerd_pid, containerd_start, digest, lock_fd = int(rest[0]), int(rest[1]), rest[2], int(rest[3])
    except (IndexError, ValueError):
        return 2
    os.set_inheritable(lock_fd, False)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    server = ForkServer(wire.run_dir(), containerd_pid, containerd_start, digest, lock_fd)
    try:
        try:
            server.prepare()
        except (Exit, OSError, ImportError):
            return 3
        try:
            server.run()
        except Exit:
            pass
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        server.close()
