"""The command line containerd gives a shim, parsed the way Go's `flag` package does.

`-f v`, `-f=v`, `--f v` and bare booleans are accepted; parsing stops at the first
argument that is not a flag, which is the action (`start`, `delete`, or none to serve).
Kept free of heavy imports: it runs on containerd's hot path.
"""

from __future__ import annotations

BOOLEAN_FLAGS = {"debug", "v", "info"}
VALUE_FLAGS = {"namespace", "id", "address", "publish-binary", "bundle", "socket"}


class UsageError(ValueError):
    pass


class ShimArgs:
    """The parsed command line. A plain class: dataclasses cost milliseconds of imports here."""

    def __init__(self) -> None:
        self.namespace = ""
        self.id = ""
        self.address = ""
        self.publish_binary = ""
        self.bundle = ""
        self.socket = ""
        self.debug = False
        self.version = False
        self.info = False
        self.action = ""
        self.rest: list[str] = []


def _truth(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "t", "true"):
        return True
    if lowered in ("0", "f", "false"):
        return False
    raise UsageError(f"invalid boolean value {value!r}")


def parse(argv: list[str]) -> ShimArgs:
    args = ShimArgs()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        name, has_value, value = arg.lstrip("-").partition("=")
        if name in BOOLEAN_FLAGS:
            setattr(args, {"v": "version"}.get(name, name), _truth(value) if has_value else True)
        elif name in VALUE_FLAGS:
            if not has_value:
                i += 1
                if i >= len(argv):
                    raise UsageError(f"flag needs an argument: -{name}")
                value = argv[i]
            setattr(args, name.replace("-", "_"), value)
        else:
            raise UsageError(f"flag provided but not defined: -{name}")
        i += 1
    if i < len(argv):
        args.action = argv[i]
        args.rest = argv[i + 1:]
    return args
