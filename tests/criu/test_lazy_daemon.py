"""pyshim's lazy-pages daemon (shim.criu.lazy_daemon) feeding real processes through real userfaultfds: a child
(uffd_child.py) registers its memory in user mode, as an unprivileged process may, and hands the fd over as `criu
restore --lazy-pages` does (itself, or through the test playing the restore); a page server in this test answers
the daemon in CRIU's protocol, holding answers back, answering wrongly or cutting the session where a test says.
Every wait is bounded: a daemon that wedges fails its test, it does not hang it."""

import hashlib
import os
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from shim.criu import lazy_images
from shim.criu import page_protocol as protocol
from shim.criu.lazy_daemon import RESTORE_FINISHED, SOCKET_NAME
from shim.criu.lazy_images import PE_LAZY, PagemapEntry
from shim.criu.missing_pages import PAGE_SIZE, MissingPages

from .test_lazy_images import MAGICS, message

CHILD = Path(__file__).with_name("uffd_child.py")
REPO = Path(__file__).resolve().parents[2]
PAGES = 64
PID = 1  # the process's pid in the "checkpoint"
WAIT = 20.0


def content(page: int, pid: int = PID) -> bytes:
    return bytes([(page + 97 * (pid - 1)) % 250 + 1]) * PAGE_SIZE


def expected_sum(pid: int = PID, *, dropped=frozenset(), unmapped=frozenset()) -> str:
    """What the child's `sum` prints once every page it keeps has come."""
    return hashlib.sha256(b"".join(bytes(PAGE_SIZE) if n in dropped else content(n, pid)
                                   for n in range(PAGES) if n not in unmapped)).hexdigest()


def write_pagemap(images: Path, pid: int, base: int) -> None:
    """pagemap-PID.img with the PAGES pages at base lazy, as lazy_images.split leaves them."""
    entry = lazy_images.encode_entry(PagemapEntry(base, 0, None, PE_LAZY, PAGES))
    (images / f"pagemap-{pid}.img").write_bytes(MAGICS + message(bytes.fromhex("0801")) + message(entry))


class PageServer(threading.Thread):
    """Answers GETs with content(page, pid) in order; holds them back while `hold` is set; answers at most `most`
    pages a request; hangs up after `cut_after` answers; `lie` ("vaddr" or "more") answers the first GET wrongly."""

    def __init__(self, sock: socket.socket, bases: dict[int, int], *, most: int = 1 << 20, cut_after: int = -1,
                 lie: str = "") -> None:
        super().__init__(daemon=True)
        self.sock, self.bases, self.most, self.cut_after, self.lie = sock, bases, most, cut_after, lie
        self.hold = threading.Event()
        self.asked = queue.Queue[protocol.Request]()
        self.closed = False

    def run(self) -> None:
        try:
            self._serve()
        except OSError:  # the daemon is gone (it gave up, or the test ended it): nothing more to answer
            pass

    def _serve(self) -> None:
        reader = protocol.RequestReader()
        answered = 0
        with self.sock:
            while data := self.sock.recv(4096):
                for request in reader.feed(data):
                    if request.command in (protocol.PS_IOV_CLOSE, protocol.PS_IOV_FORCE_CLOSE):
                        self.sock.sendall(protocol.close_answer(0))
                        self.closed = True
                        return
                    self.asked.put(request)
                    for _ in range(int(WAIT * 100)):  # bounded: a test that never releases fails, not hangs
                        if not self.hold.is_set():
                            break
                        time.sleep(0.01)
                    if answered == self.cut_after:
                        return
                    self.sock.sendall(self.answer(request))
                    answered += 1

    def answer(self, request: protocol.Request) -> bytes:
        vaddr, count = request.vaddr, min(request.nr_pages, self.most)
        if self.lie == "vaddr":
            vaddr += PAGE_SIZE
        elif self.lie == "more":
            count = request.nr_pages + 1
        first = (vaddr - self.bases[request.pid]) // PAGE_SIZE
        header = protocol.pages_answer(request._replace(vaddr=vaddr), count)
        return header + b"".join(content(first + n, request.pid) for n in range(count))


