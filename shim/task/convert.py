"""Translations between the Task API's protobuf messages and the shim's plain types, and
the one place where domain errors become ttrpc status codes."""

from __future__ import annotations

import functools
import logging
import tomllib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar, cast

from google.protobuf.any_pb2 import Any
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp

from shim import errors
from shim.api.containerd.runc.options import oci_pb2
from shim.api.containerd.runtimeoptions.v1 import api_pb2
from shim.api.containerd.types import task_pb2
from shim.oci.runner import RuntimeFailed
from shim.process.state import State
from shim.rootfs.mounts import Mount
from shim.ttrpc import Code, TtrpcError

if TYPE_CHECKING:
    from shim.api.containerd.task.v2 import shim_pb2 as api
    from shim.api.containerd.types import mount_pb2
    from shim.criu.options import CheckpointOptions

log = logging.getLogger(__name__)
Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Message]])
RUNC_OPTIONS = "containerd.runc.v1.Options"
# Type URLs containerd may use for the same runc options message.
RUNC_OPTIONS_URLS = {RUNC_OPTIONS, "io.containerd.runc.v1.Options", f"type.googleapis.com/{RUNC_OPTIONS}"}
CONFIG_FILE_OPTIONS = "runtimeoptions.v1.Options"
CONFIG_FILE_OPTIONS_URLS = {CONFIG_FILE_OPTIONS, f"type.googleapis.com/{CONFIG_FILE_OPTIONS}"}

STATUS = {
    "created": task_pb2.CREATED, "running": task_pb2.RUNNING, "paused": task_pb2.PAUSED,
    "stopped": task_pb2.STOPPED, "deleted": task_pb2.STOPPED,
}

ERROR_CODES: dict[type[Exception], Code] = {
    errors.NotFound: Code.NOT_FOUND,
    errors.AlreadyExists: Code.ALREADY_EXISTS,
    errors.FailedPrecondition: Code.FAILED_PRECONDITION,
    errors.InvalidArgument: Code.INVALID_ARGUMENT,
    errors.Unavailable: Code.UNAVAILABLE,
}


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    """containerd.runc.v1.Options, as the shim uses them."""

    binary_name: str = "runc"
    root: str = ""
    systemd_cgroup: bool = False
    no_pivot_root: bool = False
    no_new_keyring: bool = False
    io_uid: int = 0
    io_gid: int = 0
    shim_cgroup: str = ""
    criu_image_path: str = ""
    criu_work_path: str = ""


def runtime_options(options: Any | None) -> RuntimeOptions:
    """The runtime options of a Create (or of `start`'s stdin): runc's own message, or a
    runtimeoptions.v1.Options naming a TOML file of the same settings."""
    if options is None or not options.type_url:
        return RuntimeOptions()
    try:
        if options.type_url in RUNC_OPTIONS_URLS:
            return _from_runc(oci_pb2.Options.FromString(options.value))
        if options.type_url in CONFIG_FILE_OPTIONS_URLS:
            return options_from_file(api_pb2.Options.FromString(options.value).config_path)
    except DecodeError as exc:
        raise errors.InvalidArgument(f"cannot decode runtime options {options.type_url}: {exc}") from None
    raise errors.InvalidArgument(f"unsupported runtime options type {options.type_url!r}; expected "
                                 f"{RUNC_OPTIONS} or {CONFIG_FILE_OPTIONS}")


def _from_runc(o: oci_pb2.Options) -> RuntimeOptions:
    return RuntimeOptions(binary_name=o.binary_name or "runc", root=o.root, systemd_cgroup=o.systemd_cgroup,
                          no_pivot_root=o.no_pivot_root, no_new_keyring=o.no_new_keyring, io_uid=o.io_uid,
                          io_gid=o.io_gid, shim_cgroup=o.shim_cgroup, criu_image_path=o.criu_image_path,
                          criu_work_path=o.criu_work_path)


