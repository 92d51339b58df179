"""Names, the code digest, message framing and descriptor passing shared by `start` and the fork server.

Standard library only, and only cheap modules: `start` imports it on containerd's hot path.

A message (a frame) is `%08x` of the payload length, then the payload: a magic line, then fields,
each `<name> <decimal length>\\n<value bytes>`. Names may repeat (argv, env). Descriptors travel as
SCM_RIGHTS with the frame's first bytes.
"""

from __future__ import annotations

import _socket
import os
import sys

from shim.bundle.layout import sha256

RUN_DIR = "/run/pyshim"
MAGIC = b"pyshim-forkserver/1\n"
HEADER = 8
MAX_FRAME = 1 << 20
MAX_FDS = 4
_FD_BYTES = 4


# sys.path as the interpreter set it up, before any import could change it (pycriu appends its images
# directory when imported): the digest of a fork server that imported pycriu must still match `start`'s.
LAUNCH_PATH = tuple(sys.path)


# The digest of the code this process runs, when a fork server forked it as a shim server (the fork server checked
# that its imports match it): a server's checkpoint finds its checkpoint spare without hashing the tree again.
SERVED_DIGEST: str | None = None


def code_digest() -> str:
    """The digest of the code this process runs: the one it was forked with, else the code on disk now."""
    return SERVED_DIGEST or source_digest()


class ProtocolError(ValueError):
    pass


def run_dir() -> str:
    return os.environ.get("PYSHIM_FORKSERVER_DIR") or RUN_DIR


def enabled() -> bool:
    """PYSHIM_FORKSERVER=0 (in containerd's environment) turns the fork server off: `start` always forks."""
    return os.environ.get("PYSHIM_FORKSERVER", "1").lower() not in ("0", "false", "no", "off")


def shim_root() -> str:
    """The directory of the `shim` package."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def source_digest(root: str | None = None) -> str:
    """What the fork server's imports depend on: the interpreter, sys.path at launch and its directories'
    mtimes (pip adding or removing a package changes site-packages'), and every .py file of the shim package
    (path, mtime, size). A change to any of them gives another digest, hence another server."""
    h = sha256()
    for item in (sys.executable, sys.version):
        h.update(item.encode(errors="surrogateescape") + b"\0")
    for path_entry in LAUNCH_PATH:
        try:
            mtime = os.stat(path_entry or ".").st_mtime_ns
        except OSError:
            mtime = 0
        h.update(f"{path_entry}\0{mtime}\0".encode(errors="surrogateescape"))
    stack = [root or shim_root()]
    while stack:
        directory = stack.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            if entry.name == "__pycache__":
                continue
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
            elif entry.name.endswith(".py"):
                try:
                    st = entry.stat()
                except OSError:
                    continue
                h.update(f"{entry.path}\0{st.st_mtime_ns}\0{st.st_size}\0".encode(errors="surrogateescape"))
    return h.hexdigest()[:32]


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks after boot): with the pid, it names one process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def server_key(digest: str, containerd_pid: int, containerd_start: int) -> str:
    return sha256(f"{digest}\0{containerd_pid}\0{containerd_start}".encode()).hexdigest()[:32]


def socket_path(directory: str, key: str) -> str:
    return f"{directory}/forkserver-{key}.sock"


def lock_path(directory: str, key: str) -> str:
    return f"{directory}/forkserver-{key}.lock"


# --- framing ---------------------------------------------------------------------------------------------------

def encode(fields: list[tuple[str, bytes]]) -> bytes:
    parts = [MAGIC]
    for name, value in fields:
        if not name or " " in name or "\n" in name:
            raise ProtocolError(f"bad field name {name!r}")
        parts += [name.encode(), b" ", str(len(value)).encode(), b"\n", value]
    payload = b"".join(parts)
    if len(payload) > MAX_FRAME:
        raise ProtocolError(f"message of {len(payload)} bytes exceeds {MAX_FRAME}")
    return b"%08x" % len(payload) + payload


def decode(payload: bytes) -> list[tuple[str, bytes]]:
    if not payload.startswith(MAGIC):
        raise ProtocolError("not a pyshim fork server message")
    fields = []
    i = len(MAGIC)
    while i < len(payload):
        space = payload.find(b" ", i)
        newline = payload.find(b"\n", space + 1) if space >= 0 else -1
        if space < 0 or newline < 0:
            raise ProtocolError("truncated field header")
        name = payload[i:space].decode("ascii", errors="strict") if payload[i:space].isascii() else ""
        length_text = payload[space + 1:newline]
        if not name or not length_text.isdigit():
            raise ProtocolError("malformed field header")
        length = int(length_text)
        end = newline + 1 + length
        if end > len(payload):
            raise ProtocolError(f"field {name} runs past the end of the message")
        fields.append((name, bytes(payload[newline + 1:end])))
        i = end
    return fields


def first(fields: list[tuple[str, bytes]], name: str, default: bytes | None = None) -> bytes:
    for key, value in fields:
        if key == name:
            return value
    if default is None:
        raise ProtocolError(f"field {name} missing")
    return default


def every(fields: list[tuple[str, bytes]], name: str) -> list[bytes]:
    return [value for key, value in fields if key == name]


# --- sockets -----------------------------------------------------------------------------------------------------

def send_frame(sock: _socket.socket, frame: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
    """Send a whole frame; the descriptors go with its first bytes."""
    view = memoryview(frame)
    if fds:
        data = b"".join(fd.to_bytes(_FD_BYTES, sys.byteorder, signed=True) for fd in fds)
        sent = sock.sendmsg([view], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, data)])
        view = view[sent:]
    if len(view):
        sock.sendall(view)


def _recv_exactly(sock: _socket.socket, count: int, into: bytearray) -> None:
    while len(into) < count:
        chunk = sock.recv(count - len(into))
        if not chunk:
            raise ProtocolError("connection closed mid-message" if into else "connection closed")
        into += chunk


def recv_frame(sock: _socket.socket, max_fds: int = 0) -> tuple[list[tuple[str, bytes]], list[int]]:
    """One frame: its fields and the descriptors that came with it (close-on-exec; the caller owns them).
    Never reads past the frame."""
    fds: list[int] = []
    header = bytearray()
    try:
        if max_fds:
            data, ancillary, flags, _ = sock.recvmsg(HEADER, _socket.CMSG_SPACE(max_fds * _FD_BYTES),
                                                     _socket.MSG_CMSG_CLOEXEC)
            for level, kind, cdata in ancillary:
                if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                    usable = len(cdata) - len(cdata) % _FD_BYTES
                    fds += [int.from_bytes(cdata[i:i + _FD_BYTES], sys.byteorder, signed=True)
                            for i in range(0, usable, _FD_BYTES)]
            if flags & _socket.MSG_CTRUNC:
                raise ProtocolError(f"more than {max_fds} descriptors sent")
            if not data:
                raise ProtocolError("connection closed")
            header += data
        _recv_exactly(sock, HEADER, header)
        try:
            length = int(header, 16)
        except ValueError:
            raise ProtocolError("malformed frame header") from None
        if length > MAX_FRAME:
            raise ProtocolError(f"message of {length} bytes exceeds {MAX_FRAME}")
        payload = bytearray()
        _recv_exactly(sock, length, payload)
        return decode(bytes(payload)), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def peer_credentials(sock: _socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer of a connected unix socket, as the kernel recorded them."""
    raw = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    return tuple(int.from_bytes(raw[i:i + 4], sys.byteorder, signed=True) for i in (0, 4, 8))  # type: ignore


def trusted_uid(uid: int) -> bool:
    return uid == 0 or uid == os.geteuid()
