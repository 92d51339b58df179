"""pyshim's lazy-pages daemon (shim.criu.lazy_daemon) feeding a real process through a real userfaultfd: a child
(uffd_child.py) registers its memory in user mode, as an unprivileged process may, and hands the fd over as `criu
restore --lazy-pages` does; a page server in this test answers the daemon in CRIU's protocol, holding answers back
or cutting the session where a test says."""

import hashlib
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from shim.criu import page_protocol as protocol
from shim.criu.lazy_images import PE_LAZY
from shim.criu.missing_pages import PAGE_SIZE, MissingPages

from .test_lazy_images import write_images

CHILD = Path(__file__).with_name("uffd_child.py")
PAGES = 64
PID = 1  # the process's pid in the "checkpoint"
WAIT = 20.0


def content(page: int) -> bytes:
    return bytes([page % 250 + 1]) * PAGE_SIZE


class PageServer(threading.Thread):
    """Answers GETs with content(page) in order; holds them back while `hold` is set; answers at most `most` pages
    a request; hangs up after `cut_after` answers."""

    def __init__(self, sock: socket.socket, base: int, *, most: int = 1 << 20, cut_after: int = -1) -> None:
        super().__init__(daemon=True)
        self.sock, self.base, self.most, self.cut_after = sock, base, most, cut_after
        self.hold = threading.Event()
        self.requests: list[protocol.Request] = []
        self.asked = queue.Queue[protocol.Request]()
        self.closed = False

    def run(self) -> None:
        reader = protocol.RequestReader()
        answered = 0
        with self.sock:
            while data := self.sock.recv(4096):
                for request in reader.feed(data):
                    if request.command in (protocol.PS_IOV_CLOSE, protocol.PS_IOV_FORCE_CLOSE):
                        self.sock.sendall(protocol.close_answer(0))
                        self.closed = True
                        return
                    self.requests.append(request)
                    self.asked.put(request)
                    for _ in range(int(WAIT * 100)):  # bounded: a test that never releases fails, not hangs
                        if not self.hold.is_set():
                            break
                        time.sleep(0.01)
                    if answered == self.cut_after:
                        return
                    first = (request.vaddr - self.base) // PAGE_SIZE
                    count = min(request.nr_pages, self.most)
                    self.sock.sendall(protocol.pages_answer(request, count)
                                      + b"".join(content(first + n) for n in range(count)))
                    answered += 1


class Lab:
    def __init__(self, tmp_path: Path, **server) -> None:
        self.child = subprocess.Popen([sys.executable, str(CHILD), str(PAGES)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
        said = self.child.stdout.readline().split()
        if said[0] != "ready":
            self.close()
            pytest.skip(f"a user-mode userfaultfd is refused here (errno {said[1:]})")
        self.base = int(said[1])
        self.images = tmp_path / "images"
        write_images(self.images, [(self.base, PAGES, PE_LAZY)])
        self.work = tmp_path / "work"
        self.work.mkdir()
        self.log = tmp_path / "lazy.log"
        ours, theirs = socket.socketpair()
        self.server = PageServer(ours, self.base, **server)
        ready, status = os.pipe()
        self.daemon = subprocess.Popen(
            [sys.executable, "-m", "shim.criu.lazy_daemon", "--images-dir", str(self.images), "--work-dir",
             str(self.work), "--log-file", str(self.log), "--status-fd", str(status), "--ps-socket",
             str(theirs.fileno()), "--verbose"], pass_fds=(status, theirs.fileno()),
            cwd=Path(__file__).resolve().parents[2])
        os.close(status)
        theirs.close()
        with os.fdopen(ready, "rb") as f:
            assert f.read(1) == b"\0", self.log.read_text()

    def start(self, *, hold: bool = False) -> None:
        if hold:
            self.server.hold.set()
        self.server.start()
        assert self.ask(f"register {self.work} {PID}") == "registered"
        assert self.ask("finish") == "finished"

    def ask(self, line: str) -> str:
        self.child.stdin.write(line + "\n")
        self.child.stdin.flush()
        return self.child.stdout.readline().strip()

    def expected_sum(self, dropped: set[int] = frozenset()) -> str:
        return hashlib.sha256(b"".join(bytes(PAGE_SIZE) if n in dropped else content(n)
                                       for n in range(PAGES))).hexdigest()

    def close(self) -> None:
        for process in (self.child, getattr(self, "daemon", None)):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture
def lab(tmp_path):
    made = []

    def make(**server) -> Lab:
        made.append(Lab(tmp_path, **server))
        return made[-1]

    yield make
    for each in made:
        each.close()


def test_faults_and_background_bring_every_page_and_the_daemon_ends(lab):
    lab = lab(most=3)  # short answers: the daemon asks again for the rest
    lab.start()
    for page in (40, 3, 63, 0, 17):
        assert lab.ask(f"read {page}") == str(content(page)[0])
    assert lab.ask("sum") == lab.expected_sum()
    assert lab.daemon.wait(WAIT) == 0, lab.log.read_text()
    log = lab.log.read_text()
    assert f"{PAGES} pages copied, 0 dropped or unmapped before they came, 0 missing" in log, log
    assert lab.server.closed


def test_a_page_dropped_while_its_range_is_on_the_way_leaves_no_page_stuck(lab):
    # CRIU 4.2's daemon wedges here: it splits its request entry at the dropped page, no answer matches the rest,
    # and a fault there is never asked for again.
    lab = lab()
    lab.start(hold=True)
    first = lab.server.asked.get(timeout=WAIT)  # a background request, answers held back
    dropped = first.vaddr // PAGE_SIZE - lab.base // PAGE_SIZE + 2
    assert first.nr_pages > 3, first
    assert lab.ask(f"drop {dropped} 1") == "dropped"  # returns once the daemon has read the REMOVE event
    lab.server.hold.clear()
    assert lab.ask(f"read {dropped + 1}") == str(content(dropped + 1)[0])
    assert lab.ask("sum") == lab.expected_sum({dropped})
    assert lab.daemon.wait(WAIT) == 0, lab.log.read_text()
    assert f"{PAGES - 1} pages copied, 1 dropped or unmapped before they came, 0 missing" in lab.log.read_text()


def test_a_lost_page_server_ends_the_daemon_with_the_reason(lab):
    lab = lab(cut_after=1)
    lab.start()
    lab.daemon.wait(WAIT)
    assert lab.daemon.returncode == 1
    assert "Error: the page server closed the connection" in lab.log.read_text()


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
