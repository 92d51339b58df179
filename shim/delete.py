"""The `delete` action: clean up after a shim that is gone, and report the task as killed.

containerd runs it whenever a shim connection ends (normal end, crash, failed reload) with
a 5 s limit that includes interpreter start-up, so it imports only the standard library
and writes its DeleteResponse by hand instead of loading protobuf.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from shim.cli import ShimArgs
from shim.layout import INIT_PID_FILE, RUNTIME_FILE
from shim.mounts import unmount_all
from shim.oci import commands

RUNTIME_DELETE_TIMEOUT = 3.0
KILLED = 128 + 9


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_delete_response(pid: int, exit_status: int, exited_at: float) -> bytes:
    """containerd.task.v2.DeleteResponse{pid 1, exit_status 2, exited_at 3} in protobuf wire form."""
    seconds, nanos = divmod(int(exited_at * 1e9), 10**9)
    stamp = (b"\x08" + _varint(seconds) if seconds else b"") + (b"\x10" + _varint(nanos) if nanos else b"")
    out = b""
    if pid:
        out += b"\x08" + _varint(pid)
    if exit_status:
        out += b"\x10" + _varint(exit_status)
    return out + b"\x1a" + _varint(len(stamp)) + stamp


def runtime_settings(bundle: str) -> dict:
    try:
        with open(os.path.join(bundle, RUNTIME_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def delete(args: ShimArgs) -> int:
    bundle = args.bundle or os.getcwd()
    settings = runtime_settings(bundle)
    runtime = commands.RuntimeConfig(binary=settings.get("binary") or "runc",
                                     root=commands.runtime_root(settings.get("root", ""), args.namespace),
                                     systemd_cgroup=bool(settings.get("systemd_cgroup")))
    try:
        subprocess.run(commands.delete(runtime, args.id, force=True), stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=RUNTIME_DELETE_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired):
        pass  # nothing to delete, or a wedged runtime: unmounting and reporting still matter
    unmount_all(os.path.join(bundle, "rootfs"))
    try:
        with open(os.path.join(bundle, INIT_PID_FILE)) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        pid = 0
    sys.stdout.buffer.write(encode_delete_response(pid, KILLED, time.time()))
    sys.stdout.flush()
    return 0
