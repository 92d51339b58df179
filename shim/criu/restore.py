"""Restoring a container from a checkpoint through the OCI runtime's `restore`, honouring the
options the checkpoint was taken with (recorded beside its images) — which the Go shim
leaves for users to repeat in /etc/criu/runc.conf."""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import sys
import tempfile

from shim import unmount
from shim.criu import images
from shim.criu.log import log_excerpt
from shim.criu.options import CheckpointOptions, OptionError, from_annotations, from_host_config, from_record, resolve
from shim.criu.plan import CRIU_CONFIG_ANNOTATION, DEFAULT_RUNC_CRIU_CONFIG, restore_config, runtime_restore_args
from shim.errors import InvalidArgument, ShimError
from shim.layout import write_atomically
from shim.oci.runner import RuntimeFailed
from shim.oci.runtime import OciRuntime

log = logging.getLogger(__name__)


class RestoreFailed(ShimError):
    pass


def restore_options(bundle: str, image_path: str) -> tuple[CheckpointOptions, dict]:
    """The options a restore honours: the host's, then the checkpoint's own, then the new
    container's annotations (a restore-time choice such as tcp-close wins)."""
    config = _config(bundle)
    record = images.read_record(image_path) or {}
    try:
        options = resolve(from_host_config(), from_record(record.get("options") or {}),
                          from_annotations(config.get("annotations") or {}))
    except OptionError as exc:
        raise InvalidArgument(f"restore from {image_path}: {exc}") from None
    return options, config


def action_script(directory: str) -> str:
    """A script CRIU can run that calls shim.criu.action with this interpreter and paths."""
    path = os.path.join(directory, "pyshim-criu-action")
    code = f"import sys; sys.path[1:1] = {sys.path[1:]!r}; from shim.criu.action import main; sys.exit(main())"
    images.write_private(path, f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -S -c {shlex.quote(code)}\n".encode())
    os.chmod(path, 0o700)
    return path


async def restore(*, container_id: str, bundle: str, image_path: str, work_path: str, runtime: OciRuntime,
                  stdio, pid_file: str, console_socket: str = "", no_pivot: bool = False) -> CheckpointOptions:
    if not os.path.isdir(image_path):
        raise InvalidArgument(f"checkpoint {image_path} does not exist")
    options, config = restore_options(bundle, image_path)
    own_work = not work_path
    work = work_path or tempfile.mkdtemp(prefix="criu-restore-", dir=bundle)
    images.private_dir(work)
    annotations = config.get("annotations") or {}
    user_config = annotations.get(CRIU_CONFIG_ANNOTATION, DEFAULT_RUNC_CRIU_CONFIG) or None
    criu_config = os.path.join(work, "pyshim-criu.conf")
    images.write_private(criu_config, restore_config(options, user_config=user_config,
                                                     action_script=action_script(work)).encode())
    _annotate(bundle, config, criu_config)  # runc hands org.criu.config to CRIU as its config file
    try:
        await runtime.restore(container_id, bundle=bundle, pid_file=pid_file, image_path=image_path,
                              work_path=work, stdio=stdio, console_socket=console_socket, no_pivot=no_pivot,
                              flags=runtime_restore_args(options), timeout=options.timeout)
    except RuntimeFailed as exc:
        kept = _keep_log(work, bundle)
        await _clean_failed_restore(runtime, container_id)
        message = f"restore of {container_id} from {image_path} failed: {exc}"
        lines = log_excerpt(kept) if kept else []
        if lines:
            message += f". From the CRIU log {kept}: " + " | ".join(lines)
        raise RestoreFailed(message) from exc
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    return options


async def _clean_failed_restore(runtime: OciRuntime, container_id: str) -> None:
    """Unmount runc's private bind of the rootfs before runc removes its state: removing a
    still-mounted criu-root deletes the container's files through it."""
    unmount.unmount_all(os.path.join(runtime.state_dir(container_id), "criu-root"))
    try:
        await runtime.delete(container_id, force=True)
    except RuntimeFailed as exc:
        log.warning("cleaning up the failed restore of %s: %s", container_id, exc)


def _keep_log(work: str, bundle: str) -> str | None:
    source, kept = os.path.join(work, "restore.log"), os.path.join(bundle, "criu-restore.log")
    try:
        shutil.copyfile(source, kept)
        return kept
    except OSError:
        return None


def _config(bundle: str) -> dict:
    with open(os.path.join(bundle, "config.json"), "rb") as f:
        return json.load(f)


def _annotate(bundle: str, config: dict, criu_config: str) -> None:
    annotations = dict(config.get("annotations") or {})
    annotations[CRIU_CONFIG_ANNOTATION] = criu_config
    write_atomically(os.path.join(bundle, "config.json"), json.dumps({**config, "annotations": annotations}))
