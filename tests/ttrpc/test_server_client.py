"""Server and client over a real unix socket."""

import asyncio
import os
import random
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from shim.ttrpc import Client, Code, ConnectionLost, Server, TtrpcError
from shim.ttrpc.framing import HEADER, FrameReader, FrameType, encode_frame
from tests.ttrpc.echo_service import SERVICE, EchoReply, EchoRequest, EchoService


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def serving(tmp_path, **server_args):
    server = Server(**server_args)
    service = EchoService()
    server.register(SERVICE, service)
    path = str(tmp_path / "ttrpc.sock")
    await server.listen_path(path)
    return server, service, path


async def raw_exchange(path, data, replies):
    """Write raw bytes, read `replies` response frames."""
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(data)
    frames, parser = [], FrameReader()
    while len(frames) < replies:
        chunk = await reader.read(65536)
        if not chunk:
            break
        frames += parser.feed(chunk)
    writer.close()
    return frames


def test_call_round_trip_with_metadata(tmp_path):
    async def scenario():
        server, _, path = await serving(tmp_path)
        client = await Client.connect(path)
        echo = client.stub(SERVICE, metadata={"containerd-namespace-ttrpc": "ns1"})
        reply = await echo.Echo(EchoRequest(text="hello"))
        client.close()
        await server.shutdown()
        return reply

    reply = run(scenario())
    assert (reply.text, reply.namespace) == ("hello", "ns1")


def test_hundred_concurrent_calls_reply_out_of_order(tmp_path):
    async def scenario():
        server, service, path = await serving(tmp_path)
        client = await Client.connect(path)
        echo = client.stub(SERVICE)
        finished = []
        rng = random.Random(7)

        async def one(i):
            reply = await echo.Echo(EchoRequest(text=str(i), delay=rng.uniform(0, 0.2)))
            finished.append(i)
            return reply.text

        texts = await asyncio.gather(*(one(i) for i in range(100)))
        client.close()
        await server.shutdown()
        return texts, finished, service.peak

    texts, finished, peak = run(scenario())
    assert texts == [str(i) for i in range(100)]  # each caller got its own reply
    assert finished != sorted(finished)  # replies came back out of order
    assert peak > 50  # handlers ran concurrently on one connection


def test_server_side_deadline_from_timeout_nano(tmp_path):
    async def scenario():
        server, _, path = await serving(tmp_path)
        client = await Client.connect(path)
        started = asyncio.get_running_loop().time()
        # call() sends timeout_nano; the server's deadline fires first and answers with a status
        with pytest.raises(TtrpcError) as err:
            await client.call(SERVICE.full_name, "Echo", EchoRequest(delay=5), EchoReply, timeout=0.3)
        elapsed = asyncio.get_running_loop().time() - started
        client.close()
        await server.shutdown()
        return err.value, elapsed

    error, elapsed = run(scenario())
    assert error.code == Code.DEADLINE_EXCEEDED
    assert elapsed < 2


def test_client_timeout_when_server_never_answers(tmp_path):
    async def scenario():
        path = str(tmp_path / "silent.sock")
        silent = await asyncio.start_unix_server(lambda r, w: None, path)
        client = await Client.connect(path)
        with pytest.raises(TtrpcError) as err:
            await client.call("s", "m", EchoRequest(), EchoReply, timeout=0.2)
        client.close()
        silent.close()
        return err.value

    assert run(scenario()).code == Code.DEADLINE_EXCEEDED


def test_unknown_service_and_method_are_unimplemented(tmp_path):
    async def scenario():
        server, _, path = await serving(tmp_path)
        client = await Client.connect(path)
        codes = []
        for service, method in [("no.such.Service", "Echo"), (SERVICE.full_name, "Nope"),
                                (SERVICE.full_name, "Missing")]:
            with pytest.raises(TtrpcError) as err:
                await client.call(service, method, EchoRequest(), EchoReply)
            codes.append(err.value.code)
        client.close()
        await server.shutdown()
        return codes

    assert run(scenario()) == [Code.UNIMPLEMENTED] * 3


def test_handler_status_reaches_client(tmp_path):
    async def scenario():
        server, _, path = await serving(tmp_path)
        client = await Client.connect(path)
        with pytest.raises(TtrpcError) as err:
            await client.stub(SERVICE).Echo(EchoRequest(text="x", fail_code=Code.NOT_FOUND))
        client.close()
        await server.shutdown()
        return err.value

    error = run(scenario())
    assert (error.code, error.message) == (Code.NOT_FOUND, "asked to fail: x")


