"""Routing process exits to the processes they belong to.

An exit can arrive while the process it belongs to is still being started (runc start has
not returned, the pid is not yet known to be ours). Such exits are held in a start window
and handled once the start has been announced, so containerd always sees a process's
start event before its exit event.
"""

from __future__ import annotations

from collections import defaultdict

from shim.children.reaper import Exit
from shim.process.base import Process
from shim.process.container import Container

Owner = tuple[Container, Process]


class StartWindow:
    def __init__(self, router: ExitRouter) -> None:
        self.router = router
        self.exits: dict[int, list[Exit]] = defaultdict(list)

    def started(self, container: Container, process: Process | None) -> list[Exit]:
        """Close the window; the exits of `process` seen meanwhile, to be handled now.

        With no such exit, the process is registered so that its future exit is routed."""
        self.close()
        pid = process.pid if process is not None else 0
        early = self.exits.get(pid, [])
        if process is not None and pid and not early:
            self.router.running[pid].append((container, process))
        return early if process is not None else []

    def close(self) -> None:
        self.router.windows.discard(self)


class ExitRouter:
    def __init__(self) -> None:
        self.running: dict[int, list[Owner]] = defaultdict(list)
        self.windows: set[StartWindow] = set()

    def open_window(self, restarting: Container | None = None) -> StartWindow:
        """Begin starting a process. For an already created init, its exit counts as early again."""
        if restarting is not None:
            pid = restarting.init.pid
            owners = [o for o in self.running.get(pid, []) if o[0] is not restarting]
            if owners:
                self.running[pid] = owners
            else:
                self.running.pop(pid, None)
        window = StartWindow(self)
        self.windows.add(window)
        return window

    def route(self, exit: Exit) -> list[Owner]:
        for window in self.windows:
            window.exits[exit.pid].append(exit)
        return self.running.pop(exit.pid, [])
