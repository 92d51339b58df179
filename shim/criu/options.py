"""Checkpoint options: every option of `runc checkpoint`, plus pyshim's own, and where they
come from.

containerd's API carries only CheckpointOptions, and containerd 1.6/1.7 send even those
only to runtimes named io.containerd.runc.*. So an option can also be set per container
(annotations `io.pyshim.checkpoint.<name>` in the OCI config) and per host (the
`[checkpoint]` table of /etc/pyshim/pyshim.toml). Precedence: request > annotation > host
file > default. Booleans in containerd's CheckpointOptions can only switch an option on: proto3
cannot tell "false" from "not said"; pyshim's own options in the same request (the `pyshim`
command sends them by name, protos/pyshim/checkpoint/v1) can say either, and come last.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ANNOTATION_PREFIX = "io.pyshim.checkpoint."
HOST_CONFIG = "/etc/pyshim/pyshim.toml"
CGROUP_MODES = ("", "soft", "full", "strict", "ignore")
ENGINES = ("criu", "runc")
NETWORK_LOCKS = ("", "iptables", "nftables", "skip")
# Kernel filesystems: nothing of a checkpoint belongs there, and a write into them can change the host.
KERNEL_FILESYSTEMS = ("/proc", "/sys", "/dev")
UNIX_PREFIX = "unix:"  # page-server unix:PATH
MAX_TIMEOUT = 7 * 24 * 3600.0  # a week: anything longer is a typo, and asyncio's timers want finite seconds


class OptionError(ValueError):
    """An option value that cannot be used; the message names the option and its source."""


@dataclass(frozen=True)
class CheckpointOptions:
    # `runc checkpoint` flags, by their flag names (dashes become underscores).
    image_path: str = ""
    work_path: str = ""
    parent_path: str = ""
    leave_running: bool = True  # the Go shim's default: only an explicit exit stops the task
    tcp_established: bool = False
    tcp_skip_in_flight: bool = False
    link_remap: bool = False
    ext_unix_sk: bool = False
    shell_job: bool = False
    lazy_pages: bool = False
    status_fd: bool = False  # a file descriptor cannot cross containerd: see `readiness`
    page_server: str = ""  # ADDRESS:PORT, or unix:PATH for a lazy restore
    file_locks: bool = False
    pre_dump: bool = False
    manage_cgroups_mode: str = ""
    empty_ns: tuple[str, ...] = ()
    auto_dedup: bool = False
    # pyshim's own.
    engine: str = "criu"  # criu: our own CRIU RPC client; runc: `runc checkpoint` / `runc restore`
    network_lock: str = ""  # "": iptables with tcp-established, else skip (shim.criu.plan.network_lock)
    keep_network_lock: bool = False  # after a checkpoint with exit, Delete leaves CRIU's lock for a restore there
    tcp_close: bool = False  # restore: close established connections instead of restoring them
    timeout: float = 600.0  # seconds before a hung CRIU is killed
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    def validate(self) -> CheckpointOptions:
        if self.manage_cgroups_mode not in CGROUP_MODES:
            raise OptionError(f"manage-cgroups-mode {self.manage_cgroups_mode!r}: expected one of "
                              f"{', '.join(m or '(empty)' for m in CGROUP_MODES)}")
        if self.engine not in ENGINES:
            raise OptionError(f"engine {self.engine!r}: expected criu or runc")
        if self.network_lock not in NETWORK_LOCKS:
            raise OptionError(f"network-lock {self.network_lock!r}: expected iptables, nftables or skip")
        for ns in self.empty_ns:
            if ns != "network":
                raise OptionError(f"empty-ns {ns!r}: only 'network' is supported (as in runc)")
        if self.page_server_unix:
            check_path("page-server", self.page_server_unix, final_link_ok=True)
        elif self.page_server:
            host, _, port = self.page_server.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise OptionError(f"page-server {self.page_server!r}: expected ADDRESS:PORT or unix:PATH")
        for name in ("image_path", "work_path"):
            if getattr(self, name):
                check_path(name.replace("_", "-"), getattr(self, name))
        if "\0" in self.parent_path:
            raise OptionError(f"parent-path {self.parent_path!r} contains a NUL byte")
        if self.parent_path.startswith("/"):
            raise OptionError(f"parent-path {self.parent_path!r} must be relative to the image directory "
                              "(as runc requires)")
        if self.pre_dump and not self.leave_running:
            raise OptionError("pre-dump leaves the task running; it cannot be combined with exit")
        if not math.isfinite(self.timeout) or not 0 < self.timeout <= MAX_TIMEOUT:
            raise OptionError(f"timeout {self.timeout}: must be a number of seconds above 0 and at most "
                              f"{MAX_TIMEOUT:g}")
        return self

    @property
    def page_server_unix(self) -> str:
        """The path of `unix:PATH`: a page server on a unix socket, for a lazy restore (pyshim's page server,
        reached through a migration's ssh connection); "" otherwise."""
        return self.page_server[len(UNIX_PREFIX):] if self.page_server.startswith(UNIX_PREFIX) else ""

    @property
    def page_server_address(self) -> tuple[str, int] | None:
        if not self.page_server or self.page_server_unix:
            return None
        host, _, port = self.page_server.rpartition(":")
        return host.strip("[]"), int(port)


def check_path(what: str, path: str, *, final_link_ok: bool = False) -> None:
    """Refuse an image or work path that would put a checkpoint somewhere the caller cannot have meant: not
    absolute, with `..` components (their meaning depends on symbolic links on the way), through a symbolic link
    as its last component (the dump would land where the link points; final_link_ok for paths only read), or in
    /proc, /sys or /dev once every symbolic link on the way is resolved. Symbolic links among the parents are
    followed (a directory moved to another disk is common); what they lead to is checked."""
    if "\0" in path:
        raise OptionError(f"{what} {path!r} contains a NUL byte")
    if not path.startswith("/"):
        raise OptionError(f"{what} {path!r} must be an absolute path")
    if ".." in path.split("/"):
        raise OptionError(f"{what} {path!r} must not contain '..': give the directory's own absolute path")
    if not final_link_ok and os.path.islink(path):
        raise OptionError(f"{what} {path} is a symbolic link (to {os.readlink(path)!r}); refusing to follow it: "
                          "give the real directory")
    # Both as written (/proc/self/cwd/... resolves to wherever the shim runs) and with every link resolved.
    resolved = os.path.realpath(path)
    for candidate in (os.path.normpath(path), resolved):
        root = _kernel_filesystem(candidate)
        if root:
            shown = path if candidate == os.path.normpath(path) else f"{path} (that is {resolved})"
            raise OptionError(f"{what} {shown} is in {root}, a kernel filesystem: checkpoints go to a "
                              "directory on a real filesystem")
    if resolved == "/":
        raise OptionError(f"{what} {path!r} is the root directory: give a directory of its own")


def _kernel_filesystem(path: str) -> str:
    """The kernel filesystem path is in ("" if none); /dev/shm, a tmpfs for anyone's files, is not one."""
    if path == "/dev/shm" or path.startswith("/dev/shm/"):
        return ""
    return next((root for root in KERNEL_FILESYSTEMS if path == root or path.startswith(root + "/")), "")


def check_restore_paths(image_path: str, work_path: str) -> None:
    """A restore's paths: the image is only read (a symbolic link to it is fine), the work directory is written."""
    check_path("checkpoint image path", image_path, final_link_ok=True)
    if work_path:
        check_path("checkpoint work path", work_path)


FIELDS = {f.name: f for f in dataclasses.fields(CheckpointOptions) if f.name != "extra"}


def _coerce(name: str, value: Any, source: str) -> Any:
    kind = FIELDS[name].type
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(f"not a boolean: {value!r}")
        if kind == "float":
            return float(value)
        if kind == "tuple[str, ...]":
            items = value if isinstance(value, (list, tuple)) else str(value).split(",")
            return tuple(str(item).strip() for item in items if str(item).strip())
        if isinstance(value, (dict, list, bool)):
            raise ValueError(f"not a string: {value!r}")
        return str(value)
    except ValueError as exc:
        raise OptionError(f"{source}: {name.replace('_', '-')}: {exc}") from None


def _layer(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    layer = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise OptionError(f"{source}: option name {key!r} is not a string")
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise OptionError(f"{source}: unknown checkpoint option {key!r}")
        layer[name] = _coerce(name, value, source)
    return layer


def from_annotations(annotations: Mapping[str, str]) -> dict[str, Any]:
    if not isinstance(annotations, Mapping):
        raise OptionError(f"annotation: the OCI config's annotations are a {type(annotations).__name__}, "
                          "not a map of strings")
    return _layer({k[len(ANNOTATION_PREFIX):]: v for k, v in annotations.items() if k.startswith(ANNOTATION_PREFIX)},
                  "annotation")


def from_host_config(path: str = HOST_CONFIG) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f).get("checkpoint", {})
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise OptionError(f"{path}: {exc}") from None
    return _layer(table, path)


def from_request(exit: bool = False, open_tcp: bool = False, external_unix_sockets: bool = False,
                 terminal: bool = False, file_locks: bool = False, empty_namespaces: tuple[str, ...] = (),
                 cgroups_mode: str = "", image_path: str = "", work_path: str = "",
                 parent_path: str = "") -> dict[str, Any]:
    """containerd's CheckpointOptions, as the Go shim maps them to runc flags."""
    layer: dict[str, Any] = {}
    if exit:
        layer["leave_running"] = False
    for name, on in (("tcp_established", open_tcp), ("ext_unix_sk", external_unix_sockets),
                     ("shell_job", terminal), ("file_locks", file_locks)):
        if on:
            layer[name] = True
    for name, value in (("manage_cgroups_mode", cgroups_mode), ("image_path", image_path),
                        ("work_path", work_path), ("parent_path", parent_path)):
        if value:
            layer[name] = value
    if empty_namespaces:
        layer["empty_ns"] = tuple(empty_namespaces)
    return layer


def from_extension(values: Mapping[str, str]) -> dict[str, Any]:
    """pyshim's own options sent in a Checkpoint request (the `pyshim` command), by the annotations' names."""
    return _layer(values, "request")


def resolve(*layers: Mapping[str, Any]) -> CheckpointOptions:
    """Options from layers given lowest precedence first."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer)
    return CheckpointOptions(**merged).validate()


def as_record(options: CheckpointOptions) -> dict[str, Any]:
    """The options as stored beside the images (restore honours them)."""
    record = dataclasses.asdict(options)
    record.pop("extra")
    record["empty_ns"] = list(options.empty_ns)
    return record


def from_record(record: Mapping[str, Any]) -> dict[str, Any]:
    return _layer({k: v for k, v in record.items() if k in FIELDS}, "checkpoint record")
