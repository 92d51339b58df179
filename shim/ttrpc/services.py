"""Binding service implementations to the RPCs named in generated service descriptors.

The descriptor is the source of truth: a method exists because the .proto declares it,
and its request and reply types come from the descriptor, so no per-method glue is written
by hand. An implementation is any object with `async def Method(self, request, context)`
for the RPCs it serves; the ones it lacks answer Unimplemented.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

Handler = Callable[[Message, Any], Awaitable[Message]]


@dataclass(frozen=True, slots=True)
class Method:
    service: str
    name: str
    request_type: type[Message]
    response_type: type[Message]
    handler: Handler | None = None


def methods_of(descriptor: ServiceDescriptor) -> dict[str, Method]:
    """Every RPC of a service with its message classes, keyed by method name."""
    return {
        m.name: Method(descriptor.full_name, m.name, GetMessageClass(m.input_type), GetMessageClass(m.output_type))
        for m in descriptor.methods
    }


def bind(descriptor: ServiceDescriptor, implementation: object) -> dict[str, Method]:
    """The RPCs of `descriptor` that `implementation` serves, each with its handler."""
    bound = {}
    for name, method in methods_of(descriptor).items():
        handler = getattr(implementation, name, None)
        if handler is not None:
            bound[name] = Method(method.service, name, method.request_type, method.response_type, handler)
    return bound
