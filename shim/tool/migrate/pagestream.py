"""--stream: CRIU's page-server connection carried inside the migration's own ssh connection.

On the source, the dump's CRIU (run by the shim, asked for `page-server 127.0.0.1:PORT`) connects to a listener
this command opens on loopback for the dump's duration only, and which takes one connection, from a socket owned by
root (the kernel's /proc/net/tcp says whose; CRIU runs as root, an unprivileged local user does not). Its bytes
travel as P frames to the receiver, which hands them to `criu page-server --ps-socket` on one end of a socket pair:
no port is opened on the destination, no ssh forwarding is needed, and the pages are as authenticated and encrypted
as everything else of the migration. The page server's answers travel back the same way.

The source also records the bytes CRIU sent: if the migration fails after the dump, replaying them into a local
`criu page-server` rebuilds the dumped memory on the source, from which the container is restored where it was.
"""

from __future__ import annotations

import socket
import subprocess
import threading

from shim.tool.errors import ToolError
from shim.tool.migrate import frames
from shim.tool.migrate.channel import PIECE, Channel, ChannelClosed

CHUNK = 1 << 20
ACCEPT_POLL = 0.2
SEND_TIMEOUT = 60.0  # a page server that takes nothing for this long has failed


def page_server_argv(images_dir: str, fd: int, log_file: str) -> list[str]:
    """`criu page-server` writing what arrives on the connected socket fd into images_dir."""
    return ["criu", "page-server", "--images-dir", images_dir, "--ps-socket", str(fd), "--log-file", log_file, "-v4"]