def options_from_file(path: str) -> RuntimeOptions:
    """runc options from TOML, keys as containerd's runc options spell them in TOML
    (BinaryName, SystemdCgroup, ...) or as the proto fields (binary_name, ...)."""
    if not path:
        return RuntimeOptions()
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as exc:
        raise errors.InvalidArgument(f"runtime config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise errors.InvalidArgument(f"runtime config {path} is not valid TOML: {exc}") from None
    message = oci_pb2.Options()
    fields = {f.name.replace("_", ""): f.name for f in message.DESCRIPTOR.fields}
    for key, value in table.items():
        name = fields.get(key.replace("_", "").lower())
        if name is None:
            raise errors.InvalidArgument(f"runtime config {path}: unknown option {key!r}")
        try:
            setattr(message, name, value)
        except (TypeError, ValueError) as exc:
            raise errors.InvalidArgument(f"runtime config {path}: {key}: {exc}") from None
    return _from_runc(message)


def mounts(rootfs: Iterable[mount_pb2.Mount]) -> list[Mount]:
    return [Mount(m.type, m.source, tuple(m.options)) for m in rootfs]


def status(state: State) -> task_pb2.Status:
    return STATUS.get(state.status, task_pb2.UNKNOWN)


def timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def to_status(exc: Exception) -> TtrpcError:
    for kind, code in ERROR_CODES.items():
        if isinstance(exc, kind):
            return TtrpcError(code, str(exc))
    if isinstance(exc, RuntimeFailed):
        return TtrpcError(Code.UNKNOWN, str(exc))
    return TtrpcError(Code.UNKNOWN, str(exc) or type(exc).__name__)


def rpc(handler: Handler) -> Handler:
    """Run a Task API handler, turning domain errors into their status codes."""

    @functools.wraps(handler)
    async def wrapper(self: object, request: Message, context: object) -> Message:
        try:
            return await handler(self, request, context)
        except TtrpcError:
            raise
        except (errors.ShimError, RuntimeFailed, OSError) as exc:
            log.info("%s failed: %s", handler.__name__, exc)
            raise to_status(exc) from exc

    return cast(Handler, wrapper)


CHECKPOINT_OPTIONS_URLS = {"containerd.runc.v1.CheckpointOptions",
                           "type.googleapis.com/containerd.runc.v1.CheckpointOptions"}


def checkpoint_options(request: api.CheckpointTaskRequest, annotations: dict[str, str]) -> CheckpointOptions:
    """The options of a Checkpoint: the host file, the container's annotations (its bundle's), then what the
    request carries; the image goes to the request's path unless an option names another."""
    from shim.criu.options import OptionError, from_annotations, from_extension, from_host_config, from_request, resolve

    layer: dict = {}
    extension: dict[str, str] = {}
    if request.HasField("options") and request.options.type_url:
        if request.options.type_url not in CHECKPOINT_OPTIONS_URLS:
            raise errors.InvalidArgument(f"unsupported checkpoint options type {request.options.type_url!r}")
        try:
            o = oci_pb2.CheckpointOptions.FromString(request.options.value)
        except DecodeError as exc:
            raise errors.InvalidArgument(f"cannot decode checkpoint options: {exc}") from None
        layer = from_request(exit=o.exit, open_tcp=o.open_tcp, external_unix_sockets=o.external_unix_sockets,
                             terminal=o.terminal, file_locks=o.file_locks, empty_namespaces=tuple(o.empty_namespaces),
                             cgroups_mode=o.cgroups_mode, image_path=o.image_path, work_path=o.work_path,
                             parent_path=o.parent_path)
        extension = _checkpoint_extension(request.options.value)
    try:
        defaults = {"image_path": request.path} if request.path else {}
        return resolve(defaults, from_host_config(), from_annotations(annotations), layer,
                       from_extension(extension))
    except OptionError as exc:
        raise errors.InvalidArgument(str(exc)) from None


def _checkpoint_extension(value: bytes) -> dict[str, str]:
    """pyshim's own options riding in the same CheckpointOptions bytes (protos/pyshim/checkpoint/v1): what the
    `pyshim` command sends beyond containerd's fields, by pyshim's option names."""
    from shim.api.pyshim.checkpoint.v1 import options_pb2

    try:
        return dict(options_pb2.CheckpointOptionsExtension.FromString(value).options)
    except DecodeError as exc:
        raise errors.InvalidArgument(f"cannot decode pyshim's checkpoint options: {exc}") from None
