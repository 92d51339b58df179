"""One container process's stdio, as the task service sees it.

ProcessIO turns the stdin/stdout/stderr/terminal of a Create or Exec request into:
  - runtime_stdio: the fds the OCI runtime gets as 0, 1, 2 (pipes; None means /dev/null),
  - console_socket: the --console-socket path when a terminal is asked for,
  - copies between those pipes (or the pty master) and the client's fifos, a log file or a
    logging binary, running on the event loop until end of file.

How the destination is chosen follows upstream: the stdout string decides (a fifo, file:// for
both output streams, or binary:// for both); stderr is only wired when it is non-empty (always
for binary://); stdin is a fifo or nothing. With a terminal there is no stderr (the pty merges
it) and the runtime's own stdio is /dev/null.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Protocol

from shim.background import BackgroundTasks
from shim.children.reaper import Reaper
from shim.stdio import fds as fdlib
from shim.stdio.console import ConsoleSocket, set_window_size
from shim.stdio.errors import StdioError
from shim.stdio.fds import Fd
from shim.stdio.logger import READY_TIMEOUT, Logger
from shim.stdio.pump import Pump
from shim.stdio.uri import Kind, Target, parse

log = logging.getLogger(__name__)


class StdioLike(Protocol):
    @property
    def stdin(self) -> str: ...
    @property
    def stdout(self) -> str: ...
    @property
    def stderr(self) -> str: ...
    @property
    def terminal(self) -> bool: ...


@dataclass(frozen=True)
class StdioConfig:
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


class _Sink:
    """An output destination; stdout and stderr share one when both go to the same log file."""

    def __init__(self, fds: list[Fd]) -> None:
        self.fds = fds
        self.users = 0

    @property
    def fd(self) -> int:
        return self.fds[0].fd

    def acquire(self) -> int:
        self.users += 1
        return self.fd

    def release(self) -> None:
        # Closing the writer is what gives the client end of file on its fifo.
        self.users -= 1
        if self.users <= 0:
            for fd in self.fds:
                fd.close()


class ProcessIO:
    def __init__(self, config: StdioLike, background: BackgroundTasks) -> None:
        self.config = StdioConfig(config.stdin, config.stdout, config.stderr, config.terminal)
        self._background = background  # a binary:// logger is waited for there after the IO is closed
        self._owned: list[Fd] = []  # everything we opened; close() closes what is left
        self._runtime: list[Fd | None] = [None, None, None]
        self._after_start: list[Fd] = []  # closed by close_after_start besides the runtime's ends
        self._stdin: Fd | None = None  # the stdin fifo's reader
        self._stdin_keepalive: Fd | None = None
        self._out_sink: _Sink | None = None  # with a terminal: where the master's output goes
        self._outputs: list[Pump] = []
        self._stdin_pump: Pump | None = None
        self._console: ConsoleSocket | None = None
        self._master: Fd | None = None
        self._logger: Logger | None = None
        self._started = False
        self._closed = False

    @classmethod
    async def create(cls, config: StdioLike, *, reaper: Reaper, background: BackgroundTasks, uid: int = 0,
                     gid: int = 0, container_id: str, namespace: str,
                     ready_timeout: float = READY_TIMEOUT) -> ProcessIO:
        """Open everything the process's stdio needs; raises StdioError naming what is wrong.

        Never blocks on a fifo whose other end nobody has opened. With binary://, returns once the
        logger is ready (at most ready_timeout seconds)."""
        self = cls(config, background)
        try:
            await self._setup(reaper, uid, gid, container_id, namespace, ready_timeout)
        except BaseException:
            self.close()
            raise
        return self

    # -- what the runtime gets ----------------------------------------------------------------

    @property
    def runtime_stdio(self) -> tuple[int | None, int | None, int | None]:
        """fds for the runtime's 0, 1, 2 (None: /dev/null). Valid until close_after_start()."""
        if self._started or self._closed:
            raise StdioError("the runtime's stdio fds were already closed after start")
        return tuple(None if fd is None else fd.fd for fd in self._runtime)  # type: ignore[return-value]

    @property
    def console_socket(self) -> str:
        """The --console-socket path; "" without a terminal."""
        return self._console.path if self._console is not None else ""

    @property
    def logger_pid(self) -> int:
        """The binary:// logger's pid, 0 without one (its exit is not the container's)."""
        return self._logger.pid if self._logger is not None else 0

    # -- lifecycle --------------------------------------------------------------------------------

    async def receive_console(self, timeout: float) -> None:
        """After `runc create`/`runc exec` returned: take the pty master and start copying."""
        if self._console is None:
            raise StdioError("receive_console() without a terminal")
        master, name = await self._console.receive_master(timeout)
        self._master = self._own(Fd(master, f"pty master {name}"))
        self._console.close()  # one connection only; also removes the directory
        self._console = None
        sink = self._out_sink
        assert sink is not None
        output = Pump("console -> stdout", master, sink.acquire(), on_done=sink.release)
        self._outputs.append(output)
        output.start()
        if self._stdin is not None:
            self._stdin_pump = Pump("stdin -> console", self._stdin.fd, master, on_done=self._console_stdin_done)
            self._stdin_pump.start()

    def close_after_start(self) -> None:
        """Close our copies of the runtime's ends once the process holds them: until then the
        output pipes cannot reach end of file. Idempotent."""
        self._started = True
        for fd in [*self._runtime, *self._after_start]:
            if fd is not None:
                fd.close()

    def close_stdin(self) -> None:
        """CloseIO: drop the shim's own writer on the stdin fifo. Once the client's writers are
        closed as well and what they wrote is copied, the process's stdin reaches end of file
        (with a terminal the console is released then, as upstream does)."""
        if self._stdin_keepalive is not None:
            self._stdin_keepalive.close()

    def process_exited(self) -> None:
        """The process has exited. With a terminal, copy what the pty holds now and end the output there, as
        upstream shuts the console down at exit: end of file (EIO) never comes while something the process
        left behind (a background job) holds the pty, and the client would wait for the drain timeout at
        Delete. Without a terminal the pipes are left to reach end of file, as upstream does."""
        if self._master is None:
            return
        for pump in self._outputs:
            pump.finish()

    def resize(self, width: int, height: int) -> None:
        """Set the terminal's window size; a no-op until a console exists (as upstream)."""
        if self._master is not None and not self._master.closed:
            set_window_size(self._master.fd, width, height)

    async def wait_drained(self, timeout: float) -> bool:
        """Wait until every output copy has reached end of file; False if timeout ran out first."""
        pending = [pump.done for pump in self._outputs if not pump.done.done()]
        if not pending:
            return True
        done, _ = await asyncio.wait(pending, timeout=timeout)
        if len(done) < len(pending):
            log.warning("stdio of %s: output still flowing after %gs", self.config.stdout or "process", timeout)
            return False
        return True

    def close(self) -> None:
        """Stop every copy and release everything (fds, fifo ends, console socket, logger). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for pump in [*self._outputs, *([self._stdin_pump] if self._stdin_pump else [])]:
            pump.stop()  # unregisters from the loop before the fds go
        for fd in self._owned:
            fd.close()
        if self._console is not None:
            self._console.close()
            self._console = None
        if self._logger is not None:
            self._logger.terminate()

    # -- setup ------------------------------------------------------------------------------------

    def _own(self, fd: Fd) -> Fd:
        self._owned.append(fd)
        return fd

    async def _setup(self, reaper: Reaper, uid: int, gid: int, container_id: str, namespace: str,
                     ready_timeout: float) -> None:
        c = self.config
        stdin, stdout, stderr = parse(c.stdin, "stdin"), parse(c.stdout, "stdout"), parse(c.stderr, "stderr")
        if stdin.kind not in (Kind.NONE, Kind.FIFO):
            raise StdioError(f"stdin {c.stdin!r} must be a fifo")
        if stdin.kind is Kind.FIFO:
            reader, keepalive = fdlib.open_input_fifo(stdin.path)
            self._stdin, self._stdin_keepalive = self._own(reader), self._own(keepalive)

        if c.terminal:
            self._console = ConsoleSocket()
            if stdout.kind is Kind.BINARY:
                self._out_sink = await self._start_logger(stdout, reaper, container_id, namespace, ready_timeout,
                                                          terminal=True)
            else:
                self._out_sink = self._open_sink(stdout, "stdout")
            return

        if stdout.kind is Kind.BINARY:
            await self._start_logger(stdout, reaper, container_id, namespace, ready_timeout, uid=uid, gid=gid)
        else:
            streams = (("stdout", 1, stdout), ("stderr", 2, stderr))
            if stdout.kind is Kind.FILE:
                # file:// takes both output streams (stderr only when the request has one).
                shared = self._open_sink(stdout, "stdout")
                sinks = {name: shared for name, _, target in streams if target.kind is not Kind.NONE}
            else:
                if stderr.kind not in (Kind.NONE, Kind.FIFO):
                    raise StdioError(f"stderr {c.stderr!r} must be a fifo when stdout is {c.stdout or 'empty'!r}")
                sinks = {name: self._open_sink(target, name) for name, _, target in streams
                         if target.kind is Kind.FIFO}
            for name, index, _ in streams:
                if name in sinks:
                    self._copy_output(index, name, sinks[name], uid, gid)

        if self._stdin is not None:
            ours, _ = self._runtime_pipe(0, "stdin", uid, gid)
            stdin_fd = self._stdin
            def stdin_done() -> None:
                stdin_fd.close()
                ours.close()

            self._stdin_pump = Pump("client -> stdin", stdin_fd.fd, ours.fd, on_done=stdin_done)
            self._stdin_pump.start()

    def _runtime_pipe(self, index: int, name: str, uid: int, gid: int, nonblocking: bool = True) -> tuple[Fd, Fd]:
        ours, theirs = fdlib.runtime_pipe(name, uid=uid, gid=gid, nonblocking=nonblocking)
        self._own(ours)
        self._runtime[index] = self._own(theirs)
        return ours, theirs

    def _copy_output(self, index: int, name: str, sink: _Sink, uid: int, gid: int) -> None:
        ours, _ = self._runtime_pipe(index, name, uid, gid)
        def done() -> None:
            ours.close()
            sink.release()

        pump = Pump(f"{name} -> client", ours.fd, sink.acquire(), on_done=done)
        self._outputs.append(pump)
        pump.start()

    def _open_sink(self, target: Target, stream: str) -> _Sink:
        if target.kind is Kind.FIFO:
            fds = fdlib.open_output(target.path, stream)
        elif target.kind is Kind.FILE:
            fds = [fdlib.open_log_file(target.path, stream)]
        else:  # a terminal without stdout: keep reading the master so the process never blocks
            fds = [fdlib.open_null()]
        for fd in fds:
            self._own(fd)
        return _Sink(fds)

    async def _start_logger(self, target: Target, reaper: Reaper, container_id: str, namespace: str,
                            ready_timeout: float, *, uid: int = 0, gid: int = 0,
                            terminal: bool = False) -> _Sink | None:
        """Both output pipes go to the logger (fd 3, fd 4). Without a terminal the runtime writes
        them; with one, the shim copies the master into the stdout pipe and the stderr pipe is
        closed at once (the logger sees end of file on fd 4)."""
        if terminal:
            out_r, out_w = (self._own(fd) for fd in fdlib.plain_pipe("logger stdout pipe"))
            err_r, err_w = (self._own(fd) for fd in fdlib.plain_pipe("logger stderr pipe"))
            os.set_blocking(out_w.fd, False)
        else:
            # The read ends are the logger's fds 3 and 4: blocking, like any stdio.
            out_r, out_w = self._runtime_pipe(1, "stdout", uid, gid, nonblocking=False)
            err_r, err_w = self._runtime_pipe(2, "stderr", uid, gid, nonblocking=False)
            # Keep our copies of the read ends until the process has started: runc writes its
            # errors to stderr, and without a reader (a logger that died) it would get SIGPIPE.
            self._after_start += [out_r, err_r]
        self._logger = await Logger.start(target, reaper=reaper, background=self._background, stdout=out_r,
                                          stderr=err_r,
                                          container_id=container_id, namespace=namespace, timeout=ready_timeout)
        if not terminal:
            return None
        out_r.close()
        err_r.close()
        err_w.close()
        return _Sink([out_w])

    def _console_stdin_done(self) -> None:
        """At the end of stdin upstream releases the console: it stops the output copy and closes
        the master, which hangs the pty up (it does not type an EOF character). When the copy
        ended because the master refused input (the pty is gone), the output copy is left to
        drain what is still buffered and ends by itself."""
        assert self._stdin is not None and self._stdin_pump is not None
        self._stdin.close()
        if not self._stdin_pump.eof:
            return
        for pump in self._outputs:
            pump.stop()
        if self._master is not None:
            self._master.close()


async def open_process_io(config: StdioLike, *, reaper: Reaper, background: BackgroundTasks, uid: int = 0,
                          gid: int = 0, container_id: str, namespace: str,
                          ready_timeout: float = READY_TIMEOUT) -> ProcessIO:
    """The task service's factory: ProcessIO.create under the name shim/server/daemon.py imports."""
    return await ProcessIO.create(config, reaper=reaper, background=background, uid=uid, gid=gid,
                                  container_id=container_id,
                                  namespace=namespace, ready_timeout=ready_timeout)
