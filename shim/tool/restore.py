"""`pyshim restore SOURCE --name NEW`: a checkpoint (archive or directory; pyshim's, containerd CRI's or, as far as
the formats allow, Podman's) restored into a new container on this containerd.

The new container gets the checkpointed container's image (which must be in this containerd's store), a new
snapshot of it with the checkpoint's rootfs changes applied, and the checkpointed spec (its cgroup path renamed,
namespaces private unless --netns names one); its task is created with the runtime option CriuImagePath naming the
images, so pyshim restores it at Start. Whatever fails, the new container, its snapshot and the unpacked archive
are removed again, and the checkpoint itself is never touched.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import grpc
from google.protobuf.any_pb2 import Any

from shim.api.containerd.runc.options import oci_pb2
from shim.api.containerd.runtimeoptions.v1 import api_pb2
from shim.api.containerd.services.containers.v1 import containers_pb2
from shim.tool import archive, rootfs
from shim.tool.checkpoint import PYSHIM_RUNTIME
from shim.tool.containerd_api import SPEC_TYPE_URL, ContainerdClient, chain_id
from shim.tool.errors import ToolError, from_os, from_rpc
from shim.tool.store import Store

INDEX_TYPES = ("application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json")
TCP_CLOSE_ANNOTATION = "io.pyshim.checkpoint.tcp-close"
# Under the store: stand-ins for bind-mount sources of the checkpointed host, per restored container.
STAND_INS = ".mounts"


def restore(args, client: ContainerdClient) -> int:
    store = Store.default(args.store)
    layer = None
    try:
        source = store.resolve(args.source)
    except ToolError:
        # not a path, not in the store: a checkpoint image in containerd's image store?
        from shim.tool import oci_image

        try:
            layer = oci_image.checkpoint_layer(client, args.source)
        except grpc.RpcError as exc:
            raise from_rpc(exc, f"looking up image {args.source}") from None
        if layer is None:
            raise ToolError(f"no checkpoint {args.source!r}: neither a path, a name in the store {store.root}, nor "
                            f"an image in namespace {client.namespace} (`pyshim checkpoint ls`, `ctr images ls`)"
                            ) from None
        source = args.source
    name = args.name
    try:
        client.container(name)
        raise ToolError(f"a container named {name!r} already exists in namespace {client.namespace}: choose another "
                        f"--name, or remove it (`ctr -n {client.namespace} containers rm {name}`)")
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise from_rpc(exc, f"looking up container {name}") from None
    unpacked = None
    try:
        if layer is None and os.path.isdir(source):
            directory = source
        else:
            store.ensure()
            unpacked = tempfile.mkdtemp(prefix=f".{name}.pyshim-restore-", dir=store.root)
            if layer is not None:
                from shim.tool import oci_image

                oci_image.fetch(client, layer, unpacked)
            else:
                archive.say(f"unpacking {source}...")
                archive.extract(source, unpacked)
            directory = unpacked
        archive.check_layout(directory, source)
        pid = restore_from(args, client, directory, source)
        print(f"{args.name} restored from {source} (pid {pid})")
        return 0
    except OSError as exc:
        raise from_os(exc, f"restoring {source}") from None
    finally:
        if unpacked:
            archive.remove_tree(unpacked)


def _read_json(directory: str, name: str, source: str, required: bool = True):
    path = os.path.join(directory, name)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        if required:
            raise ToolError(f"{source} has no {name}; it is not a container checkpoint pyshim can restore") from None
        return {}
    except ValueError as exc:
        raise ToolError(f"{source}: {name} is not valid JSON ({exc}); the checkpoint is corrupt") from None


def restore_from(args, client: ContainerdClient, directory: str, source: str) -> int:
    """Restore the unpacked checkpoint in directory as container args.name; the task's pid. `pyshim migrate`'s
    receiver adds `labels` (the container's own, instead of where it was restored from) and `runtime_options` (the
    checkpointed container's, when no --runtime-config names this host's) to args."""
    spec = _read_json(directory, archive.SPEC_DUMP, source)
    config = _read_json(directory, archive.CONFIG_DUMP, source, required=False)
    image_ref = args.image or config.get("rootfsImageName") or config.get("rootfsImageRef") or ""
    if not image_ref:
        raise ToolError(f"{source} does not say which image the container ran (config.dump has no rootfsImageName): "
                        "name it with --image")
    if (spec.get("process") or {}).get("terminal"):
        raise ToolError(f"{source} is of a container with a terminal; `pyshim restore` gives none: restore it with "
                        "`ctr` and a console")
    parent = _image_chain_id(client, image_ref)
    stand_ins = os.path.join(Store.default(args.store).root, STAND_INS, args.name)
    _adjust_spec(spec, config, client.namespace, args, stand_ins)
    name, snapshotter = args.name, args.snapshotter
    created_container = created_snapshot = created_task = False
    work = None
    try:
        with client.lease():
            try:
                mounts = client.prepare_snapshot(snapshotter, name, parent)
                created_snapshot = True
            except grpc.RpcError as exc:
                raise from_rpc(exc, f"preparing a snapshot of {image_ref}",
                               not_found=f"image {image_ref} is not unpacked for the {snapshotter} snapshotter: "
                                         f"`ctr -n {client.namespace} images import` unpacks it (or pull it "
                                         "again), or name the snapshotter with --snapshotter") from None
            diff = os.path.join(directory, archive.ROOTFS_DIFF)
            if os.path.exists(diff) or os.path.exists(os.path.join(directory, archive.DELETED_FILES)):
                kind, layer = rootfs.writable_layer(mounts)
                rootfs.apply_diff(diff if os.path.exists(diff) else os.devnull, kind, layer,
                                  os.path.join(directory, archive.DELETED_FILES))
            labels = getattr(args, "labels", None)
            record = containers_pb2.Container(
                id=name, image=image_ref, snapshotter=snapshotter, snapshot_key=name,
                spec=Any(type_url=SPEC_TYPE_URL, value=json.dumps(spec).encode()),
                labels=labels if labels is not None else {
                    "io.pyshim.restored-from": os.path.basename(source),
                    "io.pyshim.checkpoint.container": str(config.get("id", ""))})
            record.runtime.name = PYSHIM_RUNTIME
            runtime_options = getattr(args, "runtime_options", None)
            if runtime_options is not None and not args.runtime_config:
                record.runtime.options.CopyFrom(runtime_options)
            if args.runtime_config:
                record.runtime.options.CopyFrom(Any(type_url="runtimeoptions.v1.Options", value=api_pb2.Options(
                    config_path=os.path.abspath(args.runtime_config)).SerializeToString()))
            try:
                client.create_container(record)
                created_container = True
            except grpc.RpcError as exc:
                raise from_rpc(exc, f"creating container {name}",
                               exists=f"a container named {name!r} appeared meanwhile; choose another --name") from None
        # CRIU's restore log and statistics: never inside the checkpoint
        work = tempfile.mkdtemp(prefix=f"pyshim-restore-work-{name}-")
        task_options = _task_options(args.runtime_config or getattr(args, "runtime_config_path", None),
                                     os.path.join(directory, archive.CHECKPOINT_DIR), work)
        log_uri = f"file://{os.path.abspath(args.log)}" if args.log else ""
        archive.say(f"restoring {name} (CRIU restore through containerd and pyshim)...")
        try:
            client.create_task(name, options=task_options, stdout=log_uri, stderr=log_uri, timeout=args.timeout)
            created_task = True
            pid = client.start_task(name, timeout=args.timeout)
        except grpc.RpcError as exc:
            raise from_rpc(exc, f"restore of {source} into {name}") from None
    except BaseException:
        _undo(client, name, snapshotter, created_task, created_container, created_snapshot)
        archive.remove_tree(stand_ins)
        raise
    finally:
        if work:
            archive.remove_tree(work)
    return pid


def _undo(client: ContainerdClient, name: str, snapshotter: str, task: bool, container: bool, snapshot: bool) -> None:
    for done, step in ((task, lambda: client.delete_task(name)), (container, lambda: client.delete_container(name)),
                       (snapshot, lambda: client.remove_snapshot(snapshotter, name))):
        if done:
            try:
                step()
            except grpc.RpcError as exc:
                print(f"pyshim: cleaning up after the failed restore: {exc.details()}", file=sys.stderr)


def _task_options(runtime_config: str | None, images: str, work: str) -> oci_pb2.Options:
    """runc's Options for the new task: the runtime config file's settings, and the images to restore from."""
    from shim.task.convert import options_from_file

    try:
        settings = options_from_file(runtime_config or "")
    except Exception as exc:  # noqa: BLE001 - the shim's InvalidArgument, said as the command's error
        raise ToolError(f"--runtime-config: {exc}") from None
    return oci_pb2.Options(binary_name=settings.binary_name, root=settings.root, systemd_cgroup=settings.systemd_cgroup,
                           no_pivot_root=settings.no_pivot_root, no_new_keyring=settings.no_new_keyring,
                           io_uid=settings.io_uid, io_gid=settings.io_gid, shim_cgroup=settings.shim_cgroup,
                           criu_image_path=images, criu_work_path=work)


def _image_chain_id(client: ContainerdClient, ref: str) -> str:
    """The snapshot name of the image's unpacked filesystem (its config's diff IDs, chained)."""
    try:
        image = client.image(ref)
    except grpc.RpcError as exc:
        raise from_rpc(exc, f"looking up image {ref}",
                       not_found=f"image {ref} (the checkpointed container's) is not in namespace "
                                 f"{client.namespace} of this containerd: import or pull it (`ctr -n "
                                 f"{client.namespace} images import FILE`), then restore again, or name another "
                                 "with --image") from None
    try:
        target = image.target
        manifest = json.loads(client.read(target.digest))
        if target.media_type in INDEX_TYPES or "manifests" in manifest:
            chosen = next((m for m in manifest.get("manifests", [])
                           if (m.get("platform") or {}).get("architecture") in (None, _arch())
                           and (m.get("platform") or {}).get("os", "linux") == "linux"), None)
            if chosen is None:
                raise ToolError(f"image {ref} has no linux/{_arch()} manifest")
            manifest = json.loads(client.read(chosen["digest"]))
        config = json.loads(client.read(manifest["config"]["digest"]))
        diff_ids = config["rootfs"]["diff_ids"]
    except grpc.RpcError as exc:
        raise from_rpc(exc, f"reading image {ref}",
                       not_found=f"image {ref} is only partly in this containerd's content store: pull or import "
                                 "it again") from None
    except (KeyError, ValueError, TypeError) as exc:
        raise ToolError(f"image {ref}: cannot read its layers ({exc})") from None
    if not diff_ids:
        raise ToolError(f"image {ref} has no layers")
    return chain_id(diff_ids)


def _arch() -> str:
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def _network_namespace(entry: dict, netns: str | None) -> dict:
    """Where the restored network namespace comes from. CRIU brings a namespace the container had of its own back
    as a new one (runc dumps it empty); only a namespace given by path (CNI's, a pod's) was dumped as external and can
    be swapped for another one on restore (without --netns, a new one when the path is not this host's)."""
    checkpointed = entry.get("path")
    if not checkpointed:
        if netns:
            raise ToolError("the checkpointed container had a network namespace of its own, which CRIU restores as "
                            "a new one, not into --netns; restore without --netns (OCI hooks in the spec network the "
                            "new one, docs/checkpoint.md), or checkpoint containers whose network namespace is given "
                            "by path (ctr run --with-ns network:PATH, CNI)")
        return entry
    if netns:
        return {**entry, "path": os.path.abspath(netns)}
    if os.path.exists(checkpointed) and not checkpointed.startswith("/proc/"):
        print(f"pyshim: restoring into the checkpointed network namespace {checkpointed} (another with --netns)",
              file=sys.stderr)
        return entry
    # A pod's namespace (/proc/<pid>/ns/net of its sandbox) or a path of the checkpointed host: a new one here.
    print(f"pyshim: the checkpointed network namespace {checkpointed} is not this host's: restoring into a new one "
          "(name one with --netns)", file=sys.stderr)
    return {key: value for key, value in entry.items() if key != "path"}


HOST_FILES = ("/etc/hostname", "/etc/hosts", "/etc/resolv.conf", "/dev/termination-log")


def _stand_in(directory: str, destination: str, spec: dict) -> str:
    """A file (for the files CRI and Podman bind-mount) or an empty directory standing in for a missing source."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, destination.strip("/").replace("/", "_") or "root")
    if destination not in HOST_FILES:
        os.makedirs(path, exist_ok=True)
        return path
    content = ""
    if destination == "/etc/hostname":
        content = (spec.get("hostname") or "") + "\n"
    elif destination == "/etc/hosts":
        content = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    elif destination == "/etc/resolv.conf" and os.path.exists("/etc/resolv.conf"):
        with open("/etc/resolv.conf") as f:
            content = f.read()
    with open(path, "w") as f:
        f.write(content)
    os.chmod(path, 0o644)
    return path


def _adjust_spec(spec: dict, config: dict, namespace: str, args, stand_ins: str) -> None:
    """The checkpointed spec made this container's: its cgroup, its namespaces, stand-ins for bind-mount sources
    that do not exist here (kept in stand_ins, which must outlive the container)."""
    linux = spec.setdefault("linux", {})
    cgroups = linux.get("cgroupsPath") or ""
    if cgroups:
        if ":" in cgroups:  # systemd's slice:prefix:name
            slice_, prefix, _ = cgroups.split(":", 2)
            linux["cgroupsPath"] = f"{slice_}:{prefix}:{args.name}"
        else:
            linux["cgroupsPath"] = f"/{namespace}/{args.name}"
    namespaces = []
    for entry in linux.get("namespaces") or []:
        entry = dict(entry)
        if entry.get("type") == "network":
            entry = _network_namespace(entry, args.netns)
        else:
            entry.pop("path", None)  # the checkpointed host's namespaces do not exist here: a private one
        namespaces.append(entry)
    if args.netns and not any(e.get("type") == "network" for e in namespaces):
        namespaces.append({"type": "network", "path": os.path.abspath(args.netns)})
    linux["namespaces"] = namespaces
    for mount in spec.get("mounts") or []:
        options = mount.get("options") or []
        source = mount.get("source", "")
        if ("bind" in options or "rbind" in options or mount.get("type") == "bind") and not os.path.exists(source):
            # CRIU's images name every mount the container had: one left out cannot be restored ("No mapping for
            # ... mountpoint"). A file or directory of the checkpointed host (CRI's /etc/hosts, /dev/shm, ...)
            # gets a stand-in here.
            mount["source"] = _stand_in(stand_ins, mount.get("destination", ""), spec)
            print(f"pyshim: {mount.get('destination')}: {source} does not exist on this host; bind-mounting the "
                  f"stand-in {mount['source']}", file=sys.stderr)
    annotations = spec.setdefault("annotations", {})
    if args.tcp_close:
        annotations[TCP_CLOSE_ANNOTATION] = "true"
