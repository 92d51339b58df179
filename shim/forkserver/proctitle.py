"""Give a forked process the /proc/PID/cmdline, environ and comm of another command line.

A shim server forked by the fork server would otherwise show the fork server's command line; tools
(ps, the test harness, the benchmark) find a shim server by its `-namespace`/`-id`/`-address` flags,
and containerd's environment in /proc/PID/environ. prctl(PR_SET_MM, PR_SET_MM_MAP) points the kernel's
argument and environment ranges at new buffers; it needs no capability (only CONFIG_CHECKPOINT_RESTORE,
which CRIU needs anyway), unlike the single-field PR_SET_MM_ARG_START (CAP_SYS_RESOURCE). The other
fields of the map are passed through unchanged from /proc/self/stat and the current program break.
"""

from __future__ import annotations

import ctypes
import os

PR_SET_NAME = 15
PR_SET_MM = 35
PR_SET_MM_MAP = 14

_libc = ctypes.CDLL(None, use_errno=True)
_libc.sbrk.restype = ctypes.c_void_p
_libc.sbrk.argtypes = [ctypes.c_long]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
_keep: list[ctypes.Array] = []  # the buffers the kernel now points at live as long as the process


class _MmMap(ctypes.Structure):  # struct prctl_mm_map (linux/prctl.h)
    _fields_ = [*((name, ctypes.c_uint64) for name in (
        "start_code", "end_code", "start_data", "end_data", "start_brk", "brk", "start_stack",
        "arg_start", "arg_end", "env_start", "env_end")),
        ("auxv", ctypes.c_void_p), ("auxv_size", ctypes.c_uint32), ("exe_fd", ctypes.c_uint32)]


def _stat_fields() -> list[int]:
    with open("/proc/self/stat", "rb") as f:
        data = f.read()
    # Fields after "(comm)": field 3 is index 0.
    return [int(x) if x.lstrip(b"-").isdigit() else 0 for x in data[data.rindex(b")") + 2:].split()]


def set_cmdline_environ(argv: list[bytes], environ: list[bytes]) -> None:
    """/proc/self/cmdline becomes argv, /proc/self/environ becomes environ (KEY=VALUE items). Raises OSError."""
    args = b"".join(a + b"\0" for a in argv) or b"\0"
    env = b"".join(e + b"\0" for e in environ) or b"\0"
    arg_buf = ctypes.create_string_buffer(args, len(args))
    env_buf = ctypes.create_string_buffer(env, len(env))
    f = _stat_fields()

    def field(n: int) -> int:
        return f[n - 3]

    mm = _MmMap(start_code=field(26), end_code=field(27), start_data=field(45), end_data=field(46),
                start_brk=field(47), start_stack=field(28),
                arg_start=ctypes.addressof(arg_buf), arg_end=ctypes.addressof(arg_buf) + len(args),
                env_start=ctypes.addressof(env_buf), env_end=ctypes.addressof(env_buf) + len(env),
                auxv=None, auxv_size=0, exe_fd=0xFFFFFFFF)
    # Last, right before the call: the break as it is now (the map sets it too).
    mm.brk = _libc.sbrk(0)
    if _libc.prctl(PR_SET_MM, PR_SET_MM_MAP, ctypes.addressof(mm), ctypes.sizeof(mm), 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_MM_MAP): {os.strerror(errno)}")
    _keep[:] = [arg_buf, env_buf]


def set_comm(name: bytes) -> None:
    buf = ctypes.create_string_buffer(name[:15], 16)
    if _libc.prctl(PR_SET_NAME, ctypes.addressof(buf), None, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_NAME): {os.strerror(errno)}")
