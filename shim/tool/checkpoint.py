"""`pyshim checkpoint create`: a container's task checkpointed through containerd into pyshim, kept as a directory
in the checkpoint store or exported as one archive, in the layout checkpointctl, containerd's CRI and Podman know.

The images are written by the shim straight into a private staging directory (the request's image path); this
command then adds the container's spec and record, CRIU's log and statistics at the top, and the rootfs changes,
and only then moves the whole into place (a rename, or an archive written aside and renamed).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import time

import grpc

from shim.api.containerd.types import task_pb2
from shim.tool import archive, options, rootfs
from shim.tool.containerd_api import ContainerdClient
from shim.tool.errors import ToolError, from_os, from_rpc
from shim.tool.store import Store

PYSHIM_RUNTIME = "io.containerd.pyshim.v2"
STATUS_NAMES = {v: k.lower() for k, v in task_pb2.Status.items()}


def running_task(client: ContainerdClient, container_id: str):
    """The container record and its task, or the one-line reason there is nothing to checkpoint."""
    where = f"namespace {client.namespace} of containerd at {client.address}"
    try:
        record = client.container(container_id)
    except grpc.RpcError as exc:
        raise from_rpc(exc, f"looking up container {container_id}",
                       not_found=f"no container {container_id!r} in {where}; `ctr -n {client.namespace} containers "
                                 "ls` lists them (or give --namespace)") from None
    try:
        task = client.task(container_id)
    except grpc.RpcError as exc:
        raise from_rpc(exc, f"looking up the task of {container_id}",
                       not_found=f"container {container_id!r} has no task (it is not running): start it "
                                 f"(`ctr -n {client.namespace} task start {container_id}`), then checkpoint") from None
    if task.status not in (task_pb2.RUNNING, task_pb2.PAUSED):
        raise ToolError(f"the task of {container_id!r} is {STATUS_NAMES.get(task.status, 'unknown')}: only a running "
                        "or paused task can be checkpointed; start a new task first")
    if record.runtime.name != PYSHIM_RUNTIME:
        raise ToolError(f"container {container_id!r} runs under {record.runtime.name}, not {PYSHIM_RUNTIME}: "
                        "`pyshim checkpoint` works with pyshim's containers (create them with --runtime "
                        f"{PYSHIM_RUNTIME})")
    return record, task


def create(args, client: ContainerdClient) -> int:
    record, task = running_task(client, args.container)
    keep_in_store = not args.export and not args.create_image
    store = Store.default(args.store)
    if args.export:
        target = os.path.abspath(args.export)
        archive.compression_for(target)
        if not os.path.isdir(os.path.dirname(target)):
            raise ToolError(f"cannot export to {target}: directory {os.path.dirname(target)} does not exist")
    else:
        store.ensure()
        name = args.name or f"{args.container}-{time.strftime('%Y%m%dT%H%M%S')}"
        target = store.path(name)
    if os.path.lexists(target) and (args.export or keep_in_store):
        raise ToolError(f"{target} already exists; remove it (pyshim checkpoint rm) or choose another name")
    if args.create_image:
        _image_name_free(client, args.create_image)
    chosen = options.chosen(args)
    try:
        staging = archive.private_dir_beside(target, "staging")
    except OSError as exc:
        raise from_os(exc, f"preparing {target}") from None
    written = []
    try:
        started = time.monotonic()
        image_path = os.path.join(staging, archive.CHECKPOINT_DIR)
        archive.say(f"checkpointing {args.container} (CRIU dump through containerd and pyshim)...")
        try:
            with client.lease():
                client.checkpoint(args.container, options.request_options(chosen, image_path),
                                  timeout=float(chosen.get("timeout", 600)) + 60)
        except grpc.RpcError as exc:
            if "no space left on device" in (exc.details() or "").lower():
                raise ToolError(f"checkpoint of {args.container} failed: no space left on device in "
                                f"{os.path.dirname(target)}, where the images are written first; free some space or "
                                "write elsewhere (the task was left as it was, nothing was kept)") from None
            raise from_rpc(exc, f"checkpoint of {args.container}") from None
        runtime_duration = time.monotonic() - started
        pyshim_record = _complete(staging, client, record, task, chosen, ignore_rootfs=args.ignore_rootfs)
        if args.create_image:
            from shim.tool import oci_image

            try:
                oci_image.create(client, staging, args.create_image, container_id=args.container,
                                 base_image=record.image)
            except grpc.RpcError as exc:
                raise from_rpc(exc, f"creating image {args.create_image}",
                               exists=f"image {args.create_image} appeared meanwhile; choose another name") from None
            written.append(args.create_image)
        if args.export:
            archive.write(staging, target)
            written.append(target)
        if keep_in_store:
            os.rename(staging, target)
            written.append(target)
        else:
            archive.remove_tree(staging)
    except OSError as exc:
        archive.remove_tree(staging)
        raise from_os(exc, f"checkpoint of {args.container} into {target}") from None
    except BaseException:
        archive.remove_tree(staging)
        raise
    total = time.monotonic() - started
    print("\n".join(written))
    if args.print_stats:
        print(json.dumps(stats_report(args.container, pyshim_record, runtime_duration, total), indent=2))
    return 0


def _image_name_free(client: ContainerdClient, name: str) -> None:
    try:
        client.image(name)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return
        raise from_rpc(exc, f"looking up image {name}") from None
    raise ToolError(f"image {name} already exists in namespace {client.namespace}: choose another name, or remove it "
                    f"(`ctr -n {client.namespace} images rm {name}`)")


def _complete(staging: str, client: ContainerdClient, record, task, chosen: dict[str, str], *,
              ignore_rootfs: bool) -> dict:
    """Everything beside the images: spec, config, status, CRIU's log and stats at the top, the rootfs diff."""
    images = os.path.join(staging, archive.CHECKPOINT_DIR)
    try:
        with open(os.path.join(images, archive.PYSHIM_RECORD)) as f:
            pyshim_record = json.load(f)
    except (OSError, ValueError):
        raise ToolError(f"the shim reported a checkpoint but wrote no {archive.PYSHIM_RECORD} into {images}: is "
                        f"the container's runtime pyshim with this feature (the `pyshim` command's version)?") from None
    for name in (archive.DUMP_LOG, archive.STATS_DUMP):
        source = os.path.join(images, name)
        if os.path.exists(source):
            shutil.copyfile(source, os.path.join(staging, name))
            os.chmod(os.path.join(staging, name), 0o600)
    spec = json.loads(record.spec.value) if record.spec.value else {}
    _write_json(os.path.join(staging, archive.SPEC_DUMP), spec)
    created = record.created_at.ToDatetime(tzinfo=datetime.UTC) if record.HasField("created_at") else None
    _write_json(os.path.join(staging, archive.CONFIG_DUMP), {
        "id": record.id,
        "name": record.id,
        "rootfsImageName": record.image,
        "rootfsImageRef": record.image,
        "runtime": os.path.basename(pyshim_record.get("runtime") or "runc"),
        "createdTime": (created or datetime.datetime.now(datetime.UTC)).isoformat().replace("+00:00", "Z"),
        "checkpointedTime": datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z"),
        "containerdRuntime": record.runtime.name,
        "namespace": client.namespace,
        "snapshotter": record.snapshotter,
        "labels": dict(record.labels),
        "rootfsDiff": not ignore_rootfs,
        "engine": "pyshim",
    })
    _write_json(os.path.join(staging, archive.STATUS_DUMP), {
        "id": record.id, "pid": task.pid, "status": STATUS_NAMES.get(task.status, "unknown"),
        "leaveRunning": chosen.get("leave-running") != "false",
    })
    if not ignore_rootfs:
        mounts = client.mounts(record.snapshotter, record.snapshot_key)
        kind, layer = rootfs.writable_layer(mounts)
        if kind != "overlay":
            raise ToolError(f"the container's snapshot ({record.snapshotter}) is a plain directory, whose changes "
                            "cannot be told from the image's; use --ignore-rootfs, or the overlayfs snapshotter")
        rootfs.write_diff(layer, os.path.join(staging, archive.ROOTFS_DIFF))
        os.chmod(os.path.join(staging, archive.ROOTFS_DIFF), 0o600)
    return pyshim_record


def _write_json(path: str, value) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)


def stats_report(container_id: str, record: dict, runtime_seconds: float,
                 total_seconds: float) -> dict:
    """CRIU's statistics as Podman's --print-stats shows them (durations in microseconds)."""
    stats = dict(record.get("stats") or {})
    return {
        "pyshim_checkpoint_duration": int(total_seconds * 1e6),
        "container_statistics": [{
            "Id": container_id,
            "runtime_checkpoint_duration": int(runtime_seconds * 1e6),
            "criu_statistics": {key: stats[key] for key in ("freezing_time", "frozen_time", "memdump_time",
                                                             "memwrite_time", "pages_scanned", "pages_written")
                                if key in stats},
        }],
    }
