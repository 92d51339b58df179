"""One CRIU request over `criu swrk`, with its notifications, a deadline and readable errors.

CRIU's service mode ("swrk") talks protobuf over a SOCK_SEQPACKET socket: one message per
packet, no framing. The client sends one criu_req; CRIU answers with any number of NOTIFY
responses, each of which the client must acknowledge (criu_req NOTIFY, notify_success) before
CRIU goes on, and then one final response of the request's type. pycriu's own client reads a
single answer, so it cannot drive a dump with notify_scripts on; this one can.

Ownership of file descriptors during a call:
- images_dir_fd / work_dir_fd (and status_fd) in criu_opts are OUR fds: CRIU opens them as
  /proc/<peer>/fd/N, peer being the process that made the socketpair, i.e. this one. The
  caller owns them and must keep them open until the call returns; this module never closes
  or dups them.
- inherit_fd entries (and ps.fd) name fds of the CRIU process itself: pass them with
  pass_fds={criu's fd: our fd}. Child fd 3 is the RPC socket; 0-2 are CRIU's output, which
  this module captures for error messages.
- fds CRIU sends along with a notification (the pty master of "orphan-pts-master") are handed
  to the handler in a list: a handler that keeps one removes it from the list; whatever is
  left in the list when the handler returns or raises is closed here.

CRIU is started through shim.children.spawn with a reaper Subscription taken first, and only ever
waited for through that subscription (never waitpid here).
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import select
import signal
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NamedTuple, TypeAlias

from google.protobuf.message import DecodeError

from shim.children.reaper import Exit, Reaper, Subscription
from shim.children.spawn import spawn
from shim.criu import bindings
from shim.criu.errors import CriuFailed, CriuMissing, CriuTimeout
from shim.criu.log import excerpt, log_excerpt
from shim.fdwait import readable

log = logging.getLogger(__name__)

rpc_pb2 = bindings.rpc_messages()  # PycriuMissing here: nothing of a task is touched before this module loads
# Its messages, in annotations: pycriu has no type information, so to mypy they are Any.
CriuReq: TypeAlias = Any  # rpc_pb2.criu_req
CriuResp: TypeAlias = Any  # rpc_pb2.criu_resp
CriuOpts: TypeAlias = Any  # rpc_pb2.criu_opts

Notify = Callable[[str, int, list[int]], Awaitable[None]]

DEFAULT_TIMEOUT = 600.0  # a dump of a big container writing to slow storage; callers pass less
QUERY_TIMEOUT = 30.0  # VERSION / FEATURE_CHECK / CHECK: CRIU only probes the kernel
SOCKET_FD = 3  # CRIU's end of the socketpair in the child; `criu swrk 3`
# runc reads answers into 40 KiB + 4 KiB of ancillary data. Answers are small (the largest is a
# notification or a response with cr_errmsg), so this is plenty; a truncated packet is an error.
RECV_BUFFER = 256 * 1024
ANC_BUFFER = socket.CMSG_SPACE(64 * array.array("i").itemsize)
DEFAULT_LOG_FILE = "criu.log"  # what CRIU calls its log when criu_opts.log_file is unset

_NOTIFY_OK = rpc_pb2.criu_req(type=rpc_pb2.NOTIFY, notify_success=True).SerializeToString()


class CriuVersion(NamedTuple):
    major: int
    minor: int
    sublevel: int
    gitid: str


class _Abort(Exception):
    """The conversation cannot go on: close the socket (CRIU then aborts) and report why."""

    def __init__(self, reason: str, notification: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.notification = notification


def action_name(req_type: int) -> str:
    """CRIU's CLI spelling of a request type: DUMP -> "dump", PRE_DUMP -> "pre-dump"."""
    try:
        return rpc_pb2.criu_req_type.Name(req_type).lower().replace("_", "-")
    except ValueError:
        return f"request-{req_type}"


