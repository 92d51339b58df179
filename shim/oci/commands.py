"""The OCI runtime's command lines, one function per subcommand, rendered as pure argv.

runc and crun share this interface. Global flags (root, log, log format, systemd cgroups)
come from RuntimeConfig, the same for every subcommand, as go-runc renders them.
"""

from __future__ import annotations

DEFAULT_ROOT = "/run/containerd/runc"


class RuntimeConfig:
    """Which runtime binary, and its global flags. (A plain class: `delete` imports this module
    on containerd's hot path, and dataclasses cost milliseconds to import.)"""

    __slots__ = ("binary", "root", "log", "systemd_cgroup")

    def __init__(self, binary: str = "runc", root: str = DEFAULT_ROOT, log: str = "",
                 systemd_cgroup: bool = False) -> None:
        self.binary = binary
        self.root = root  # already including the namespace
        self.log = log  # runc's JSON log, read back for error messages
        self.systemd_cgroup = systemd_cgroup

    def __repr__(self) -> str:
        return f"RuntimeConfig({self.binary!r}, root={self.root!r})"

    def globals(self) -> list[str]:
        argv = [self.binary, "--root", self.root]
        if self.log:
            argv += ["--log", self.log, "--log-format", "json"]
        if self.systemd_cgroup:
            argv.append("--systemd-cgroup")
        return argv


def runtime_root(root: str, namespace: str) -> str:
    """The runtime's state root for a containerd namespace (the Go shim's layout)."""
    return f"{(root or DEFAULT_ROOT).rstrip('/')}/{namespace}"


def _flag(enabled: bool, name: str) -> list[str]:
    return [name] if enabled else []


def _value(value: str | None, name: str) -> list[str]:
    return [name, value] if value else []


def create(rt: RuntimeConfig, id: str, *, bundle: str, pid_file: str, console_socket: str = "",
           no_pivot: bool = False, no_new_keyring: bool = False) -> list[str]:
    return [*rt.globals(), "create", "--bundle", bundle, "--pid-file", pid_file,
            *_value(console_socket, "--console-socket"), *_flag(no_pivot, "--no-pivot"),
            *_flag(no_new_keyring, "--no-new-keyring"), id]


def start(rt: RuntimeConfig, id: str) -> list[str]:
    return [*rt.globals(), "start", id]


def exec_(rt: RuntimeConfig, id: str, *, process_file: str, pid_file: str, console_socket: str = "") -> list[str]:
    return [*rt.globals(), "exec", "--detach", "--process", process_file, "--pid-file", pid_file,
            *_value(console_socket, "--console-socket"), id]


def kill(rt: RuntimeConfig, id: str, signal: int, *, all: bool = False) -> list[str]:
    return [*rt.globals(), "kill", *_flag(all, "--all"), id, str(signal)]


def delete(rt: RuntimeConfig, id: str, *, force: bool = False) -> list[str]:
    return [*rt.globals(), "delete", *_flag(force, "--force"), id]


def pause(rt: RuntimeConfig, id: str) -> list[str]:
    return [*rt.globals(), "pause", id]


def resume(rt: RuntimeConfig, id: str) -> list[str]:
    return [*rt.globals(), "resume", id]


def state(rt: RuntimeConfig, id: str) -> list[str]:
    return [*rt.globals(), "state", id]


def ps(rt: RuntimeConfig, id: str) -> list[str]:
    return [*rt.globals(), "ps", "--format", "json", id]


def update(rt: RuntimeConfig, id: str, *, resources_file: str) -> list[str]:
    return [*rt.globals(), "update", "--resources", resources_file, id]


def checkpoint(rt: RuntimeConfig, id: str, flags: list[str]) -> list[str]:
    return [*rt.globals(), "checkpoint", *flags, id]


def restore(rt: RuntimeConfig, id: str, *, bundle: str, pid_file: str, image_path: str, work_path: str,
            console_socket: str = "", no_pivot: bool = False, flags: list[str] | tuple[str, ...] = ()) -> list[str]:
    """`restore --detach` as the Go shim runs it (no subreaper: the shim is the subreaper)."""
    return [*rt.globals(), "restore", "--detach", "--image-path", image_path, "--work-path", work_path,
            "--pid-file", pid_file, "--bundle", bundle, *_value(console_socket, "--console-socket"),
            *_flag(no_pivot, "--no-pivot"), "--no-subreaper", *flags, id]
