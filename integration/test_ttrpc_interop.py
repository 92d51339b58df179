"""pyshim's ttrpc client against containerd's own Go ttrpc server: Events.Forward on the
ttrpc socket of containerd 1.6, 1.7 and 2.x, with `ctr events` showing what arrived."""

from __future__ import annotations

import asyncio
import json
import re
import uuid

import pytest
from harness.containerd import Containerd

from shim.api.containerd.events.task_pb2 import TaskExit, TaskOOM
from shim.api.containerd.services.events.ttrpc.v1.events_pb2 import Envelope, ForwardRequest
from shim.server.events import EVENTS_SERVICE, NAMESPACE_KEY, pack, timestamp
from shim.ttrpc import Client, Code, TtrpcError


def forward_request(namespace: str, topic: str, event) -> ForwardRequest:
    envelope = Envelope(timestamp=timestamp(1764331200.25), namespace=namespace, topic=topic, event=pack(event))
    return ForwardRequest(envelope=envelope)


EVENT_LINE = re.compile(r"^(?P<time>.+) (?P<namespace>\S+) (?P<topic>/\S+) (?P<event>\{.*\})$")


def parse_event(line: str) -> dict:
    """`<time> <namespace> <topic> <json>` as ctr events prints it."""
    match = EVENT_LINE.match(line.strip())
    assert match, line
    return {**match.groupdict(), "event": json.loads(match["event"])}


def test_forward_reaches_ctr_events_decoded(containerd: Containerd):
    marker = f"pyshim-{uuid.uuid4().hex[:8]}"

    async def forward():
        client = await Client.connect(containerd.ttrpc_address)
        events = client.stub(EVENTS_SERVICE, metadata={NAMESPACE_KEY: containerd.namespace}, timeout=5)
        await events.Forward(forward_request(containerd.namespace, "/tasks/exit",
                                             TaskExit(container_id=marker, id=marker, pid=4242, exit_status=7)))
        client.close()

    with containerd.events() as stream:
        asyncio.run(forward())
        line = stream.wait_for(rf"/tasks/exit .*{marker}")
    event = parse_event(line)
    assert (event["namespace"], event["topic"]) == (containerd.namespace, "/tasks/exit")
    assert event["time"].startswith("2025-11-28 12:00:00.2")  # the envelope's own timestamp
    payload = event["event"]
    assert payload["container_id"] == marker and payload["pid"] == 4242 and payload["exit_status"] == 7


def test_concurrent_forwards_on_one_connection(containerd: Containerd):
    markers = [f"pyshim-{uuid.uuid4().hex[:8]}" for _ in range(20)]

    async def forward_all():
        client = await Client.connect(containerd.ttrpc_address)
        events = client.stub(EVENTS_SERVICE, metadata={NAMESPACE_KEY: containerd.namespace}, timeout=5)
        await asyncio.gather(*(events.Forward(forward_request(containerd.namespace, "/tasks/oom",
                                                              TaskOOM(container_id=m))) for m in markers))
        client.close()

    with containerd.events() as stream:
        asyncio.run(forward_all())
        for marker in markers:
            stream.wait_for(rf"/tasks/oom .*{marker}")
    seen = {parse_event(line)["event"]["container_id"] for line in stream.lines() if "/tasks/oom" in line}
    assert set(markers) <= seen


def test_containerd_answers_unknown_methods_with_unimplemented(containerd: Containerd):
    async def call():
        client = await Client.connect(containerd.ttrpc_address)
        try:
            with pytest.raises(TtrpcError) as err:
                await client.call(EVENTS_SERVICE.full_name, "NoSuchMethod", TaskOOM(), TaskOOM, timeout=5)
            return err.value.code
        finally:
            client.close()

    assert asyncio.run(call()) == Code.UNIMPLEMENTED
