"""The memfill workload (memfill.c beside this file): MIB MiB of memory filled with a known pattern, served on a TCP
port (`ping` -> `pong N`, `check` -> `ok MIB` while the pattern is intact). Built static with the host's gcc and put
into an image of its own (the busybox test image plus /usr/bin/memfill), so that a migrated container carries it as
image content, not as a bind mount or a rootfs change. Cached by content, like the other test images.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from . import cbuild
from .image import APPLETS, BUSYBOX, TestImage, available_applets, cached_layout, digest, manifest_digest
from .redis_image import redis_layer

FLAGS = ("-static", "-O2", "-Wall", "-Wextra", "-Werror")
IMAGE_REF = "localhost/pyshim-test/memfill:latest"
BUILDER_VERSION = "1"


def unavailable_reason() -> str | None:
    return cbuild.unavailable_reason("memfill")


def build_memfill_image(cache_dir: Path, busybox: Path = BUSYBOX, ref: str = IMAGE_REF) -> TestImage:
    binary = cbuild.build("memfill", cache_dir, FLAGS).read_bytes()
    busybox_bytes = busybox.read_bytes()
    available = available_applets(busybox)
    applets = tuple(a for a in APPLETS if a in available)
    files = {"usr/bin/memfill": (0o755, binary)}
    inputs = [BUILDER_VERSION, ref, list(applets), digest(busybox_bytes), digest(binary)]
    path = cached_layout(cache_dir, "memfill", inputs, lambda: redis_layer(busybox_bytes, applets, files), ref)
    return TestImage(path=path, ref=ref, manifest_digest=manifest_digest(path),
                     missing_applets=tuple(a for a in APPLETS if a not in available))


def command(mib: int, port: int) -> tuple[str, ...]:
    return ("memfill", str(mib), str(port))


def ask(sock: socket.socket, request: str) -> str:
    """One request, its answer line ("" at end of file)."""
    sock.sendall(request.encode() + b"\n")
    received = b""
    while not received.endswith(b"\n"):
        chunk = sock.recv(256)
        if not chunk:
            break
        received += chunk
    return received.decode().strip()


def pongs(sock: socket.socket) -> int:
    """The number of requests the workload has served (its memory's state), by a ping."""
    answer = ask(sock, "ping")
    if not answer.startswith("pong "):
        raise AssertionError(f"memfill answered {answer!r} to ping")
    return int(answer.split()[1])


def wait_ready(connect, timeout: float = 60.0) -> socket.socket:
    """A connection once the workload answers (filling a GiB takes seconds); connect() makes one attempt."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = connect()
            pongs(sock)
            return sock
        except (OSError, AssertionError):
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)