def socket_owner(local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """The uid owning the IPv4 TCP socket with this local and remote address (this network namespace), or None."""
    def hex_address(address: tuple[str, int]) -> str:
        packed = socket.inet_aton(address[0])
        return f"{int.from_bytes(packed, 'little'):08X}:{address[1]:04X}"

    wanted = (hex_address(local), hex_address(remote))
    with open("/proc/self/net/tcp") as f:
        next(f, None)
        for line in f:
            fields = line.split()
            if len(fields) > 7 and (fields[1], fields[2]) == wanted:
                return int(fields[7])
    return None


class SourceRelay:
    """The source's end: CRIU's connection in, P frames out; the page server's answers back to CRIU."""

    def __init__(self, channel: Channel, recording: str) -> None:
        self.channel = channel
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.listener.settimeout(ACCEPT_POLL)
        self.port = self.listener.getsockname()[1]
        self.recording_path = recording
        self._recording = open(recording, "xb")  # noqa: SIM115 - closed by the relay thread
        self.connection: socket.socket | None = None
        self.relayed = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._ended = threading.Event()  # CRIU closed its side and the end was sent
        self._thread = threading.Thread(target=self._run, name="migrate-pages", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> socket.socket | None:
        while not self._stop.is_set():
            try:
                connection, peer = self.listener.accept()
            except TimeoutError:
                continue
            owner = socket_owner(peer, ("127.0.0.1", self.port))
            if owner == 0:
                return connection
            connection.close()  # not CRIU: someone else on this host
        return None

    def _run(self) -> None:
        try:
            connection = self._accept()
            self.listener.close()  # one connection, then nobody else
            if connection is None:
                return
            self.connection = connection
            self.channel.on_pages = self._to_criu
            buffer = memoryview(bytearray(PIECE))  # one buffer for the whole dump: the bytes are written before
            while n := connection.recv_into(buffer):  # the next recv, to the recording and into the channel
                self._recording.write(buffer[:n])
                self.channel.send(frames.PAGES, buffer[:n])
                self.relayed += n
            self.channel.send(frames.PAGES, b"")
        except (OSError, ChannelClosed) as exc:
            self.error = str(exc)
            if self.connection is not None:
                self.connection.close()  # CRIU's dump fails, and the task runs on
            try:
                self.channel.send(frames.PAGES, b"")  # and the destination's page server ends
            except ChannelClosed:
                pass
        finally:
            self._recording.close()
            self._ended.set()

    def _to_criu(self, data: frames.Payload) -> None:
        connection = self.connection
        if connection is None:
            return
        try:
            if data:
                connection.sendall(data)
            else:
                # The page server has closed: after its last answer (CRIU closes too), or because it failed, when
                # CRIU must stop sending at once (its next write fails and the dump with it) rather than stream the
                # rest of the memory into nothing.
                connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # CRIU went away: its dump fails and says so

    def finish(self, timeout: float) -> int:
        """After the dump: the bytes relayed, once CRIU's side ended; ToolError if the relay failed."""
        self._stop.set()
        self._ended.wait(timeout)
        self._thread.join(timeout)
        if self.error:
            raise ToolError(f"streaming the pages to the destination failed: {self.error}")
        if self.connection is None:
            raise ToolError("CRIU never connected to the page stream (the dump sent no pages)")
        return self.relayed

    def close(self) -> None:
        self._stop.set()
        self.channel.on_pages = _discard  # answers still on their way
        for sock in (self.listener, self.connection):
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass
        self._thread.join(5)


class PageServer:
    """The destination's end: `criu page-server` on one end of a socket pair, P frames on the other."""

    def __init__(self, channel: Channel, images_dir: str, log_file: str) -> None:
        self.channel = channel
        self.log_file = log_file
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.settimeout(SEND_TIMEOUT)
        self.socket = ours
        self.failed = ""
        try:
            self.process = subprocess.Popen(page_server_argv(images_dir, theirs.fileno(), log_file),
                                            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        finally:
            theirs.close()
        self.received = 0
        channel.on_pages = self._from_source
        self._thread = threading.Thread(target=self._answers, name="migrate-page-server", daemon=True)
        self._thread.start()

    def _from_source(self, data: frames.Payload) -> None:
        if self.failed:
            return  # the page server is gone: what still comes is dropped (the source's dump fails)
        try:
            if data:
                self.socket.sendall(data)
                self.received += len(data)
            else:
                self.socket.shutdown(socket.SHUT_WR)
        except OSError as exc:
            # It died, or stopped reading for SEND_TIMEOUT: closing its socket ends the answers, whose end tells
            # the source to stop the dump. Never block the channel (every frame waits behind this one).
            self.failed = f"{exc}"
            try:
                self.socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _answers(self) -> None:
        try:
            while data := self._recv():
                self.channel.send(frames.PAGES, data)
        except (OSError, ChannelClosed):
            pass  # ECONNRESET when it died with our bytes unread (a full disk): the end below all the same
        try:
            self.channel.send(frames.PAGES, b"")  # the source must learn it is over, or CRIU waits for an answer
        except ChannelClosed:
            pass

    def _recv(self) -> bytes:
        while True:
            try:
                return self.socket.recv(CHUNK)
            except TimeoutError:
                if self.process.poll() is not None:
                    return b""

    def wait(self, timeout: float) -> None:
        """The page server's end; ToolError with its log's last lines when it failed."""
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise ToolError(f"criu page-server did not finish within {timeout:g} s after the dump") from None
        self._thread.join(5)
        if status != 0:
            raise ToolError(f"criu page-server failed (exit status {status}){log_tail(self.log_file)}")

    def stop(self) -> None:
        self.channel.on_pages = _discard  # what the source still sends after an abort
        if self.process.poll() is None:
            self.process.kill()  # our own child, by its pid
            self.process.wait(10)
        self.socket.close()


def replay(recording: str, images_dir: str, log_file: str, timeout: float = 300.0) -> None:
    """Rebuild the dumped memory into images_dir from the recorded page-server conversation (the rollback's)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        process = subprocess.Popen(page_server_argv(images_dir, theirs.fileno(), log_file), pass_fds=(theirs.fileno(),),
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        theirs.close()
    drained = threading.Thread(target=lambda: _drain(ours), daemon=True)
    drained.start()
    try:
        with open(recording, "rb") as f:
            while chunk := f.read(CHUNK):
                ours.sendall(chunk)
        ours.shutdown(socket.SHUT_WR)
        status = process.wait(timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        raise ToolError(f"rebuilding the dumped memory from the recorded page stream failed ({exc})"
                        f"{log_tail(log_file)}") from None
    finally:
        drained.join(5)
        ours.close()
    if status != 0:
        raise ToolError(f"rebuilding the dumped memory: criu page-server exit status {status}{log_tail(log_file)}")


def _discard(data: frames.Payload) -> None:
    pass


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(CHUNK):
            pass
    except OSError:
        pass


def log_tail(path: str, lines: int = 4) -> str:
    try:
        with open(path, errors="replace") as f:
            tail = [line.strip() for line in f.readlines()[-lines:] if line.strip()]
    except OSError:
        return ""
    return f" (its log {path}: {' / '.join(tail)})" if tail else ""

