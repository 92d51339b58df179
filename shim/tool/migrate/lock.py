"""CRIU's network lock on the source, removed by this command once the destination runs.

The dump asks the shim to keep the lock past the task's Delete (keep-network-lock): until the destination's task
runs, a rollback must be able to restore the container here with no packet having reached its (repair-mode, then
closed) sockets in between. Once the destination runs, no restore will come into the source's namespace, and the
lock goes: the rules the dump added (shim.criu.netlock says which are the dump's), removed as the shim removes them.
"""

from __future__ import annotations

import asyncio

from shim.criu import netlock


def release(record: dict | None) -> list[str]:
    """Remove the lock a dump recorded (its pyshim record's network.lock); what was removed, as readable lines.
    The shim's own removal (shim.criu.netlock.release), with the tools run as plain child processes; a namespace
    that is gone, or is another one now, is left alone. Failures are OSErrors."""
    lock = netlock.Lock.from_record(record)
    if lock is None or not lock.namespace:
        return []
    try:
        return asyncio.run(netlock.release(netlock.CommandFirewall(), lock))
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - netlink's errors (pyroute2) said as the callers expect them
        raise OSError(f"removing CRIU's {lock.method} network lock in {lock.namespace}: {exc}") from exc