class CriuRpc:
    """Runs `criu swrk` once per call. criu is the binary (looked up on PATH); timeout is the
    default deadline of call(); env is CRIU's environment (PATH matters: the network lock execs
    iptables-restore)."""

    def __init__(self, reaper: Reaper, *, criu: str = "criu", timeout: float = DEFAULT_TIMEOUT,
                 env: Mapping[str, str] | None = None) -> None:
        self.reaper = reaper
        self.criu = criu
        self.timeout = timeout
        self.env = env
        self._started: Started | None = None  # a `criu swrk` started ahead, for the next call

    def start_ahead(self) -> Started:
        """Start the `criu swrk` the next call will talk to, now (a checkpoint worker does this while it waits
        for a job: CRIU's exec and start-up, about 4 ms, are then off the checkpoint's path). It waits for its
        request; it exits when its socket closes (our process dies). Raises CriuMissing."""
        if self._started is None:
            self._started = _start(self, {})
        return self._started

    def adopt(self, started: Started) -> None:
        """Use a `criu swrk` another CriuRpc on the same reaper started ahead (start_ahead) for the next call."""
        self._started = started

    async def call(self, req: CriuReq, *, notify: Notify | None = None, timeout: float | None = None,
                   pass_fds: Mapping[int, int] | None = None, check: bool = True) -> CriuResp:
        """Send req, answer its notifications through notify, return CRIU's final response.

        With check (the default) a final response with success=false raises CriuFailed; without
        it the response is returned as it is. Whatever happens, CRIU has exited and been reaped
        when this returns or raises. Raises CriuTimeout past the deadline (CRIU killed),
        CriuFailed when a handler raises (CRIU aborted, no answer sent), when CRIU exits without
        a final response or answers something unreadable; CriuMissing when criu cannot start."""
        extra = dict(pass_fds or {})
        if any(fd <= SOCKET_FD for fd in extra):
            raise ValueError(f"pass_fds: CRIU's fds 0-{SOCKET_FD} are taken (output and the RPC socket)")
        payload = req.SerializeToString()  # before starting anything: a missing required field raises here
        call = _Call(self, req, timeout if timeout is not None else self.timeout)
        return await call.run(payload, notify, extra, check)

    async def version(self, *, timeout: float = QUERY_TIMEOUT) -> CriuVersion:
        """(major, minor, sublevel, gitid) of the CRIU binary; sublevel 0 and gitid "" when unset."""
        resp = await self.call(rpc_pb2.criu_req(type=rpc_pb2.VERSION), timeout=timeout)
        v = resp.version
        return CriuVersion(v.major_number, v.minor_number, v.sublevel if v.HasField("sublevel") else 0, v.gitid)

    async def feature_check(self, *, lazy_pages: bool = True, mem_track: bool = True, pidfd_store: bool = True,
                            timeout: float = QUERY_TIMEOUT) -> dict[str, bool]:
        """Whether CRIU and the kernel support each feature asked for (only those are in the dict).

        CRIU answers success=true whenever the check itself worked and reports each requested
        feature in resp.features; a feature not asked for comes back false, so it is left out
        rather than reported as missing (runc compares only what it asked for, the same way)."""
        asked = {"lazy_pages": lazy_pages, "mem_track": mem_track, "pidfd_store": pidfd_store}
        req = rpc_pb2.criu_req(type=rpc_pb2.FEATURE_CHECK)
        # Always send the features message: CRIU dereferences it unconditionally.
        req.features.SetInParent()
        for name, wanted in asked.items():
            if wanted:
                setattr(req.features, name, True)
        resp = await self.call(req, timeout=timeout)
        return {name: bool(getattr(resp.features, name)) for name, wanted in asked.items() if wanted}

    async def check(self, opts: CriuOpts | None = None, *, timeout: float = QUERY_TIMEOUT) -> None:
        """CRIU's basic `criu check` (not --all); raises CriuFailed with its log when it fails.
        opts may name a log file (log_file, images_dir_fd or work_dir_fd); without one CRIU
        logs to its stderr, which the error quotes."""
        req = rpc_pb2.criu_req(type=rpc_pb2.CHECK)
        if opts is not None:
            req.opts.CopyFrom(opts)
        await self.call(req, timeout=timeout)


async def run_criu(reaper: Reaper, req: CriuReq, *, notify: Notify | None = None,
                   timeout: float = DEFAULT_TIMEOUT, criu: str = "criu", pass_fds: Mapping[int, int] | None = None,
                   env: Mapping[str, str] | None = None, check: bool = True) -> CriuResp:
    """One-shot form of CriuRpc(reaper, criu=..., env=...).call(req, ...)."""
    return await CriuRpc(reaper, criu=criu, env=env).call(req, notify=notify, timeout=timeout,
                                                         pass_fds=pass_fds, check=check)


