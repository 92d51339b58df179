"""CRIU's network lock on the source, removed by this command once the destination runs.

The dump asks the shim to keep the lock past the task's Delete (keep-network-lock): until the destination's task
runs, a rollback must be able to restore the container here with no packet having reached its (repair-mode, then
closed) sockets in between. Once the destination runs, no restore will come into the source's namespace, and the
lock goes: the rules the dump added (shim.criu.netlock says which are the dump's), through nsenter and the iptables
or nft commands, as the shim removes them.
"""

from __future__ import annotations

import os
import subprocess

from shim.criu import netlock

TIMEOUT = 20.0


def _in(namespace: str, argv: list[str], stdin: str | None = None) -> str:
    result = subprocess.run(["nsenter", f"--net={namespace}", *argv], input=stdin, capture_output=True, text=True,
                            timeout=TIMEOUT)
    if result.returncode != 0:
        raise OSError(f"{' '.join(argv)} in {namespace}: {result.stderr.strip()[-300:]}")
    return result.stdout


def release(record: dict | None) -> list[str]:
    """Remove the lock a dump recorded (its pyshim record's network.lock); what was removed, as readable lines."""
    lock = netlock.Lock.from_record(record)
    if lock is None or not lock.namespace:
        return []
    try:
        if lock.inode and os.stat(lock.namespace).st_ino != lock.inode:
            return []  # the path names another namespace now
    except OSError:
        return []  # the namespace is gone, and its rules with it
    if lock.method == "nftables":
        names = [name for family, name in netlock.nft_tables(_in(lock.namespace, ["nft", "list", "tables"]))
                 if lock.owns_table(family, name)]
        for name in names:
            _in(lock.namespace, ["nft", "delete", "table", "inet", name])
        return [f"nftables: table inet {name}" for name in names]
    removed = []
    for save, restore in netlock.IPTABLES_TOOLS:
        commands = netlock.iptables_release(_in(lock.namespace, [save]))
        if commands:
            _in(lock.namespace, [restore, "-w", "--noflush"], stdin=commands)
            removed += [f"{save.split('-')[0]}: {line}" for line in commands.splitlines()[1:-1]]
    return removed
