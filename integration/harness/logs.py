"""containerd's debug logs: the last lines of one, for error messages and failure reports, and the logfmt fields of
a line (containerd's and its shims' lines are logrus text: time="..." level=... msg="..." key=value ...)."""

from __future__ import annotations

import re
from collections import deque
from pathlib import Path

# key=value where value is bare or a Go-quoted string (which may hold a whole quoted line of a shim, as containerd's
# "cleanup warnings" do: it stays one value).
_LOGFMT_PAIR = re.compile(r'(?:^|\s)([\w.-]+)=("(?:[^"\\]|\\.)*"|\S*)')


def tail(path: Path, lines: int = 60) -> str:
    try:
        with open(path, errors="replace") as log:
            return "".join(deque(log, maxlen=lines))
    except FileNotFoundError:
        return f"({path} was not written)\n"


def logfmt_fields(line: str) -> dict[str, str]:
    """The line's top-level key=value pairs in order, quoted values unquoted (escapes left as they are)."""
    return {key: value[1:-1] if value.startswith('"') else value for key, value in _LOGFMT_PAIR.findall(line)}