def test_oversized_frames_both_ways_keep_the_connection(tmp_path):
    async def scenario():
        server, _, path = await serving(tmp_path, max_payload=64 * 1024)
        client = await Client.connect(path)
        echo = client.stub(SERVICE)
        with pytest.raises(TtrpcError) as outbound:  # reply over the server's limit
            await echo.Echo(EchoRequest(reply_size=100 * 1024))
        # an inbound request frame over the limit, sent raw on another connection
        huge = HEADER.pack(200 * 1024, 1, FrameType.REQUEST, 0) + b"\0" * (200 * 1024)
        follow_up = encode_frame(3, FrameType.REQUEST, b"")
        frames = await raw_exchange(path, huge + follow_up, replies=2)
        after = await echo.Echo(EchoRequest(text="still here"))
        client.close()
        await server.shutdown()
        return outbound.value, frames, after

    outbound, frames, after = run(scenario())
    assert outbound.code == Code.RESOURCE_EXHAUSTED
    assert [f.stream_id for f in frames] == [1, 3]  # oversized answered, next request still served
    assert after.text == "still here"


def test_client_request_over_limit_fails_before_sending(tmp_path):
    async def scenario():
        server, _, path = await serving(tmp_path)
        client = await Client.connect(path)
        with pytest.raises(TtrpcError) as err:
            await client.stub(SERVICE).Echo(EchoRequest(text="x" * (5 << 20)))
        ok = await client.stub(SERVICE).Echo(EchoRequest(text="ok"))
        client.close()
        await server.shutdown()
        return err.value, ok

    error, ok = run(scenario())
    assert error.code == Code.RESOURCE_EXHAUSTED and ok.text == "ok"


def test_protocol_violation_closes_only_that_connection(tmp_path):
    async def scenario():
        server, _, path = await serving(tmp_path)
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(encode_frame(1, 0x7F, b"garbage type"))
        eof = await asyncio.wait_for(reader.read(), 5)
        client = await Client.connect(path)
        ok = await client.stub(SERVICE).Echo(EchoRequest(text="fine"))
        client.close()
        await server.shutdown()
        return eof, ok

    eof, ok = run(scenario())
    assert eof == b"" and ok.text == "fine"


def test_peer_with_other_credentials_is_refused(tmp_path):
    async def scenario():
        # Our own peer credentials do not match what this server demands.
        server, _, path = await serving(tmp_path, allowed_peer=(os.geteuid() + 1, os.getegid()))
        client = await Client.connect(path)
        with pytest.raises(ConnectionLost):
            await client.stub(SERVICE).Echo(EchoRequest(text="x"), timeout=5)
        await server.shutdown()

    run(scenario())


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client under another uid/gid")
def test_client_process_with_other_uid_is_refused(tmp_path):
    # pytest's tmp_path sits under a 0700 directory that nobody cannot traverse
    public = tempfile.mkdtemp(prefix="ttrpc-peer-")
    os.chmod(public, 0o755)

    async def scenario():
        server, _, path = await serving(Path(public))
        os.chmod(path, 0o777)
        pid = os.fork()
        if pid == 0:  # child: become nobody, send one request; exit 0 if refused, 3 if answered
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                sock = socket.socket(socket.AF_UNIX)
                sock.settimeout(5)
                sock.connect(path)
                code = 2
                sock.sendall(encode_frame(1, FrameType.REQUEST, b""))
                code = 3 if sock.recv(100) else 0  # b"" means closed without a reply
            except (ConnectionResetError, BrokenPipeError):  # refused before or while we sent
                code = 0 if code == 2 else 1
            finally:
                os._exit(code)
        loop = asyncio.get_running_loop()
        _, status = await loop.run_in_executor(None, os.waitpid, pid, 0)
        await server.shutdown()
        return os.waitstatus_to_exitcode(status)

    try:
        assert run(scenario()) == 0
    finally:
        shutil.rmtree(public)


def test_connection_loss_fails_pending_calls(tmp_path):
    async def scenario():
        server, _, path = await serving(tmp_path)
        client = await Client.connect(path)
        call = asyncio.ensure_future(client.stub(SERVICE).Echo(EchoRequest(delay=10)))
        await asyncio.sleep(0.1)
        await server.shutdown(grace=0)
        with pytest.raises(TtrpcError) as err:
            await call
        return err.value

    # the server cancels the call (CANCELLED) or the connection drops first (UNAVAILABLE)
    assert run(scenario()).code in (Code.CANCELLED, Code.UNAVAILABLE)


def test_graceful_shutdown_lets_calls_in_flight_finish(tmp_path):
    async def scenario():
        server, _, path = await serving(tmp_path)
        client = await Client.connect(path)
        call = asyncio.ensure_future(client.stub(SERVICE).Echo(EchoRequest(text="done", delay=0.3)))
        await asyncio.sleep(0.05)
        await server.shutdown(grace=5)
        reply = await call
        with pytest.raises(ConnectionLost):
            await Client.connect(path, timeout=1)
        return reply

    assert run(scenario()).text == "done"
