"""A stand-in for `criu swrk 3` that misbehaves on purpose (FAKE_CRIU_MODE), for the client's
paths a real CRIU cannot be made to take on demand. It reports what it saw in cr_errmsg."""

import os
import socket
import sys

from pycriu import rpc_pb2


def answer(sk, req, success=True, errmsg=""):
    resp = rpc_pb2.criu_resp(type=req.type, success=success)
    if errmsg:
        resp.cr_errmsg = errmsg
    sk.send(resp.SerializeToString())


def notify(sk, script, pid=0, fd=None):
    """Send a notification (with an fd, like orphan-pts-master) and return the client's ack."""
    resp = rpc_pb2.criu_resp(type=rpc_pb2.NOTIFY, success=True)
    resp.notify.script = script
    if pid:
        resp.notify.pid = pid
    fds = [fd] if fd is not None else []
    socket.send_fds(sk, [resp.SerializeToString()], fds)
    return rpc_pb2.criu_req.FromString(sk.recv(4096))


def main():
    assert sys.argv[1:] == ["swrk", "3"], sys.argv
    mode = os.environ["FAKE_CRIU_MODE"]
    sk = socket.socket(fileno=3)
    req = rpc_pb2.criu_req.FromString(sk.recv(1 << 16))
    if mode == "crash":
        print("fake criu: giving up before answering", file=sys.stderr, flush=True)
        os._exit(3)
    if mode == "pty":
        # Hand over the write end of a pipe and keep the read end: once the ack is in, EOF on
        # the read end means the client closed every copy it had.
        r, w = os.pipe()
        ack = notify(sk, "orphan-pts-master", fd=w)
        os.close(w)
        os.set_blocking(r, False)
        try:
            state = "closed" if os.read(r, 1) == b"" else "data"
        except BlockingIOError:
            state = "open"
        answer(sk, req, errmsg=f"ack={ack.type}/{ack.notify_success} writer={state}")
    elif mode == "pass-fds":
        answer(sk, req, errmsg=os.read(5, 100).decode())
    elif mode == "garbage":
        sk.send(b"\xff\xff\xff\xff")
        sk.recv(10)  # until the client hangs up
    elif mode == "hang":
        sk.recv(10)  # never answers; the client's deadline must end this
    else:
        raise SystemExit(f"unknown mode {mode}")


main()