class _Call:
    """The state of one call: CRIU's pid, its exit, the deadline, where its log is."""

    def __init__(self, rpc: CriuRpc, req: CriuReq, timeout: float) -> None:
        self.rpc = rpc
        self.action = action_name(req.type)
        self.timeout = timeout
        self.log_path = _log_path(req)
        # CRIU may fail before it opens (and truncates) its log: a log left by an earlier run
        # in the same directory must not be quoted as this run's.
        self.log_before = _stat_key(self.log_path)
        self.waiting_for = "waiting for CRIU's answer"
        self.pid = 0
        self.pidfd: int | None = None
        self.late = ""  # set when CRIU outlived the deadline after the conversation ended
        self.exited: asyncio.Future[Exit] | None = None

    async def run(self, payload: bytes, notify: Notify | None, extra: dict[int, int], check: bool):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        started, self.rpc._started = self.rpc._started, None
        if started is None or extra or not started.waiting():
            if started is not None:  # one that cannot serve this call (fds to pass, or gone): it exits on EOF
                started.close()
            started = _start(self.rpc, extra, self.action)
        self.pid, self.pidfd, self.output = started.pid, started.pidfd, started.output
        try:
            self.exited = asyncio.ensure_future(started.exits.wait(self.pid))
            try:
                return await self._run(started.sock, payload, notify, deadline, check)
            finally:
                if not self.exited.done():  # cancelled, or an unexpected error: never leave CRIU behind
                    self._kill()
                    await asyncio.shield(self.exited)
        finally:
            started.close()

    async def _run(self, sock: socket.socket, payload: bytes, notify: Notify | None, deadline: float, check: bool):
        sock.setblocking(False)
        try:
            async with asyncio.timeout_at(deadline) as limit:
                resp = await self._converse(sock, payload, notify)
        except _Abort as abort:
            # No answer to CRIU: closing the socket makes its next recv fail, and it aborts the
            # request (resuming a dumped tree, killing a half-restored one) before it exits.
            sock.close()
            exit = await self._wait_exit(deadline)
            raise CriuFailed(self.action, notification=abort.notification, reason=abort.reason + self.late,
                             exit_status=exit.status, **self._log()) from abort.__cause__
        except TimeoutError:
            if not limit.expired():
                raise
            self._kill()
            await self._exit()
            raise CriuTimeout(self.action, self.timeout, waiting_for=self.waiting_for, **self._log()) from None
        sock.close()  # CRIU exits after its final answer; a keep_open CRIU would wait for another request
        if resp is None:
            exit = await self._wait_exit(deadline)
            raise CriuFailed(self.action, reason="criu ended the conversation without a final response" + self.late,
                             exit_status=exit.status, **self._log())
        await self._wait_exit(deadline)
        if check and not resp.success:
            raise CriuFailed(self.action, cr_errno=resp.cr_errno or None, cr_errmsg=resp.cr_errmsg or None,
                             response=resp, **self._log())
        return resp

    async def _converse(self, sock: socket.socket, payload: bytes, notify: Notify | None):
        if not await _send(sock, payload):
            return None
        while True:
            packet = await _receive(sock)
            if packet is None:
                return None
            data, fds = packet
            try:
                resp = rpc_pb2.criu_resp.FromString(data)
            except DecodeError as exc:
                _close_all(fds)
                raise _Abort(f"unreadable answer from criu ({len(data)} bytes): {exc}") from exc
            if resp.type != rpc_pb2.NOTIFY:
                _close_all(fds)  # nothing but notifications carries fds; never leak one
                return resp
            script = resp.notify.script
            log.debug("criu %s (pid %d): notification %s pid=%d fds=%s",
                      self.action, self.pid, script, resp.notify.pid, fds)
            self.waiting_for = f"in the {script!r} notification handler"
            try:
                if notify is not None:
                    await notify(script, resp.notify.pid, fds)
            except Exception as exc:
                raise _Abort(f"{type(exc).__name__}: {exc}", notification=script) from exc
            finally:
                _close_all(fds)  # what the handler did not take
            self.waiting_for = f"waiting for CRIU after the {script!r} notification"
            if not await _send(sock, _NOTIFY_OK):
                return None

    async def _wait_exit(self, deadline: float) -> Exit:
        """CRIU's exit, waiting no later than the deadline; past it CRIU is killed."""
        remaining = deadline - asyncio.get_running_loop().time()
        exited = self._exit()
        done, _ = await asyncio.wait({exited}, timeout=max(remaining, 0))
        if not done:
            log.warning("criu %s (pid %d) had not exited by its deadline; killing it", self.action, self.pid)
            self.late = f"; criu had not exited {self.timeout:g}s after the start and was killed"
            self._kill()
        return await exited

    def _exit(self) -> asyncio.Future[Exit]:
        """CRIU's exit, as the reaper tells it (run() subscribes before it talks to CRIU)."""
        assert self.exited is not None, "run() waits for CRIU's exit from its start"
        return self.exited

    def _kill(self) -> None:
        try:
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            else:
                os.kill(self.pid, signal.SIGKILL)  # no pidfd (old kernel): our child, not yet waited for
        except ProcessLookupError:
            pass

    def _log(self) -> dict:
        """log_path and log_lines for an error: this run's log file, and CRIU's own output
        (where it writes before its log is set up, or everything with log_to_stderr)."""
        lines: list[str] = []
        path = self.log_path
        if path is not None and _stat_key(path) not in (None, self.log_before):
            lines += log_excerpt(path)
        else:
            path = None
        with open(f"/proc/self/fd/{self.output}", "rb") as output:
            lines += excerpt(output)
        return {"log_path": path, "log_lines": lines, "pid": self.pid}