class Child:
    """One uffd_child.py; its lines are read by a thread, so that every wait for one is bounded."""

    def __init__(self) -> None:
        self.handover, theirs = socket.socketpair()
        self.process = subprocess.Popen([sys.executable, str(CHILD), str(PAGES), str(theirs.fileno())],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        pass_fds=(theirs.fileno(),))
        theirs.close()
        self.lines = queue.Queue[str | None]()
        threading.Thread(target=self._read, daemon=True).start()
        said = self.line().split()
        if said[0] != "ready":
            self.close()
            pytest.skip(f"a user-mode userfaultfd is refused here (errno {said[1:]})")
        self.base = int(said[1])

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def line(self) -> str:
        try:
            line = self.lines.get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError(f"the child said nothing for {WAIT:g} s (stuck in a page fault?)") from None
        assert line is not None, f"the child exited with {self.process.wait()}"
        return line

    def ask(self, line: str) -> str:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return self.line()

    def userfaultfd(self) -> int:
        """Take the child's userfaultfd (it keeps none), as a restore's CRIU would have it to send."""
        self.handover.settimeout(WAIT)
        self.process.stdin.write("handover\n")
        self.process.stdin.flush()
        _, fds, _, _ = socket.recv_fds(self.handover, 1, 1)
        assert self.line() == "handed over" and len(fds) == 1
        return fds[0]

    def address(self, page: int) -> int:
        return self.base + page * PAGE_SIZE

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.handover.close()


class Restore:
    """The test playing `criu restore --lazy-pages`: one connection to the daemon, every process sent over it."""

    def __init__(self, work: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(work / SOCKET_NAME))

    def register(self, pid: int, fd: int) -> None:
        self.sock.sendall(struct.pack("=i", pid))
        socket.send_fds(self.sock, [b"\0"], [fd])
        os.close(fd)  # the daemon's alone: a copy here would keep the userfaultfd alive after the daemon

    def zombie(self, pid: int) -> None:
        self.sock.sendall(struct.pack("=i", -pid))

    def finish(self) -> None:
        self.sock.sendall(struct.pack("=I", RESTORE_FINISHED))
        self.sock.close()


