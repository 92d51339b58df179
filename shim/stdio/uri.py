"""Turning the stdio strings containerd sends into targets.

containerd hands the shim one string per stream (Create and Exec requests):
  ""                                  no stream
  /path or fifo:///path               a fifo the client reads (or writes, for stdin)
  file:///path                        a log file the shim appends to
  binary:///path?k=v&env.K=V          a logging binary the shim starts
  binary-v2:///path?...               the same, but readiness must be an explicit byte
This module only parses; opening things is the job of the other modules.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

from shim.stdio.errors import StdioError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_ENV_PREFIX = "env."
# Always set from the shim's own knowledge; a URI cannot override them (as upstream).
_RESERVED_ENV = ("CONTAINER_ID", "CONTAINER_NAMESPACE")


class Kind(enum.Enum):
    NONE = "none"
    FIFO = "fifo"
    FILE = "file"
    BINARY = "binary"


@dataclass(frozen=True)
class Target:
    kind: Kind
    path: str = ""
    args: tuple[str, ...] = ()  # logger arguments, in URI order
    env: tuple[tuple[str, str], ...] = ()  # logger environment from env.* parameters
    strict_ready: bool = False  # binary-v2: the logger must write a byte, EOF alone is not "ready"


NONE = Target(Kind.NONE)


def parse(value: str, stream: str) -> Target:
    """Parse one stream's string; `stream` ("stdin", "stdout", "stderr") only names it in errors."""
    if not value:
        return NONE
    match = _SCHEME.match(value)
    if match is None:
        return Target(Kind.FIFO, value)
    scheme = match.group(1).lower()
    if scheme == "fifo":
        # The rest is a path as-is: fifo paths are never URL-encoded by containerd.
        path = value[match.end():]
        if not path:
            raise StdioError(f"{stream} {value!r} names no fifo path")
        return Target(Kind.FIFO, path)
    if scheme not in ("file", "binary", "binary-v2"):
        raise StdioError(f"{stream} {value!r} uses an unknown stdio scheme {scheme!r} "
                         "(expected a fifo path, fifo://, file://, binary:// or binary-v2://)")
    url = urlsplit(value)
    path = unquote(url.path)
    if url.netloc or not path.startswith("/"):
        raise StdioError(f"{stream} {value!r} must name an absolute path: {scheme}:///absolute/path")
    if scheme == "file":
        return Target(Kind.FILE, path)
    args, env = _logger_args(url.query)
    return Target(Kind.BINARY, path, args, env, strict_ready=scheme == "binary-v2")


def _logger_args(query: str) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Each query key becomes an argument followed by its (first) value, even an empty one;
    env.NAME=value keys become environment variables instead. Upstream iterates a Go map (so
    in random order); we keep the URI's order, which is one of the orders upstream may produce."""
    first: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        first.setdefault(key, value)
    args: list[str] = []
    env: list[tuple[str, str]] = []
    for key, value in first.items():
        if key.startswith(_ENV_PREFIX):
            name = key[len(_ENV_PREFIX):]
            if name and name not in _RESERVED_ENV:
                env.append((name, value))
        else:
            args += [key, value]
    return tuple(args), tuple(env)
