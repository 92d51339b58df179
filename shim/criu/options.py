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
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ANNOTATION_PREFIX = "io.pyshim.checkpoint."
HOST_CONFIG = "/etc/pyshim/pyshim.toml"
CGROUP_MODES = ("", "soft", "full", "strict", "ignore")
ENGINES = ("criu", "runc")
NETWORK_LOCKS = ("", "iptables", "nftables", "skip")


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
    page_server: str = ""  # ADDRESS:PORT
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
        if self.page_server:
            host, _, port = self.page_server.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise OptionError(f"page-server {self.page_server!r}: expected ADDRESS:PORT")
        for name in ("image_path", "work_path"):
            value = getattr(self, name)
            if value and not value.startswith("/"):
                raise OptionError(f"{name.replace('_', '-')} {value!r} must be an absolute path")
        if self.parent_path.startswith("/"):
            raise OptionError(f"parent-path {self.parent_path!r} must be relative to the image directory "
                              "(as runc requires)")
        if self.pre_dump and not self.leave_running:
            raise OptionError("pre-dump leaves the task running; it cannot be combined with exit")
        if self.timeout <= 0:
            raise OptionError(f"timeout {self.timeout}: must be positive")
        return self

    @property
    def page_server_address(self) -> tuple[str, int] | None:
        if not self.page_server:
            return None
        host, _, port = self.page_server.rpartition(":")
        return host.strip("[]"), int(port)


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
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise OptionError(f"{source}: unknown checkpoint option {key!r}")
        layer[name] = _coerce(name, value, source)
    return layer


def from_annotations(annotations: Mapping[str, str]) -> dict[str, Any]:
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
