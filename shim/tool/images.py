"""What a checkpoint holds, read from CRIU's images with pycriu (through shim.criu.bindings) and from the files
beside them: the container, the options and statistics, the process tree, each process's open files and sockets,
and the memory dumped."""

from __future__ import annotations

import ipaddress
import json
import os
import struct

from shim.tool import archive
from shim.tool.errors import ToolError

PAGE = os.sysconf("SC_PAGE_SIZE")
TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
              7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING"}
PROTOCOLS = {6: "tcp", 17: "udp", 132: "sctp"}


def _codec():
    from shim.criu import bindings
    from shim.criu.bindings import PycriuMissing

    try:
        return bindings.image_codec()
    except PycriuMissing as exc:
        raise ToolError(f"reading CRIU's images needs pycriu: {exc}") from None


def _load(codec, directory: str, name: str) -> list[dict]:
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        return []
    try:
        with open(path, "rb") as f:
            return codec.load(f).get("entries") or []
    except Exception as exc:  # noqa: BLE001 - pycriu raises its own kinds for a damaged image
        raise ToolError(f"{name} in the checkpoint cannot be read ({type(exc).__name__}: {exc}); the checkpoint is "
                        "corrupt") from None


def _json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _address(family: int, words: list[int]) -> str:
    packed = b"".join(struct.pack("<I", w) for w in words)
    try:
        return str(ipaddress.ip_address(packed[:4] if family == 2 else packed[:16]))
    except ValueError:
        return "?"


def _describe_file(entry: dict) -> dict:
    kind = entry.get("type", "?")
    if kind == "REG":
        return {"type": "file", "path": entry["reg"].get("name", ""), "size": entry["reg"].get("size")}
    if kind == "INETSK":
        sk = entry["isk"]
        family = sk.get("family", 2)
        local = f"{_address(family, sk.get('src_addr') or [0])}:{sk.get('src_port', 0)}"
        remote = f"{_address(family, sk.get('dst_addr') or [0])}:{sk.get('dst_port', 0)}"
        protocol = PROTOCOLS.get(sk.get("proto"), str(sk.get("proto")))
        return {"type": "socket", "protocol": protocol + ("6" if family == 10 else ""), "local": local,
                "remote": remote, "state": TCP_STATES.get(sk.get("state"), str(sk.get("state")))
                if protocol == "tcp" else ""}
    if kind == "UNIXSK":
        return {"type": "unix socket", "path": (entry["usk"].get("name") or b"").decode("utf-8", "replace")
                if isinstance(entry["usk"].get("name"), bytes) else str(entry["usk"].get("name") or "")}
    if kind == "PIPE":
        return {"type": "pipe", "pipe": entry["pipe"].get("pipe_id")}
    return {"type": kind.lower()}


def describe(directory: str) -> dict:
    images = os.path.join(directory, archive.CHECKPOINT_DIR)
    codec = _codec()
    config = _json(os.path.join(directory, archive.CONFIG_DUMP))
    record = _json(os.path.join(images, archive.PYSHIM_RECORD))
    files = {entry["id"]: entry for entry in _load(codec, images, "files.img")}
    processes = []
    memory = 0
    for node in _load(codec, images, "pstree.img"):
        pid = node["pid"]
        core = _load(codec, images, f"core-{pid}.img")
        comm = ((core[0].get("tc") or {}).get("comm") if core else "") or ""
        ids = _load(codec, images, f"ids-{pid}.img")
        files_id = ids[0].get("files_id") if ids else None
        open_files = []
        for fd in _load(codec, images, f"fdinfo-{files_id}.img") if files_id is not None else []:
            described = _describe_file(files.get(fd["id"], {"type": fd.get("type", "?")}))
            open_files.append({"fd": fd["fd"], **described})
        pages = sum(e.get("nr_pages", 0) for e in _load(codec, images, f"pagemap-{pid}.img") if "vaddr" in e)
        memory += pages * PAGE
        processes.append({"pid": pid, "ppid": node.get("ppid", 0), "command": comm,
                          "threads": len(node.get("threads") or [pid]), "memory_dumped": pages * PAGE,
                          "files": open_files})
    if not processes:
        raise ToolError(f"{images} holds no process tree (pstree.img): not a complete CRIU dump")
    sockets = [{"pid": p["pid"], "fd": f["fd"], **{k: v for k, v in f.items() if k not in ("fd", "type")}}
               for p in processes for f in p["files"] if f["type"] == "socket"]
    stats = record.get("stats") or _stats_dump(codec, directory)
    return {
        "container": config.get("id", ""),
        "image": config.get("rootfsImageName", ""),
        "runtime": config.get("containerdRuntime") or config.get("runtime", ""),
        "checkpointed": config.get("checkpointedTime", ""),
        "engine": record.get("engine", ""),
        "options": record.get("options") or {},
        "statistics": stats,
        "memory_dumped": memory,
        "rootfs_diff_size": _size(os.path.join(directory, archive.ROOTFS_DIFF)),
        "processes": processes,
        "sockets": sockets,
        "tcp_established": sum(1 for s in sockets if s.get("state") == "ESTABLISHED"),
    }


def _stats_dump(codec, directory: str) -> dict:
    for path in (os.path.join(directory, archive.STATS_DUMP),
                 os.path.join(directory, archive.CHECKPOINT_DIR, archive.STATS_DUMP)):
        if os.path.exists(path):
            entries = _load(codec, os.path.dirname(path), os.path.basename(path))
            if entries:
                return {k: int(v) for k, v in (entries[0].get("dump") or {}).items()}
    return {}


def _size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _size_text(size: int | None) -> str:
    return "none" if size is None else archive.human_size(size)


def as_text(report: dict) -> str:
    lines = [f"checkpoint   {report['source']}",
             f"container    {report['container'] or '-'} (image {report['image'] or '-'}, {report['runtime'] or '-'})",
             f"taken        {report['checkpointed'] or '-'} by {report['engine'] or 'an unknown engine'}",
             f"memory       {archive.human_size(report['memory_dumped'])} dumped",
             f"rootfs diff  {_size_text(report['rootfs_diff_size'])}"]
    if report["statistics"]:
        lines.append("statistics   " + ", ".join(f"{k} {v}" for k, v in report["statistics"].items()))
    on = sorted(k for k, v in report["options"].items() if v is True)
    if report["options"]:
        lines.append("options      " + (", ".join(on) or "(defaults)"))
    lines.append("processes")
    for process in report["processes"]:
        lines.append(f"  {process['pid']:>6}  {process['command']}  (parent {process['ppid']}, {process['threads']} "
                     f"threads, {archive.human_size(process['memory_dumped'])})")
        for f in process["files"]:
            detail = f.get("path") or (f"{f.get('protocol')} {f.get('local')} -> {f.get('remote')} {f.get('state')}"
                                       if f["type"] == "socket" else f.get("pipe", ""))
            lines.append(f"          fd {f['fd']:<3} {f['type']:<12} {detail}".rstrip())
    lines.append(f"sockets      {len(report['sockets'])} ({report['tcp_established']} established TCP)")
    return "\n".join(lines)
