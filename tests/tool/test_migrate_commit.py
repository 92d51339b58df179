"""pyshim migrate's decisions that need no containers: the commit whose answer was lost (ask the destination again,
then commit, roll back, or keep everything and say so), and the owner check of the page stream's listener."""

from __future__ import annotations

import os
import socket
import types

import pytest

from shim.tool.errors import ToolError
from shim.tool.migrate import pagestream, source
from shim.tool.migrate.channel import ChannelClosed
from shim.tool.migrate.dest import parse


class LostCommit:
    """A session whose commit never gets its answer."""

    channel = None

    def request(self, message_type, **fields):
        assert message_type == "commit"
        raise ChannelClosed("the destination closed the connection")


def migration(state: str) -> tuple[source.Migration, list[str]]:
    args = types.SimpleNamespace(container="web", mode="stop-copy", timeout=600.0, ssh_option=[], store=None)
    client = types.SimpleNamespace(namespace="default")
    run = source.Migration(args, client, parse("ssh://host-b/run/containerd.sock", default_namespace="default"))
    run.session = LostCommit()  # type: ignore[assignment]
    run.staging = "/var/lib/pyshim/checkpoints/.migrate-web-x"
    calls: list[str] = []
    run._ask_state = lambda: calls.append("asked") or state  # type: ignore[method-assign]
    run.roll_back = lambda why: calls.append(f"rolled back: {why}")  # type: ignore[method-assign]
    return run, calls


def test_a_lost_commit_answer_is_asked_again_and_a_running_destination_commits():
    run, calls = migration("running")
    run._commit()
    assert calls == ["asked"]


def test_a_destination_that_undid_the_migration_means_rolling_back_here():
    run, calls = migration("absent")
    with pytest.raises(ToolError, match="restored here and runs on"):
        run._commit()
    assert calls == ["asked", "rolled back: the destination closed the connection"]


def test_a_destination_that_cannot_be_asked_leaves_everything_and_says_where_the_images_are():
    run, calls = migration("unknown: ssh exit status 255")
    with pytest.raises(ToolError, match="may run there; it is stopped here, its images kept in "
                                        "/var/lib/pyshim/checkpoints/.migrate-web-x"):
        run._commit()
    assert calls == ["asked"]


def test_the_page_stream_listener_tells_who_owns_the_connecting_socket():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        with socket.create_connection(listener.getsockname()) as client:
            accepted, peer = listener.accept()
            with accepted:
                assert pagestream.socket_owner(peer, listener.getsockname()) == os.getuid()
                assert client.getsockname() == peer
        assert pagestream.socket_owner(("127.0.0.1", 1), listener.getsockname()) is None


def test_ctrl_c_during_the_dump_is_noted_not_raised():
    import signal

    before = signal.getsignal(signal.SIGINT)
    with source._interrupt_deferred() as interrupted:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # the handler runs between bytecodes, soon after the signal
            if interrupted:
                break
    assert interrupted == [signal.SIGINT]
    assert signal.getsignal(signal.SIGINT) is before
