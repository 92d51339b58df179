"""CRIU's page-server protocol against bytes laid out by hand from CRIU 4.x's `struct page_server_iov`
{u32 cmd; (4 bytes of alignment); u64 nr_pages; u64 vaddr; u64 dst_id}, little-endian, and its commands
(criu/page-xfer.c: ADD_F 6, GET 7, CLOSE 0x1023, FORCE_CLOSE 0x1024; flags in cmd's high 16 bits)."""

import pytest

from shim.criu import page_protocol as protocol

# GET 3 pages of pid 1 at 0x7f0000001000, as `criu lazy-pages` sends it
GET = bytes.fromhex(
    "07000000" "00000000"          # cmd 7, padding
    "0300000000000000"             # nr_pages 3
    "00100000007f0000"             # vaddr 0x7f0000001000
    "0100000000000000")            # dst_id 1
# the answer header: ADD_F (6) with PE_PRESENT (4) in the high half of cmd, 2 pages
ANSWER = bytes.fromhex("06000400" "00000000" "0200000000000000" "00100000007f0000" "0100000000000000")
CLOSE = bytes.fromhex("23100000" "00000000") + bytes(24)


def test_a_get_decodes_to_its_fields():
    request = protocol.decode_header(GET)
    assert (request.command, request.flags, request.nr_pages, request.vaddr, request.pid) == (
        protocol.PS_IOV_GET, 0, 3, 0x7F0000001000, 1)
    assert request.name == "GET"


def test_the_answer_to_a_get_is_add_f_with_present_and_the_pages_given():
    request = protocol.decode_header(GET)
    assert protocol.pages_answer(request, 2) == ANSWER
    assert len(ANSWER) == protocol.HEADER.size == 32


def test_close_and_its_status():
    request = protocol.decode_header(CLOSE)
    assert request.command == protocol.PS_IOV_CLOSE and request.name == "CLOSE"
    assert protocol.close_answer(0) == b"\0\0\0\0"
    assert protocol.decode_header(protocol.encode_header(protocol.PS_IOV_FORCE_CLOSE)).name == "FORCE_CLOSE"


def test_headers_split_across_reads_come_out_whole():
    reader = protocol.RequestReader()
    stream = GET + CLOSE
    assert reader.feed(stream[:5]) == []
    assert reader.pending == 5
    first = reader.feed(stream[5:40])
    assert [r.name for r in first] == ["GET"] and reader.pending == 8
    assert [r.name for r in reader.feed(stream[40:])] == ["CLOSE"] and reader.pending == 0


def test_a_short_header_is_a_protocol_error():
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_header(GET[:24])  # CRIU 3.x's 24-byte header is not this protocol
