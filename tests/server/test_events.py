import asyncio

from shim.api.containerd.events.task_pb2 import TaskExit, TaskStart
from shim.server.events import EVENTS_SERVICE, NAMESPACE_KEY, Publisher
from shim.ttrpc import Server


class Recorder:
    def __init__(self, fail_first=0):
        self.received = []
        self.fail_first = fail_first

    async def Forward(self, request, context):
        from google.protobuf.empty_pb2 import Empty

        from shim.ttrpc import TtrpcError
        if self.fail_first:
            self.fail_first -= 1
            raise TtrpcError(14, "not yet")
        self.received.append((context.first(NAMESPACE_KEY), request.envelope))
        return Empty()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_events_arrive_in_order_with_namespace_and_bare_type_urls(tmp_path):
    async def scenario():
        recorder = Recorder(fail_first=2)  # two failures are retried without reordering
        server = Server()
        server.register(EVENTS_SERVICE, recorder)
        path = str(tmp_path / "events.sock")
        await server.listen_path(path)
        publisher = Publisher(path, "ns1", retry_delay=0.01)
        publisher.publish("/tasks/start", TaskStart(container_id="c", pid=1))
        for i in range(20):
            publisher.publish("/tasks/exit", TaskExit(container_id="c", id=str(i), exit_status=i))
        await publisher.close()
        await server.shutdown()
        return recorder.received

    received = run(scenario())
    assert [env.topic for _, env in received] == ["/tasks/start"] + ["/tasks/exit"] * 20
    assert {ns for ns, _ in received} == {"ns1"}
    assert received[1][1].event.type_url == "containerd.events.TaskExit"
    exits = [TaskExit.FromString(env.event.value).exit_status for _, env in received[1:]]
    assert exits == list(range(20))


def test_publisher_reconnects_after_the_server_restarts(tmp_path):
    async def scenario():
        path = str(tmp_path / "events.sock")
        first = Recorder()
        server = Server()
        server.register(EVENTS_SERVICE, first)
        await server.listen_path(path)
        publisher = Publisher(path, "ns", retry_delay=0.05)
        publisher.publish("/tasks/start", TaskStart(container_id="a"))
        while not first.received:
            await asyncio.sleep(0.01)
        await server.shutdown()
        import os
        os.unlink(path)
        second = Recorder()
        server = Server()
        server.register(EVENTS_SERVICE, second)
        await server.listen_path(path)
        publisher.publish("/tasks/start", TaskStart(container_id="b"))
        await publisher.close()
        await server.shutdown()
        return first.received, second.received

    first, second = run(scenario())
    assert [TaskStart.FromString(e.event.value).container_id for _, e in first] == ["a"]
    assert [TaskStart.FromString(e.event.value).container_id for _, e in second] == ["b"]


def test_a_failing_event_is_retried_on_the_go_schedule_then_dropped():
    """containerd down: the Go publisher retries 1, 2, 3, 4, 5 s after each failure (maxRequeue 5), ~15 s in all,
    long enough for an exit to reach a restarted containerd. Then the event is dropped and the next one goes."""
    from shim.ttrpc import ConnectionLost

    async def scenario(failures):
        attempts, waits, recorder = [0], [], Recorder()

        class Connected:
            closed = False

            def stub(self, descriptor, metadata=None):
                return self

            async def Forward(self, request, timeout=None):
                recorder.received.append((None, request.envelope))

            def close(self):
                pass

        async def connect(address):
            attempts[0] += 1
            if attempts[0] <= failures:
                raise ConnectionLost("containerd is down")
            return Connected()

        async def sleep(seconds):
            # the schedule as asked for, measured without a wall clock that load would stretch
            waits.append(seconds)

        publisher = Publisher("unused", "ns", connect=connect, retry_delay=0.02, sleep=sleep)
        publisher.publish("/tasks/exit", TaskExit(container_id="c", exit_status=42))
        publisher.publish("/tasks/delete", TaskExit(container_id="d"))
        await publisher.close(timeout=5)
        gaps = [round(seconds / 0.02) for seconds in waits]
        return [env.topic for _, env in recorder.received], gaps

    # Five failures: the sixth try (the fifth retry) delivers it; the retries waited 1..5 delays.
    delivered, gaps = run(scenario(5))
    assert delivered == ["/tasks/exit", "/tasks/delete"]
    assert gaps == [1, 2, 3, 4, 5]
    # Six failures: given up without a sixth wait, and the next event goes without one.
    delivered, gaps = run(scenario(6))
    assert delivered == ["/tasks/delete"]
    assert gaps == [1, 2, 3, 4, 5]
