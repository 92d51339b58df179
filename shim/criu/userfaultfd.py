"""Holding a lazy restore's userfaultfds, so that a lazy-pages daemon that dies cannot leave zeros in place of
memory.

After a lazy restore the only holder of each restored process's userfaultfd is the lazy-pages daemon (CRIU's or
pyshim's: shim.criu.lazy_daemon). When
it dies, the kernel releases the userfaultfds, unregisters their ranges, and every page not served yet becomes an
ordinary missing page: the next touch maps a zero page and the process runs on with zeros where its memory was
(seen here: a restored python, its page server killed, segfaulted reading a NULL from its zeroed heap). The shim
therefore takes its own reference to each of the daemon's userfaultfds (pidfd_getfd, as root): while it holds them,
a fault the daemon no longer answers waits, killably, until the shim has killed the container; then they are
let go. Taken again periodically: the daemon gets a new one for each process the restored ones fork.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform

log = logging.getLogger(__name__)
USERFAULTFD_LINK = "anon_inode:[userfaultfd]"
KCMP_FILE = 0
SYSCALLS = {"x86_64": {"pidfd_getfd": 438, "kcmp": 312}, "aarch64": {"pidfd_getfd": 438, "kcmp": 272}}


def supported() -> bool:
    return platform.machine() in SYSCALLS


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _syscall(name: str, *args: int) -> int:
    result = _libc().syscall(SYSCALLS[platform.machine()][name], *(ctypes.c_long(arg) for arg in args))
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return result


def userfaultfds(pid: int) -> list[int]:
    """The fd numbers in pid that are userfaultfds."""
    found = []
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    for name in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == USERFAULTFD_LINK:
                found.append(int(name))
        except OSError:
            continue  # closed meanwhile
    return found


class UserfaultfdHold:
    """Our references to the userfaultfds of one daemon (its pidfd given)."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.held: dict[int, int] = {}  # the daemon's fd number -> ours
        self.replaced: list[int] = []  # ours, of userfaultfds the daemon has closed since
        self.enabled = supported()
        if not self.enabled:
            log.warning("userfaultfds of the lazy-pages daemon (pid %d) not held: no pidfd_getfd number known for %s",
                        pid, platform.machine())

    def take(self) -> int:
        """Take a reference to every userfaultfd of the daemon not held yet; how many are held."""
        if not self.enabled:
            return 0
        for number in userfaultfds(self.pid):
            ours = self.held.get(number)
            if ours is not None and self._same(number, ours):
                continue
            try:
                taken = _syscall("pidfd_getfd", self.pidfd, number, 0)
            except OSError as exc:  # the daemon closed it meanwhile, or exited
                log.debug("userfaultfd %d of pid %d not taken: %s", number, self.pid, exc)
                continue
            os.set_inheritable(taken, False)  # pidfd_getfd sets close-on-exec; said again for clarity
            if ours is not None:
                # The daemon's fd number now names another userfaultfd (it closed the old one): keep the old one
                # too, its process may still be waiting on it.
                self.replaced.append(ours)
            self.held[number] = taken
        return len(self.held) + len(self.replaced)

    def _same(self, number: int, ours: int) -> bool:
        try:
            return _syscall("kcmp", self.pid, os.getpid(), KCMP_FILE, number, ours) == 0
        except OSError:
            return True  # cannot tell: keep what is held rather than take it again on every pass

    def release(self) -> None:
        for fd in [*self.held.values(), *self.replaced]:
            try:
                os.close(fd)
            except OSError:
                pass
        self.held.clear()
        self.replaced.clear()