class Lab:
    """Children (one per checkpoint pid), the images that say their pages are lazy, a page server, the daemon."""

    def __init__(self, tmp_path: Path, pids: tuple[int, ...] = (PID,), **server) -> None:
        self.children: dict[int, Child] = {}
        self.daemon: subprocess.Popen | None = None
        for pid in pids:
            self.children[pid] = Child()
        self.child = self.children[pids[0]]
        self.images = tmp_path / "images"
        self.images.mkdir()
        for pid, child in self.children.items():
            write_pagemap(self.images, pid, child.base)
        self.work = tmp_path / "work"
        self.work.mkdir()
        self.log = tmp_path / "lazy.log"
        ours, theirs = socket.socketpair()
        self.server = PageServer(ours, {pid: child.base for pid, child in self.children.items()}, **server)
        ready, status = os.pipe()
        self.daemon = subprocess.Popen(
            [sys.executable, "-m", "shim.criu.lazy_daemon", "--images-dir", str(self.images), "--work-dir",
             str(self.work), "--log-file", str(self.log), "--status-fd", str(status), "--ps-socket",
             str(theirs.fileno()), "--verbose"], pass_fds=(status, theirs.fileno()), cwd=REPO)
        os.close(status)
        theirs.close()
        with os.fdopen(ready, "rb") as f:
            assert f.read(1) == b"\0", self.log.read_text()

    def start(self, *, hold: bool = False) -> None:
        """The single child registers itself and says the restore has finished, as CRIU's restore does."""
        self.serve(hold=hold)
        assert self.child.ask(f"register {self.work} {PID}") == "registered"
        assert self.child.ask("finish") == "finished"

    def serve(self, *, hold: bool = False) -> None:
        if hold:
            self.server.hold.set()
        self.server.start()

    def exit_status(self) -> int:
        assert self.daemon is not None
        try:
            return self.daemon.wait(WAIT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the daemon is still running after {WAIT:g} s:\n{self.log.read_text()}") from None

    def wait_in_log(self, text: str) -> None:
        """Until the daemon's log says text (it has read an event, say)."""
        deadline = time.monotonic() + WAIT
        while text not in self.log.read_text():
            assert time.monotonic() < deadline, f"{text!r} not in the log after {WAIT:g} s:\n{self.log.read_text()}"
            time.sleep(0.01)

    def close(self) -> None:
        for child in self.children.values():
            child.close()
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.kill()
            self.daemon.wait()


@pytest.fixture
def lab(tmp_path):
    made = []

    def make(**options) -> Lab:
        made.append(Lab(tmp_path, **options))
        return made[-1]

    yield make
    for each in made:
        each.close()


def first_held_request(lab: Lab) -> tuple[int, int]:
    """The first request the page server holds back: (its first page's number, pages)."""
    request = lab.server.asked.get(timeout=WAIT)
    return (request.vaddr - lab.child.base) // PAGE_SIZE, request.nr_pages


def waiting_through(lab: Lab, page: int, command: str) -> set[str]:
    """A thread of the child faults on page and sleeps there; then command: the child's next two lines (the
    command's answer, and the thread's once it reads the page)."""
    assert lab.child.ask(f"wait {page}") == "waiting"
    lab.wait_in_log(f"PAGEFAULT {lab.child.address(page):#x}")  # the thread sleeps in its fault
    lab.child.process.stdin.write(command + "\n")
    lab.child.process.stdin.flush()
    return {lab.child.line(), lab.child.line()}


def ends_whole(lab: Lab, *, dropped: set[int] | frozenset[int] = frozenset(), copied: int | None = None) -> None:
    """Every page the child keeps holds its content (the dropped ones zero), the daemon exits 0, and with copied:
    its last line counts that many pages copied, the dropped ones before they came, none missing."""
    assert lab.child.ask("sum") == expected_sum(dropped=set(dropped))
    assert lab.exit_status() == 0, lab.log.read_text()
    if copied is not None:
        assert f"{copied} pages copied, {len(dropped)} dropped or unmapped before they came, 0 missing" in \
            lab.log.read_text()


def held(make, *, at_least: int) -> tuple[Lab, int]:
    """A started lab whose page server holds every answer back, and the first page of its first request (a
    background one, at least at_least pages long)."""
    lab = make()
    lab.start(hold=True)
    first, pages = first_held_request(lab)
    assert pages >= at_least, pages
    return lab, first


def test_faults_and_background_bring_every_page_and_the_daemon_ends(lab):
    lab = lab(most=3)  # short answers: the daemon asks again for the rest
    lab.start()
    for page in (40, 3, 63, 0, 17):
        assert lab.child.ask(f"read {page}") == str(content(page)[0])
    ends_whole(lab)
    log = lab.log.read_text()
    assert f"{PAGES} pages copied, 0 dropped or unmapped before they came, 0 missing" in log, log
    assert lab.server.closed


def test_a_page_dropped_while_its_range_is_on_the_way_leaves_no_page_stuck(lab):
    # CRIU 4.2's daemon wedges here: it splits its request entry at the dropped page, no answer matches the rest,
    # and a fault there is never asked for again.
    lab, first = held(lab, at_least=4)  # a background request, answers held back
    dropped = first + 2
    assert lab.child.ask(f"drop {dropped} 1") == "dropped"  # returns once the daemon has read the REMOVE event
    lab.server.hold.clear()
    assert lab.child.ask(f"read {dropped + 1}") == str(content(dropped + 1)[0])
    ends_whole(lab, dropped={dropped}, copied=PAGES - 1)


def test_a_thread_waiting_on_a_page_dropped_meanwhile_is_woken_and_reads_zeros(lab):
    lab, first = held(lab, at_least=7)
    waited = first + 5
    # Both, in either order, while every answer is still held back: the waiter did not wait for its page.
    assert waiting_through(lab, waited, f"drop {waited} 1") == {"dropped", f"page {waited}: 0"}
    lab.server.hold.clear()
    ends_whole(lab, dropped={waited})


def test_a_drop_whose_range_cannot_be_unregistered_leaves_the_process_served(lab):
    # At vm.max_map_count, unregistering a dropped page (a split of its mapping) fails with ENOMEM, as it does for
    # a process that exits: the daemon must not take a live process for gone (its userfaultfd closed, every page
    # still missing would read as zeros).
    limit = int(Path("/proc/sys/vm/max_map_count").read_text())
    if limit > 100_000:
        pytest.skip(f"vm.max_map_count is {limit}: too many mappings to make in a unit test (65530 is the default)")
    lab, first = held(lab, at_least=4)
    dropped = first + 2
    assert lab.child.ask("crowd").startswith("crowded ")
    assert lab.child.ask(f"drop {dropped} 1") == "dropped"
    lab.wait_in_log(f"unregister {lab.child.address(dropped):#x}-{lab.child.address(dropped + 1):#x}: Cannot "
                    "allocate memory; the range stays ours")
    lab.server.hold.clear()
    assert lab.child.ask(f"read {dropped}") == "0"  # a zero page from the daemon: the range is still registered
    ends_whole(lab, dropped={dropped}, copied=PAGES - 1)


def test_pages_moved_by_mremap_while_on_the_way_land_at_their_new_address(lab):
    lab, first = held(lab, at_least=8)
    assert lab.child.ask(f"move {first + 4} 4") == "moved"  # returns once the daemon has read the REMAP event
    lab.server.hold.clear()
    assert lab.child.ask(f"read {first + 5}") == str(content(first + 5)[0])
    ends_whole(lab, copied=PAGES)  # every page, the moved ones read where they are now


def test_a_thread_waiting_on_a_page_moved_away_is_woken(lab):
    # MREMAP_DONTUNMAP leaves the old place mapped and empty: the waiter, woken, faults again there and reads zeros.
    lab, first = held(lab, at_least=8)
    waited = first + 5
    assert waiting_through(lab, waited, f"move {first + 4} 4 dontunmap") == {"moved", f"page {waited}: 0"}
    lab.server.hold.clear()
    ends_whole(lab)  # the moved pages came to their new place


def test_pages_unmapped_while_on_the_way_leave_the_rest_intact(lab):
    lab, first = held(lab, at_least=8)
    unmapped = set(range(first + 2, first + 6))
    assert lab.child.ask(f"unmap {first + 2} 4") == "unmapped"
    lab.server.hold.clear()
    assert lab.child.ask("sum") == expected_sum(unmapped=unmapped)
    assert lab.exit_status() == 0, lab.log.read_text()
    assert f"{PAGES - 4} pages copied, 4 dropped or unmapped before they came, 0 missing" in lab.log.read_text()


def test_pages_on_the_way_to_a_mapping_split_by_mprotect_come_a_page_at_a_time(lab):
    # One copy may not span two mappings (ENOENT): the daemon copies that answer a page at a time.
    lab, first = held(lab, at_least=8)
    assert lab.child.ask(f"protect {first + 3} 2") == "protected"
    lab.server.hold.clear()
    ends_whole(lab, copied=PAGES)


def test_a_process_that_exits_before_its_pages_came_is_let_go(lab):
    lab = lab()
    lab.start(hold=True)
    first_held_request(lab)
    lab.child.process.kill()
    assert lab.child.process.wait(WAIT) == -9
    lab.server.hold.clear()
    assert lab.exit_status() == 0, lab.log.read_text()
    log = lab.log.read_text()
    assert f"{PID}: gone (copy at " in log and ": No such process;" in log and "0 missing in 0 processes" in log, log


def test_two_processes_of_the_checkpoint_each_get_their_own_pages(lab):
    lab = lab(pids=(1, 2))
    lab.serve()
    restore = Restore(lab.work)
    for pid, child in lab.children.items():
        restore.register(pid, child.userfaultfd())
    restore.finish()
    one, two = lab.children[1], lab.children[2]
    assert one.ask("read 7") == str(content(7, 1)[0]) and two.ask("read 7") == str(content(7, 2)[0])
    assert content(7, 1) != content(7, 2)
    assert one.ask("sum") == expected_sum(1) and two.ask("sum") == expected_sum(2)
    assert lab.exit_status() == 0, lab.log.read_text()
    assert f"{2 * PAGES} pages copied, 0 dropped or unmapped before they came, 0 missing" in lab.log.read_text()


def test_a_zombie_registration_is_ignored(lab):
    lab = lab()
    lab.serve()
    restore = Restore(lab.work)
    restore.zombie(7)  # CRIU sends a zombie's pid negated, and no fd
    restore.register(PID, lab.child.userfaultfd())
    restore.zombie(8)
    restore.finish()
    ends_whole(lab)
    log = lab.log.read_text()
    assert f"process {PID}: userfaultfd" in log and "process -" not in log and "process 7" not in log, log


def test_a_process_the_images_do_not_know_ends_the_daemon(lab):
    lab = lab()
    lab.serve()
    restore = Restore(lab.work)
    restore.register(PID + 1, lab.child.userfaultfd())
    assert lab.exit_status() == 1
    assert f"Error: the restore registered process {PID + 1}, which has no pagemap-{PID + 1}.img" in \
        lab.log.read_text()


@pytest.mark.parametrize("lie", ["vaddr", "more"])
def test_a_page_server_answering_what_was_not_asked_ends_the_daemon(lab, lie):
    lab = lab(lie=lie)
    lab.start()
    assert lab.exit_status() == 1
    error = [line for line in lab.log.read_text().splitlines() if "Error:" in line]
    assert len(error) == 1 and "the page server answered ADD_F" in error[0] and "to a request for" in error[0], error


def test_a_lost_page_server_ends_the_daemon_with_the_reason(lab):
    lab = lab(cut_after=1)
    lab.start()
    assert lab.exit_status() == 1
    assert "Error: the page server closed the connection" in lab.log.read_text()


def test_a_restore_that_hangs_up_before_it_finished_ends_the_daemon(lab):
    lab = lab()
    lab.serve()
    restore = Restore(lab.work)
    restore.register(PID, lab.child.userfaultfd())
    restore.sock.close()  # CRIU died (or failed) before its last process
    assert lab.exit_status() == 1
    assert "Error: the restore closed its connection before it finished" in lab.log.read_text()


def test_missing_pages_follow_drops_remaps_and_forks():
    missing = MissingPages([(0x10000, 4), (0x20000, 2)])
    assert missing.pages == 6 and missing.image_address(0x11000) == 0x11000
    assert missing.cut(0x11000, 0x12000) == [(0x11000, 0x12000, 0x11000)]
    assert list(missing) == [(0x10000, 0x11000, 0x10000), (0x12000, 0x14000, 0x12000), (0x20000, 0x22000, 0x20000)]
    child = missing.copy()
    missing.remap(0x12000, 0x90000, 0x2000)  # mremap: the pages are still where the checkpoint has them
    assert missing.image_address(0x91000) == 0x13000 and missing.image_address(0x13000) is None
    assert missing.in_image(0x13000, 0x21000) == [(0x20000, 0x20000, 0x1000), (0x91000, 0x13000, 0x1000)]
    assert child.image_address(0x13000) == 0x13000 and child.pages == 5 == missing.pages
