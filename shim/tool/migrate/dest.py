"""DEST of `pyshim migrate`: where the destination's containerd is, reached through ssh.

    ssh://[user@]host[:port]/absolute/path/of/containerd.sock[?namespace=NS&pyshim=PATH&store=DIR&runtime-config=FILE]

As libvirt's qemu+ssh URIs: ssh's own user, host and port, then the path of the destination containerd's socket.
The query says what only the destination knows: the containerd namespace (default: the source's), the `pyshim`
command there (default `pyshim` on the remote PATH), the directory the receiver keeps its work in (default: the
destination's checkpoint store), and a pyshim runtime options file there for the restored task (default: the
source container's runtime options).
"""

from __future__ import annotations

import posixpath
import re
import urllib.parse
from dataclasses import dataclass

from shim.tool.errors import ToolError

QUERY_KEYS = ("namespace", "pyshim", "store", "runtime-config")
# What ssh takes as a user or host name: no option-looking or shell-special text reaches its command line.
_NAME = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.@%+-]*$")
_NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,75}$")  # containerd's namespace names
EXAMPLE = "ssh://root@host-b/run/containerd/containerd.sock"


@dataclass(frozen=True)
class Destination:
    host: str
    socket: str
    namespace: str
    user: str = ""
    port: int | None = None
    pyshim: str = "pyshim"
    store: str = ""
    runtime_config: str = ""

    def display(self) -> str:
        who = f"{self.user}@" if self.user else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = f":{self.port}" if self.port else ""
        return f"ssh://{who}{host}{port}{self.socket} (namespace {self.namespace})"


def parse(text: str, *, default_namespace: str) -> Destination:
    """DEST as given on the command line; ToolError saying what is wrong with it and what a right one looks like."""
    def wrong(why: str) -> ToolError:
        return ToolError(f"destination {text!r}: {why}; expected ssh://[user@]host[:port]/path/of/containerd.sock"
                         f"[?namespace=NS], e.g. {EXAMPLE}")

    parts = urllib.parse.urlsplit(text)
    if parts.scheme != "ssh":
        raise wrong(f"the scheme must be ssh (got {parts.scheme or 'none'!r}): the destination is reached over ssh "
                    "only")
    if parts.fragment:
        raise wrong("a fragment (#...) means nothing here")
    try:
        port = parts.port
    except ValueError:
        raise wrong("the port is not a number from 1 to 65535") from None
    if port == 0:
        raise wrong("the port is not a number from 1 to 65535")
    host = parts.hostname or ""
    if not host or not _NAME.match(host.replace(":", "")):
        raise wrong("no host, or one that is no host name or address")
    user = urllib.parse.unquote(parts.username or "")
    if parts.password is not None:
        raise wrong("a password in the URI would be a secret on the command line; use ssh keys (ssh config, agent, "
                    "or --ssh-option IdentityFile=FILE)")
    if user and not _NAME.match(user):
        raise wrong(f"user {user!r} is not a user name")
    path = urllib.parse.unquote(parts.path)
    if not path.startswith("/") or posixpath.normpath(path) != path or path == "/":
        raise wrong("the path must be the absolute path of the destination containerd's socket")
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True, strict_parsing=False) if parts.query else {}
    for key, values in query.items():
        if key not in QUERY_KEYS:
            raise wrong(f"unknown parameter {key!r} (known: {', '.join(QUERY_KEYS)})")
        if len(values) != 1 or not values[0]:
            raise wrong(f"parameter {key!r} needs exactly one non-empty value")
    given = {key: values[0] for key, values in query.items()}
    namespace = given.get("namespace", default_namespace)
    if not _NAMESPACE.match(namespace):
        raise wrong(f"namespace {namespace!r} is not a containerd namespace name")
    for key in ("pyshim", "store", "runtime-config"):
        value = given.get(key)
        if value is None or (value.startswith("/") and posixpath.normpath(value) == value):
            continue
        if key == "pyshim" and _NAME.match(value):
            continue  # a command name, looked up on the destination's PATH
        raise wrong(f"{key} must be an absolute path on the destination")
    return Destination(host=host, socket=path, namespace=namespace, user=user, port=port,
                       pyshim=given.get("pyshim", "pyshim"), store=given.get("store", ""),
                       runtime_config=given.get("runtime-config", ""))
