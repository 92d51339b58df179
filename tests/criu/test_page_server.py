"""pyshim's page server in sessions with a client speaking as `criu lazy-pages` does (CRIU's wire format)."""

import asyncio
import json
import os
import socket
import subprocess
import sys

from shim.criu import page_protocol as protocol
from shim.criu.lazy_images import PAGE_SIZE, PE_LAZY, PE_PRESENT, LazyPages
from shim.criu.page_server import PageServer

from .helpers import run
from .test_lazy_images import ENTRIES, write_images


def get(pid: int, vaddr: int, nr_pages: int) -> bytes:
    return protocol.encode_header(protocol.PS_IOV_GET, nr_pages=nr_pages, vaddr=vaddr, dst_id=pid)


def receive(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "the page server closed early"
        data += chunk
    return data


def session(pages: LazyPages, client) -> tuple:
    ours, theirs = socket.socketpair()
    reports: list[dict] = []

    async def scenario():
        served = asyncio.ensure_future(PageServer(pages, report=reports.append).serve(ours))
        result = await asyncio.to_thread(client, theirs)
        return await served, result

    try:
        outcome, result = run(scenario())
    finally:
        ours.close()
        theirs.close()
    return outcome, result, reports


def test_every_page_asked_for_then_close_is_a_complete_session(tmp_path):
    contents = write_images(tmp_path / "src", ENTRIES)
    pages = LazyPages.load(str(tmp_path / "src"))

    def client(sock):
        sock.sendall(get(1, 0x10000000 + PAGE_SIZE, 1))  # a fault: one page
        header = protocol.decode_header(receive(sock, 32))
        first = receive(sock, PAGE_SIZE)
        sock.sendall(get(1, 0x10000000, 8) + get(1, 0x30000000, 2))  # background transfer, more than the run has
        answers = []
        for _ in range(2):
            answer = protocol.decode_header(receive(sock, 32))
            answers.append((answer, receive(sock, answer.nr_pages * PAGE_SIZE)))
        sock.sendall(protocol.encode_header(protocol.PS_IOV_CLOSE))
        status = receive(sock, 4)
        sock.shutdown(socket.SHUT_WR)
        return header, first, answers, status

    outcome, (header, first, answers, status), reports = session(pages, client)
    assert (header.command, header.flags, header.nr_pages, header.vaddr, header.pid) == (
        protocol.PS_IOV_ADD_F, PE_PRESENT, 1, 0x10000000 + PAGE_SIZE, 1)
    assert first == contents[3 * PAGE_SIZE:4 * PAGE_SIZE]
    (run_answer, run_pages), (last_answer, last_pages) = answers
    assert run_answer.nr_pages == 3 and run_pages == contents[2 * PAGE_SIZE:5 * PAGE_SIZE]  # fewer than asked
    assert last_answer.vaddr == 0x30000000 and last_pages == contents[6 * PAGE_SIZE:8 * PAGE_SIZE]
    assert status == b"\0\0\0\0"
    assert outcome.complete and (outcome.served, outcome.total) == (5, 5)
    assert reports[-1]["served"] == 5 and reports[-1]["bytes"] == 6 * PAGE_SIZE


def test_close_before_every_page_is_not_complete(tmp_path):
    write_images(tmp_path / "src", ENTRIES)

    def client(sock):
        sock.sendall(protocol.encode_header(protocol.PS_IOV_FORCE_CLOSE))  # as a daemon given --ps-socket
        return receive(sock, 4)

    outcome, status, _ = session(LazyPages.load(str(tmp_path / "src")), client)
    assert status == b"\0\0\0\0" and outcome.closed and not outcome.complete and outcome.served == 0


def sends(data: bytes):
    def client(sock):
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)  # and goes away, as a daemon that died

    return client


def test_a_lost_connection_and_a_request_for_no_lazy_page_fail_the_session(tmp_path):
    write_images(tmp_path / "src", ENTRIES)

    outcome, _, _ = session(LazyPages.load(str(tmp_path / "src")), sends(get(1, 0x10000000, 1)[:7]))
    assert not outcome.closed and "middle of a request" in outcome.error
    outcome, _, _ = session(LazyPages.load(str(tmp_path / "src")), sends(b""))
    assert not outcome.closed and "without the close handshake" in outcome.error
    outcome, _, _ = session(LazyPages.load(str(tmp_path / "src")), sends(get(1, 0x400000, 1)))
    assert not outcome.closed and "no lazy page" in outcome.error  # 0x400000 went with the images
    outcome, _, _ = session(LazyPages.load(str(tmp_path / "src")),
                            sends(protocol.encode_header(protocol.PS_IOV_OPEN2)))
    assert "unexpected OPEN2" in outcome.error


def test_the_command_serves_one_session_on_a_unix_socket_and_removes_the_images_when_done(tmp_path):
    write_images(tmp_path / "src", [(0x10000000, 2, PE_PRESENT | PE_LAZY)])
    path = tmp_path / "ps.sock"
    server = subprocess.Popen([sys.executable, "-m", "shim.criu.page_server", "--images", str(tmp_path / "src"),
                               "--unix", str(path), "--remove-when-done"], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        listening = json.loads(server.stdout.readline())
        assert listening["event"] == "listening" and listening["total"] == 2
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            sock.sendall(get(1, 0x10000000, 2))
            receive(sock, 32 + 2 * PAGE_SIZE)
            sock.sendall(protocol.encode_header(protocol.PS_IOV_CLOSE))
            receive(sock, 4)
        assert server.wait(10) == 0
        events = [json.loads(line) for line in server.stdout]
    finally:
        server.kill()
        server.wait()
    assert events[-1]["event"] == "done" and events[-1]["removed"] is True
    assert not (tmp_path / "src").exists() and not path.exists()


def test_the_command_refuses_to_listen_beyond_loopback(tmp_path):
    write_images(tmp_path / "src", ENTRIES)
    done = subprocess.run([sys.executable, "-m", "shim.criu.page_server", "--images", str(tmp_path / "src"),
                           "--listen", "0.0.0.0:0"], capture_output=True, text=True, timeout=30,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert done.returncode == 1 and "loopback" in json.loads(done.stdout.splitlines()[-1])["error"]
