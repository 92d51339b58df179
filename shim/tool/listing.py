"""`pyshim checkpoint ls`, `inspect` and `rm`: the store's checkpoints, and what one holds."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

from shim.tool import archive, images
from shim.tool.errors import ToolError, from_os
from shim.tool.store import Store


def _summary(path: str) -> dict:
    """Name, container, image, when and size of a checkpoint in the store, from its config.dump (directories) or
    the archive's size alone (archives are not unpacked to be listed)."""
    entry: dict[str, str | int] = {"name": os.path.basename(path), "path": path,
                                   "kind": "directory" if os.path.isdir(path) else "archive"}
    if os.path.isdir(path):
        try:
            with open(os.path.join(path, archive.CONFIG_DUMP)) as f:
                config = json.load(f)
            entry.update(container=config.get("id", ""), image=config.get("rootfsImageName", ""),
                         checkpointed=config.get("checkpointedTime", ""))
        except (OSError, ValueError):
            pass
        entry["size"] = sum(os.path.getsize(os.path.join(root, name))
                            for root, _, names in os.walk(path) for name in names)
    else:
        entry["size"] = os.path.getsize(path)
    return entry


def _checkpoint_images(args) -> list[dict]:
    """Checkpoint images in containerd's image store, when containerd answers at --address (else none)."""
    if not os.path.exists(args.address):
        return []
    try:
        from shim.tool import oci_image
        from shim.tool.containerd_api import ContainerdClient

        with ContainerdClient(args.address, args.namespace, timeout=10) as client:
            return oci_image.listed(client)
    except Exception as exc:  # noqa: BLE001 - the store is still worth listing
        print(f"pyshim: checkpoint images not listed: containerd at {args.address}: {exc}", file=sys.stderr)
        return []


def list_store(args) -> int:
    store = Store.default(args.store)
    entries = [_summary(os.path.join(store.root, name)) for name in store.entries()] + _checkpoint_images(args)
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    rows = [("NAME", "CONTAINER", "IMAGE", "CHECKPOINTED", "SIZE")]
    rows += [(e["name"], e.get("container", "-"), e.get("image", "-"), e.get("checkpointed", "-"),
              archive.human_size(e["size"])) for e in entries]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def remove(args) -> int:
    store = Store.default(args.store)
    images = {entry["name"] for entry in _checkpoint_images(args)}
    missing = [name for name in args.names if name not in store.entries() and name not in images]
    if missing:
        raise ToolError(f"no checkpoint {', '.join(missing)} in the store {store.root} or among the checkpoint "
                        f"images of namespace {args.namespace}; nothing was removed (`pyshim checkpoint ls` lists "
                        "them)")
    for name in args.names:
        if name not in store.entries():
            from shim.tool.containerd_api import ContainerdClient

            with ContainerdClient(args.address, args.namespace) as client:
                client.delete_image(name)
            print(name)
            continue
        path = store.path(name)
        try:
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except OSError as exc:
            raise from_os(exc, f"removing {path}") from None
        print(name)
    return 0


def inspect(args) -> int:
    store = Store.default(args.store)
    source = store.resolve(args.source)
    unpacked = None
    try:
        if os.path.isdir(source):
            directory = source
        else:
            unpacked = tempfile.mkdtemp(prefix="pyshim-inspect-")
            archive.extract(source, unpacked)
            directory = unpacked
        if not os.path.isfile(os.path.join(directory, archive.CHECKPOINT_DIR, "inventory.img")):
            archive.check_layout(directory, source)
        report = images.describe(directory)
    except OSError as exc:
        raise from_os(exc, f"inspecting {source}") from None
    finally:
        if unpacked:
            shutil.rmtree(unpacked, ignore_errors=True)
    report = {"source": source, **report}
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=False))
    else:
        print(images.as_text(report))
    return 0
