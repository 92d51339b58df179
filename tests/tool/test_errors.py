"""containerd's gRPC errors in the pyshim command's words (shim.tool.errors.from_rpc)."""

import grpc
import pytest

from shim.tool.errors import from_rpc


class RpcFailure(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize("details, said", [
    # the shim's error already names what failed: said once
    ("checkpoint of web failed; the task was left as it was. criu dump failed: errno 9",
     "checkpoint of web failed; the task was left as it was. criu dump failed: errno 9"),
    # anything else gets what failed in front of it
    ("criu dump failed: errno 9", "the checkpoint of web failed: criu dump failed: errno 9"),
    ("", "the checkpoint of web failed: UNKNOWN"),
])
def test_what_failed_is_said_once(details, said):
    assert str(from_rpc(RpcFailure(grpc.StatusCode.UNKNOWN, details), "the checkpoint of web")) == said


def test_the_caller_s_words_for_the_codes_it_expects():
    gone = RpcFailure(grpc.StatusCode.NOT_FOUND, "container web: not found")
    assert str(from_rpc(gone, "looking up web", not_found="no container 'web'")) == "no container 'web'"
    refused = RpcFailure(grpc.StatusCode.FAILED_PRECONDITION, "task is stopped")
    assert str(from_rpc(refused, "x", precondition="web is not running")) == "web is not running: task is stopped"
