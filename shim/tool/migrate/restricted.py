"""A destination reached with a restricted ssh key: `pyshim migrate-receive --forced` as the key's forced command.

An operator who gives a migration key only what it needs writes, in the destination's authorized_keys,

    command="pyshim --address /run/containerd/containerd.sock --namespace prod migrate-receive --forced",restrict KEY

sshd then runs that command whatever the source asked for, and hands the source's own command line over in
SSH_ORIGINAL_COMMAND. The receiver uses the forced command's settings, never the source's: the source's request must
be a `migrate-receive` whose socket, namespace, store and runtime options, where it names them, are the forced ones;
anything else is refused before anything is done, naming what the key allows.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shlex
from collections.abc import Callable

# What a request may name, as the tool's parser calls it, and as DEST's query spells it.
SETTINGS = (("address", "socket"), ("namespace", "namespace"), ("store", "store"),
            ("runtime_config", "runtime-config"))


def refusal(forced: argparse.Namespace, original_command: str | None,
            parse: Callable[[list[str]], argparse.Namespace]) -> str | None:
    """Why the source's request (SSH_ORIGINAL_COMMAND) cannot be served under the forced command; None if it can.
    parse is the tool's argument parser (argv without the program)."""
    if not original_command:
        return ("migrate-receive --forced runs as an ssh key's forced command (command= in authorized_keys), where "
                "sshd sets SSH_ORIGINAL_COMMAND; it was not")
    try:
        argv = shlex.split(original_command)
        with contextlib.redirect_stderr(io.StringIO()):  # argparse's own complaint would go to the source raw
            requested = parse(argv[1:])
    except (ValueError, SystemExit):
        requested = None
    if requested is None or getattr(requested, "command", None) != "migrate-receive":
        return f"this ssh key only runs `pyshim migrate-receive`, not {original_command[:200]!r}"
    for name, spelled in SETTINGS:
        asked, allowed = getattr(requested, name, None), getattr(forced, name, None)
        if asked and asked != allowed:
            return (f"this ssh key only migrates into {describe(forced)}; the source asked for {spelled} {asked!r}: "
                    f"give DEST the key's settings (or use another key)")
    return None


def describe(forced: argparse.Namespace) -> str:
    """The forced command's settings, as a user would check them against DEST."""
    said = [f"containerd {forced.address}", f"namespace {forced.namespace}"]
    if getattr(forced, "store", None):
        said.append(f"store {forced.store}")
    if getattr(forced, "runtime_config", None):
        said.append(f"runtime-config {forced.runtime_config}")
    return ", ".join(said)
