"""containerd-shim-pyshim-v2: the binary containerd runs for the io.containerd.pyshim.v2 runtime.

`start` and `delete` sit on containerd's hot path, so each action imports only what it needs.
"""

import sys


def main(argv: list[str] | None = None) -> int:
    from shim.actions.cmdline import UsageError, parse

    try:
        args = parse(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    if args.version:
        from shim import __version__

        sys.stdout.write(f"containerd-shim-pyshim-v2:\n  Version:  {__version__}\n"
                         "  Runtime:  io.containerd.pyshim.v2\n")
        return 0
    if args.info:
        from shim.actions.info import print_info

        return print_info()
    if args.action == "start":
        from shim.actions.start import start

        return _exit_now(start(args))
    if args.action == "delete":
        from shim.actions.delete import delete

        return _exit_now(delete(args))
    if args.action == "forkserver":  # launched by `start` (shim/forkserver), not by containerd
        from shim.forkserver.server import main as forkserver_main

        return forkserver_main(args.rest)
    if args.action == "":
        from shim.server.daemon import serve_inherited

        return serve_inherited(args)
    sys.stderr.write(f"unknown action {args.action!r}: expected start or delete\n")
    return 2


def _exit_now(code: int) -> int:
    """End `start` and `delete` without the interpreter's finalization (a millisecond or more on containerd's
    hot path): they leave nothing that needs it, once their output is flushed."""
    import os

    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
