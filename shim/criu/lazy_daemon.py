"""pyshim's lazy-pages daemon: it feeds a lazily restored container the memory a page server still holds, in
place of `criu lazy-pages --page-server`.

`criu restore --lazy-pages` hands each restored process's userfaultfd to whoever listens on lazy-pages.socket in
its work directory (its pid in the checkpoint, then the fd), and says when the restore has finished. This daemon
listens there, asks the page server (CRIU's page-server protocol: shim.criu.page_protocol) for a page when a process
faults on it and for the rest in the background, and copies what comes into the processes (UFFDIO_COPY). It exits 0
once every process has every page; 1 when it cannot go on (the page server lost, a bad answer), with the reason in
its log: the shim then ends the container, whose memory can no longer all come.

Why not CRIU's own daemon: CRIU 4.2's keeps each page request as an entry of its list of ranges and recognises the
answer by the entry's start. When the process unmaps or drops (madvise) part of a range whose answer is on its way,
CRIU splits or trims that entry, so no answer ever matches what is left of it; a later fault there is taken for
one already asked for, never asked for again, and the process waits forever while the daemon spins (seen with a
shell that forks while its pages move, and made certain by dropping a page inside a range being fetched:
docs/migrate.md). Here a request is only a range of checkpoint pages in flight; an answer is copied into whatever
each process still lacks of it at that moment, and a fault is asked for again whenever nothing in flight covers it.

Run as `python -m shim.criu.lazy_daemon --images-dir DIR --work-dir DIR --log-file FILE --status-fd N
(--ps-socket FD | --address HOST --port PORT)`, as the shim does (shim.criu.restore).
"""

from __future__ import annotations

import collections
import ctypes
import errno
import os
import select
import socket
import struct
import sys
import time

from shim.criu import uffd
from shim.criu.missing_pages import PAGE_SIZE, MissingPages
from shim.criu.page_client import PageServerError, PageSource, Request

SOCKET_NAME = "lazy-pages.socket"  # in the work directory, where `criu restore` connects
RESTORE_FINISHED = 0x52535446  # what `criu restore` sends after its last process
PID = struct.Struct("=i")
FAULT_PAGES = 16  # asked for around a fault: neighbours are usually next
BACKGROUND_STEP = 64 << 10  # a background request grows by this while no process faults, as CRIU's do
BACKGROUND_MAX = 4 << 20
BACKGROUND_IN_FLIGHT = 2  # so that the link does not idle between an answer and the next request
RETRY_WAIT = 0.001  # seconds between tries of a copy refused while a process's mappings change
RETRIES = 2000
PROGRESS_EVERY = 1.0
MESSAGES = 64  # userfaultfd messages read at once


class DaemonError(Exception):
    """The daemon cannot go on: the restored processes can no longer get all their memory."""


class Process:
    """One restored process (one userfaultfd), known by the pid its pages have in the checkpoint."""

    __slots__ = ("pid", "fd", "missing", "name", "waiting", "gone")

    def __init__(self, pid: int, fd: int, missing: MissingPages, name: str) -> None:
        self.pid = pid
        self.fd = fd
        self.missing = missing
        self.name = name
        self.waiting: set[int] = set()  # pages it faulted on, not served yet
        self.gone = False


