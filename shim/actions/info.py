"""`-info` (containerd 2.x): describe this runtime as a containerd.types.RuntimeInfo."""

from __future__ import annotations

import sys


def print_info() -> int:
    from google.protobuf.any_pb2 import Any

    from shim import __version__
    from shim.api.containerd.types.introspection_pb2 import RuntimeInfo, RuntimeVersion

    info = RuntimeInfo(name="io.containerd.pyshim.v2", version=RuntimeVersion(version=__version__))
    options = b"" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
    if options:
        info.options.CopyFrom(Any.FromString(options))
    sys.stdout.buffer.write(info.SerializeToString())
    return 0