class Started:
    """A `criu swrk` process and our end of its socket, its output file, the reaper's subscription that reports its
    exit (taken before the spawn) and a pidfd (taken before the loop could reap it: a kill through it never hits a
    recycled pid)."""

    def __init__(self, pid: int, pidfd: int | None, sock: socket.socket, output: int, exits: Subscription) -> None:
        self.pid, self.pidfd, self.sock, self.output, self.exits = pid, pidfd, sock, output, exits

    def waiting(self) -> bool:
        """Whether the process is still there to take a request (its pidfd is readable once it has exited)."""
        if self.pidfd is None:
            return True  # no pidfd (old kernel): a dead one fails its call, which says why
        return not select.select([self.pidfd], [], [], 0)[0]

    def close(self) -> None:
        """Our ends: the socket (a CRIU still waiting exits on EOF), the output file, the pidfd, the subscription."""
        self.sock.close()
        if self.output >= 0:
            os.close(self.output)
            self.output = -1
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        self.exits.close()


def _start(rpc: CriuRpc, extra: Mapping[int, int], action: str = "swrk") -> Started:
    output = os.memfd_create("criu-output", os.MFD_CLOEXEC)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    exits = rpc.reaper.subscribe()
    try:
        pid = spawn([rpc.criu, "swrk", str(SOCKET_FD)], stdout=output, stderr=output,
                    pass_fds={SOCKET_FD: theirs.fileno(), **extra}, env=rpc.env)
    except OSError as exc:
        exits.close()
        ours.close()
        os.close(output)
        raise CriuMissing(action, reason=f"cannot start {rpc.criu!r}: {exc}") from exc
    finally:
        theirs.close()  # only CRIU may hold its end: when CRIU dies, our recv must see EOF
    return Started(pid, _pidfd_open(pid), ours, output, exits)


async def _send(sock: socket.socket, data: bytes) -> bool:
    """Send one packet (SOCK_SEQPACKET sends all or nothing); False if CRIU is gone."""
    try:
        await asyncio.get_running_loop().sock_sendall(sock, data)
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


async def _receive(sock: socket.socket) -> tuple[bytes, list[int]] | None:
    """One packet and the fds that came with it; None at EOF (CRIU closed its end or died)."""
    while True:
        try:
            data, ancdata, flags, _ = sock.recvmsg(RECV_BUFFER, ANC_BUFFER, socket.MSG_CMSG_CLOEXEC)
            break
        except (BlockingIOError, InterruptedError):
            await readable(sock.fileno())
        except ConnectionResetError:
            return None
    fds: list[int] = []
    for level, kind, blob in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(blob[: len(blob) - len(blob) % got.itemsize])
            fds.extend(got)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        _close_all(fds)
        raise _Abort(f"answer from criu truncated (flags {flags:#x}, {len(data)} bytes read)")
    if not data and not fds:
        return None
    return data, fds


def _pidfd_open(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except OSError:  # ENOSYS before Linux 5.3
        return None


def _close_all(fds: list[int]) -> None:
    while fds:
        try:
            os.close(fds.pop())
        except OSError:
            pass


def _log_path(req: CriuReq) -> str | None:
    """Where CRIU will write its log for req: log_file (default criu.log) in the work dir, which
    is work_dir_fd, else the images dir. None when CRIU logs to stderr or there is no dir.
    A config_file (runc.conf) can move the log elsewhere; then only cr_errmsg and CRIU's output
    are left to quote."""
    if not req.HasField("opts"):
        return None
    opts = req.opts
    if opts.log_to_stderr:
        return None
    if opts.HasField("work_dir_fd"):
        directory = _fd_path(opts.work_dir_fd)
    elif opts.images_dir_fd >= 0:
        directory = _fd_path(opts.images_dir_fd)
    else:
        directory = opts.images_dir or None
    if directory is None:
        return None
    return os.path.join(directory, opts.log_file or DEFAULT_LOG_FILE)


def _fd_path(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def _stat_key(path: str | None):
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)