class Daemon:
    def __init__(self, lazy: dict[int, list[tuple[int, int]]], source: PageSource, listener: socket.socket,
                 log: Log) -> None:
        self.lazy = lazy  # checkpoint pid -> its lazy runs (address, pages)
        self.source = source
        self.listener = listener
        self.log = log
        self.epoll = select.epoll()
        self.restore: socket.socket | None = None
        self.registration = bytearray()
        self.passed_fds: collections.deque[int] = collections.deque()
        self.restore_finished = False
        self.processes: dict[int, Process] = {}  # by userfaultfd
        self.retries: list[tuple[Process, int, bytearray, int]] = []
        self.zero_again = False  # a zero page refused while mappings changed: _chase tries again soon, not in 1 s
        self.background_pages = BACKGROUND_STEP // PAGE_SIZE
        self.counts = collections.Counter[str]()
        self.started = time.monotonic()

    # -- the loop --------------------------------------------------------------------------------------------------

    def run(self) -> None:
        self.epoll.register(self.listener.fileno(), select.EPOLLIN)
        self.epoll.register(self.source.fileno(), select.EPOLLIN)
        last_progress = time.monotonic()
        while not self._done():
            for fd, _ in self.epoll.poll(RETRY_WAIT if self.retries or self.zero_again else PROGRESS_EVERY,
                                         MESSAGES):
                if fd == self.listener.fileno():
                    self._accept()
                elif self.restore is not None and fd == self.restore.fileno():
                    self._registrations()
                elif fd == self.source.fileno():
                    for request, vaddr, data in self.source.answers():
                        self._deliver(request, vaddr, data)
                elif (process := self.processes.get(fd)) is not None:
                    self._events(process)
            self._retry()
            self._chase()
            self._background()
            if time.monotonic() - last_progress >= PROGRESS_EVERY:
                last_progress = time.monotonic()
                self.log.write(f"progress: {self._summary()}")
        self.source.close()
        self.log.write(f"done in {time.monotonic() - self.started:.3f} s: {self._summary()}")

    def _done(self) -> bool:
        return self.restore_finished and not self.source.in_flight and \
            not self.retries and all(not process.missing for process in self.processes.values())

    def _summary(self) -> str:
        left = sum(p.missing.pages for p in self.processes.values())  # a process gone is no longer there
        counts = self.counts
        return (f"{counts['copied'] // PAGE_SIZE} pages copied, {counts['dropped'] // PAGE_SIZE} dropped or unmapped "
                f"before they came, {left} missing in {len(self.processes)} processes, "
                f"{counts['faults']} faults, {counts['zero']} zero pages, {counts['requests']} requests, "
                f"{self.source.bytes} bytes from the page server")

    # -- the restore's registrations ----------------------------------------------------------------------------------

    def _accept(self) -> None:
        connection, _ = self.listener.accept()
        self.epoll.unregister(self.listener.fileno())
        self.listener.close()
        self.restore = connection
        connection.setblocking(False)
        self.epoll.register(connection.fileno(), select.EPOLLIN)

    def _registrations(self) -> None:
        assert self.restore is not None
        try:
            data, fds, _, _ = socket.recv_fds(self.restore, 4096, 16)
        except BlockingIOError:
            return
        self.passed_fds.extend(fds)
        self.registration += data
        while len(self.registration) >= PID.size:
            pid = PID.unpack_from(self.registration)[0]
            if pid == RESTORE_FINISHED:
                del self.registration[:PID.size]
                self.restore_finished = True
                self.log.write("the restore has finished")
            elif pid <= 0:  # a zombie: nothing to serve
                del self.registration[:PID.size]
            elif len(self.registration) > PID.size and self.passed_fds:  # the fd comes with one byte of its own
                del self.registration[:PID.size + 1]
                self._register(pid, self.passed_fds.popleft())
            else:
                break
        if not data:
            self.epoll.unregister(self.restore.fileno())
            self.restore.close()
            self.restore = None
            if not self.restore_finished:
                raise DaemonError("the restore closed its connection before it finished")

    def _register(self, pid: int, fd: int) -> None:
        runs = self.lazy.get(pid)
        if runs is None:  # serving it would answer every fault with zeros
            os.close(fd)
            raise DaemonError(f"the restore registered process {pid}, which has no pagemap-{pid}.img in the images")
        process = Process(pid, fd, MissingPages(runs), f"{pid}")
        self._add(process)
        self.log.write(f"process {pid}: userfaultfd {fd}, {process.missing.pages} pages to come")
        self.log.debug(f"{pid}: " + " ".join(f"{start:#x}-{end:#x}" for start, end, _ in process.missing))

    def _add(self, process: Process) -> None:
        os.set_blocking(process.fd, False)
        self.processes[process.fd] = process
        self.epoll.register(process.fd, select.EPOLLIN)

    # -- userfaultfd events ---------------------------------------------------------------------------------------

    def _events(self, process: Process) -> None:
        try:
            data = os.read(process.fd, uffd.MESSAGE.size * MESSAGES)
        except BlockingIOError:
            return
        for message in uffd.decode(data):
            if process.gone:
                break
            self.log.debug(f"{process.name}: {message}")
            if message.event == uffd.EVENT_PAGEFAULT:
                self.counts["faults"] += 1
                process.waiting.add(message.address)
                self.background_pages = BACKGROUND_STEP // PAGE_SIZE
            elif message.event == uffd.EVENT_FORK:
                child = Process(process.pid, message.fd, process.missing.copy(), f"{process.pid}/{message.fd}")
                self._add(child)
                # Pages the parent refused while it forked are owed to the child as well.
                self.retries += [(child, vaddr, data, attempt) for retrying, vaddr, data, attempt in self.retries
                                 if retrying is process]
                self.log.debug(f"{process.name} forked: {child.name} lacks {child.missing.pages} pages")
            elif message.event == uffd.EVENT_REMAP:
                self._moved(process, message)
            elif message.event in (uffd.EVENT_REMOVE, uffd.EVENT_UNMAP):
                self._forget(process, message)

    def _moved(self, process: Process, message: uffd.Message) -> None:
        """mremap moved [start, start + length) to `to`: what the process lacked there, it lacks at `to`. A thread
        that faulted there sleeps on its old address, which no copy to the new one wakes: wake it to fault again
        (a SIGSEGV there, or with MREMAP_DONTUNMAP a zero page, as without us)."""
        process.missing.remap(message.start, message.to, message.length)
        process.waiting = {a for a in process.waiting if not message.start <= a < message.start + message.length}
        uffd.wake(process.fd, message.start, message.length)

    def _forget(self, process: Process, message: uffd.Message) -> None:
        """Pages the process dropped (madvise) or unmapped: they will not come; whoever waits there faults again
        (on the kernel's zero pages once the dropped range is no longer ours, on nothing after an unmap)."""
        self.counts["dropped"] += sum(high - low for low, high, _ in process.missing.cut(message.start, message.end))
        process.waiting = {a for a in process.waiting if not message.start <= a < message.end}
        length = message.end - message.start
        if message.event == uffd.EVENT_REMOVE:
            error = uffd.unregister(process.fd, message.start, length)
            if not error:
                return  # unregistering woke the waiters
            self.log.debug(f"{process.name}: unregister {message.start:#x}-{message.end:#x}: {os.strerror(error)}; "
                           "the range stays ours")
        # After an unmap; or the range stays ours: ENOMEM says the mm is exiting, or just as well that splitting its
        # mapping would pass vm.max_map_count, and the process lives on. Taking it for gone would close its
        # userfaultfd, and every page still missing would read as zeros. A fault there now gets a zero page.
        uffd.wake(process.fd, message.start, length)

    def _gone(self, process: Process, why: str) -> None:
        """The process exited or exec'd (why: what said so): its memory needs nothing more."""
        if process.gone:
            return
        process.gone = True
        self.log.debug(f"{process.name}: gone ({why}; {process.missing.pages} pages it no longer needs)")
        self.epoll.unregister(process.fd)
        del self.processes[process.fd]
        os.close(process.fd)

    # -- faults: served, or asked for ---------------------------------------------------------------------------------

    def _chase(self) -> None:
        """Every page a process waits on gets a zero page, or is in flight."""
        self.zero_again = False
        for process in list(self.processes.values()):
            for address in sorted(process.waiting):
                if process.gone:
                    break
                image = process.missing.image_address(address)
                if image is None:
                    self._zero(process, address)
                elif not self._in_flight(process, image):
                    self._ask(process, address, image, FAULT_PAGES, background=False)

    def _zero(self, process: Process, address: int) -> None:
        error = uffd.zeropage(process.fd, address)
        if error == errno.EAGAIN:  # its mappings change (the event that says how is read, its thread not on yet)
            self.zero_again = True
            return
        process.waiting.discard(address)
        if error == 0:
            self.counts["zero"] += 1
            self.log.debug(f"{process.name}: zero page at {address:#x}")
        elif error in (errno.EEXIST, errno.ENOENT):  # mapped meanwhile, or no longer ours: let it fault again
            uffd.wake(process.fd, address, PAGE_SIZE)
        elif error in (errno.ESRCH, errno.ENOSPC):
            self._gone(process, f"zero page at {address:#x}: {os.strerror(error)}")
        else:
            raise DaemonError(f"no zero page for process {process.name} at {address:#x}: {os.strerror(error)}")

    def _in_flight(self, process: Process, image: int) -> bool:
        """Asked for and not answered, or answered and waiting to be copied (the process's mappings changed)."""
        return self._covered_from(process, image) > 0

    def _ask(self, process: Process, address: int, image: int, most: int, *, background: bool) -> None:
        """Ask for the page at address and up to most - 1 pages after it that the process lacks, none in flight."""
        pages = 1
        while pages < most and process.missing.image_address(address + pages * PAGE_SIZE) == \
                image + pages * PAGE_SIZE and not self._in_flight(process, image + pages * PAGE_SIZE):
            pages += 1
        request = Request(process.pid, image, pages, background)
        self.source.ask(request)
        self.log.debug(f"{process.name}: asked {request} for {address:#x}")
        self.counts["requests"] += 1

    def _background(self) -> None:
        """Keep the link busy with what nobody has faulted on yet, a growing range at a time. Not before the
        restore has finished: until its restorer has put each mapping in place and registered it, a copy there
        fails (a fault, though, comes from a registered range)."""
        while self.restore_finished and sum(r.background for r in self.source.in_flight) < BACKGROUND_IN_FLIGHT:
            found = self._next_missing()
            if found is None:
                return
            process, address, image = found
            self._ask(process, address, image, self.background_pages, background=True)
            self.background_pages = min(self.background_pages + BACKGROUND_STEP // PAGE_SIZE,
                                        BACKGROUND_MAX // PAGE_SIZE)

    def _next_missing(self) -> tuple[Process, int, int] | None:
        """The first page some process lacks that is not in flight: (process, its address, checkpoint address)."""
        for process in self.processes.values():
            if process.gone:
                continue
            for start, end, image in process.missing:
                address = start
                while address < end:
                    checkpoint = image + address - start
                    covered = self._covered_from(process, checkpoint)
                    if not covered:
                        return process, address, checkpoint
                    address += covered
        return None

    def _covered_from(self, process: Process, image: int) -> int:
        """How many bytes from checkpoint address image on are on their way to process (0: that page is not). An
        answer goes to every process of its checkpoint pid (a fork's parent and child); a copy to retry, to its
        own process only (a child forked meanwhile lacks those pages too)."""
        for request in self.source.in_flight:
            if request.covers(process.pid, image):
                return request.vaddr + request.pages * PAGE_SIZE - image
        for retrying, vaddr, data, _ in self.retries:
            if retrying is process and vaddr <= image < vaddr + len(data):
                return vaddr + len(data) - image
        return 0

    # -- answers ----------------------------------------------------------------------------------------------------

    def _deliver(self, request: Request, vaddr: int, data: bytearray) -> None:
        self.log.debug(f"answered {request}: {len(data) // PAGE_SIZE} pages")
        for process in list(self.processes.values()):
            if process.pid == request.pid and not process.gone:
                self._copy(process, vaddr, data, attempt=0)

    def _copy(self, process: Process, vaddr: int, data: bytearray, attempt: int) -> None:
        """Copy the pages at checkpoint address vaddr into what the process still lacks of them."""
        buffer = (ctypes.c_char * len(data)).from_buffer(data)
        base = ctypes.addressof(buffer)
        try:
            for address, image, length in process.missing.in_image(vaddr, vaddr + len(data)):
                if process.gone:
                    return
                if not self._copy_piece(process, address, base + image - vaddr, length):
                    if not process.gone:
                        if attempt < RETRIES:
                            self.retries.append((process, vaddr, data, attempt + 1))
                        else:  # left missing: asked for again in the background, or when faulted on
                            self.log.write(f"{process.name}: a copy at {address:#x} refused {RETRIES} times")
                    return
        finally:
            del buffer

    def _copy_piece(self, process: Process, address: int, source: int, length: int) -> bool:
        """False when the process's mappings are changing (try again after reading its events)."""
        step = length
        while length > 0:
            done, error = uffd.copy(process.fd, address, source, min(step, length))
            if done:
                process.missing.cut(address, address + done)
                process.waiting.difference_update(range(address, address + done, PAGE_SIZE))
                self.counts["copied"] += done
                address, source, length = address + done, source + done, length - done
            if error == 0 or (error == errno.EAGAIN and done):
                continue
            if error == errno.EAGAIN:
                return False
            if error == errno.EEXIST:  # present already (a fork's child had it from its parent)
                process.missing.cut(address, address + PAGE_SIZE)
                process.waiting.discard(address)
                address, source, length = address + PAGE_SIZE, source + PAGE_SIZE, length - PAGE_SIZE
            elif error == errno.ENOENT and step > PAGE_SIZE:
                step = PAGE_SIZE  # the range spans mappings now (mprotect split one): a page at a time
            elif error == errno.ENOENT and not self.restore_finished:
                return False  # its mapping is not registered yet
            elif error == errno.ENOENT:  # not a mapping of ours any more
                self.log.write(f"{process.name}: the page at {address:#x} is in no mapping of ours")
                process.missing.cut(address, address + PAGE_SIZE)
                process.waiting.discard(address)
                uffd.wake(process.fd, address, PAGE_SIZE)
                address, source, length = address + PAGE_SIZE, source + PAGE_SIZE, length - PAGE_SIZE
            elif error in (errno.ESRCH, errno.ENOSPC):
                self._gone(process, f"copy at {address:#x}: {os.strerror(error)}")
                return True
            else:
                raise DaemonError(f"cannot copy pages into process {process.name} at {address:#x}: "
                                  f"{os.strerror(error)}")
        return True

    def _retry(self) -> None:
        retries, self.retries = self.retries, []
        for process, vaddr, data, attempt in retries:
            if not process.gone:
                self._copy(process, vaddr, data, attempt)


class Log:
    def __init__(self, path: str, verbose: bool) -> None:
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 - the daemon's whole life
        self.verbose = verbose
        self.started = time.monotonic()

    def write(self, line: str) -> None:
        self.file.write(f"({time.monotonic() - self.started:10.6f}) {line}\n")

    def debug(self, line: str) -> None:
        if self.verbose:
            self.write(line)


def lazy_runs(images: str) -> dict[int, list[tuple[int, int]]]:
    """checkpoint pid -> the runs of pages its pagemap leaves to the lazy-pages daemon (PE_LAZY: in the images'
    pages file or not, `criu restore --lazy-pages` leaves them out)."""
    from shim.criu.lazy_images import PE_LAZY, read_pagemap, task_pagemaps

    runs = {}
    for pid, name in task_pagemaps(images).items():
        runs[pid] = [(entry.vaddr, entry.pages) for entry in read_pagemap(os.path.join(images, name)).entries
                     if entry.effective_flags & PE_LAZY]
    return runs


OPTIONS = {"--images-dir": str, "--work-dir": str, "--log-file": str, "--status-fd": int, "--ps-socket": int,
           "--address": str, "--port": int}
USAGE = ("usage: python -m shim.criu.lazy_daemon --images-dir DIR --work-dir DIR --log-file FILE [--status-fd N] "
         "(--ps-socket FD | --address HOST --port PORT) [--verbose]")


class Arguments:
    """The command line, parsed by hand: argparse would add ~8 ms to every lazy restore's start."""

    def __init__(self, argv: list[str]) -> None:
        values: dict[str, object] = {"--status-fd": -1, "--ps-socket": -1, "--address": "", "--port": 0}
        self.verbose = "--verbose" in argv
        words = [word for word in argv if word != "--verbose"]
        if len(words) % 2:
            raise SystemExit(USAGE)
        for option, value in zip(words[::2], words[1::2], strict=True):
            if option not in OPTIONS:
                raise SystemExit(f"unknown option {option}\n{USAGE}")
            try:
                values[option] = OPTIONS[option](value)
            except ValueError:
                raise SystemExit(f"{option} {value}: not a number\n{USAGE}") from None
        missing = [name for name in ("--images-dir", "--work-dir", "--log-file") if name not in values]
        if missing or (values["--ps-socket"] == -1) == (not values["--address"]):
            raise SystemExit(USAGE)
        self.images_dir = str(values["--images-dir"])
        self.work_dir = str(values["--work-dir"])
        self.log_file = str(values["--log-file"])
        self.status_fd = int(values["--status-fd"])  # type: ignore[call-overload]
        self.ps_socket = int(values["--ps-socket"])  # type: ignore[call-overload]
        self.address = str(values["--address"])
        self.port = int(values["--port"])  # type: ignore[call-overload]


def main(argv: list[str] | None = None) -> int:
    args = Arguments(sys.argv[1:] if argv is None else argv)
    log = Log(args.log_file, args.verbose)
    try:
        if args.ps_socket >= 0:
            source = PageSource(socket.socket(fileno=args.ps_socket), force_close=True)
        else:
            source = PageSource(socket.create_connection((args.address, args.port), timeout=10), force_close=False)
            source.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        os.chdir(args.work_dir)  # a relative name: the work directory's path may not fit a socket address
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.unlink(SOCKET_NAME)
        except FileNotFoundError:
            pass
        listener.bind(SOCKET_NAME)
        listener.listen(1)
        if args.status_fd >= 0:  # the restore waits for this before it starts: the images are read after
            os.write(args.status_fd, b"\0")
            os.close(args.status_fd)
        lazy = lazy_runs(args.images_dir)
        log.write(f"pyshim lazy-pages daemon (pid {os.getpid()}): {sum(p for r in lazy.values() for _, p in r)} "
                  f"pages of {len(lazy)} processes in {args.images_dir}")
        Daemon(lazy, source, listener, log).run()
    except (DaemonError, PageServerError, OSError, ValueError) as exc:
        log.write(f"Error: {exc}")
        return 1
    except Exception:  # noqa: BLE001 - a bug: its traceback in the log the shim quotes
        import traceback

        log.write("Error: " + traceback.format_exc())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
