"""The shim server's log lines, in the shape and with the fields of the Go runc shim's.

containerd copies what a shim writes to the bundle's `log` fifo into its own output unchanged (1.6, 1.7 and 2.x
alike), so a shim's lines sit among containerd's and are found by the same filters. The Go shim writes logrus text
lines: `time` (RFC 3339, nanoseconds, local zone), `level` (logrus's names: debug, info, warning, error), `msg`,
then its fields in sorted order, each value quoted only where logfmt needs it. Every one of its lines carries
`runtime=<its runtime type>`; the lines of its server loop add `namespace`, `pid` and `path` (the bundle).

pyshim writes the same: every line carries runtime, namespace and pid (so a filter on any of them finds every line,
not only some), a record may add fields of its own (`log.info(..., extra={"fields": {...}})`), and an exception
becomes an `error` field as logrus's WithError makes it (the traceback stays in the message, for debugging).
"""

from __future__ import annotations

import logging
import os
import time

RUNTIME_TYPE = "io.containerd.pyshim.v2"
# logrus has no "critical"; its fatal and panic mean the process ends, which a Python log call never does.
LEVEL_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning", logging.ERROR: "error",
               logging.CRITICAL: "error"}
# Characters logrus leaves unquoted in a value (its TextFormatter's needsQuoting).
_BARE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._/@^+")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def quote(value: str) -> str:
    """A logfmt value as logrus writes it: bare when it is made of safe characters, else Go-quoted."""
    if all(char in _BARE for char in value):
        return value
    out = []
    for char in value:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def timestamp(created: float) -> str:
    """RFC 3339 with nanoseconds in the local zone (Go's RFC3339NanoFixed); Python's clock gives microseconds."""
    seconds = int(created)
    micros = round((created - seconds) * 1_000_000)
    if micros == 1_000_000:
        seconds, micros = seconds + 1, 0
    local = time.localtime(seconds)
    offset = local.tm_gmtoff or 0
    if offset == 0:
        zone = "Z"
    else:
        sign = "+" if offset > 0 else "-"
        hours, minutes = divmod(abs(offset) // 60, 60)
        zone = f"{sign}{hours:02d}:{minutes:02d}"
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', local)}.{micros:06d}000{zone}"


class LogrusFormatter(logging.Formatter):
    """Formats records as the Go shim's logrus lines, with `fields` on every line (see the module docstring)."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__()
        self.fields = dict(fields)

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        fields = {**self.fields, **getattr(record, "fields", {})}
        if record.exc_info and record.exc_info[1] is not None:
            fields.setdefault("error", str(record.exc_info[1]) or type(record.exc_info[1]).__name__)
            message += "\n" + self.formatException(record.exc_info)
        level = LEVEL_NAMES.get(record.levelno) or ("debug" if record.levelno < logging.INFO else "error")
        parts = [f"time={quote(timestamp(record.created))}", f"level={level}", f"msg={quote(message)}"]
        parts += [f"{key}={quote(str(fields[key]))}" for key in sorted(fields)]
        return " ".join(parts)


class FifoLogHandler(logging.Handler):
    """Writes log lines to containerd's `log` fifo; never blocks, never fails the shim.

    The fifo is opened read-write so that a containerd that is down (no reader) cannot make
    writes fail with EPIPE; lines that do not fit while nobody reads are dropped."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            os.write(self.fd, (self.format(record) + "\n").encode(errors="replace"))
        except OSError:
            pass


def setup_logging(bundle: str, debug: bool, namespace: str) -> None:
    """Root logging to the bundle's `log` fifo (nowhere when there is none: started by hand), in the Go shim's
    line format, every line carrying runtime, namespace and this process's pid."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    try:
        handler: logging.Handler = FifoLogHandler(os.path.join(bundle, "log"))
    except OSError:
        handler = logging.NullHandler()
    handler.setFormatter(LogrusFormatter({"runtime": RUNTIME_TYPE, "namespace": namespace, "pid": str(os.getpid())}))
    root.addHandler(handler)
