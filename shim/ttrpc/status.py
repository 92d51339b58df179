"""Status codes and the one exception that carries them across a ttrpc call."""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """The gRPC status codes, which ttrpc reuses on the wire."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class TtrpcError(Exception):
    """A call failed with a status. Handlers raise it; clients receive it."""

    def __init__(self, code: Code | int, message: str = "") -> None:
        try:
            code = Code(code)
        except ValueError:
            code = Code.UNKNOWN
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name.lower()}: {self.message}" if self.message else self.code.name.lower()


class ConnectionLost(TtrpcError):
    """The connection closed before a reply arrived; a caller may reconnect and retry."""

    def __init__(self, message: str = "ttrpc connection closed") -> None:
        super().__init__(Code.UNAVAILABLE, message)
