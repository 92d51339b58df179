"""CheckpointPauses: which pauses were containerd's client pausing a task for a checkpoint, and when the task is
resumed because that checkpoint's caller went away (the connection's future done) before the Resume."""

import asyncio

from shim.background import BackgroundTasks
from shim.task.checkpoint_pauses import CheckpointPauses


def scenario(steps):
    """Run steps(pauses, connection, other) and return the (id, why) of every resume it caused."""
    async def main():
        resumed = []

        async def resume(container_id, why):
            resumed.append((container_id, why))

        loop = asyncio.get_running_loop()
        background = BackgroundTasks()
        pauses = CheckpointPauses(resume, background)
        connection, other = loop.create_future(), loop.create_future()
        await steps(pauses, connection, other)
        await settle()  # the connection's done-callbacks run
        await background.close(grace=5)  # the resumes started run to their end
        return resumed

    return asyncio.run(main())


async def settle():
    for _ in range(3):
        await asyncio.sleep(0)


def test_connection_lost_mid_checkpoint_resumes_once_the_checkpoint_ends():
    async def steps(pauses, connection, other):
        pauses.paused("t", connection, was_running=True)
        pauses.checkpoint_started("t", connection)
        connection.set_result(None)  # containerd died while CRIU dumps
        await settle()
        assert pauses.pending("t")  # not while the dump still runs (it is cancelled and cleans up first)
        pauses.checkpoint_ended("t")

    assert scenario(steps) == [("t", "its checkpoint ended after containerd's connection closed")]


def test_connection_lost_between_checkpoint_and_resume():
    async def steps(pauses, connection, other):
        pauses.paused("t", connection, was_running=True)
        pauses.checkpoint_started("t", connection)
        pauses.checkpoint_ended("t")  # containerd writes the checkpoint to content, then would Resume
        connection.set_result(None)

    assert scenario(steps) == [("t", "containerd's connection closed between its checkpoint and the Resume")]


def test_the_resume_came():
    async def steps(pauses, connection, other):
        pauses.paused("t", connection, was_running=True)
        pauses.checkpoint_started("t", connection)
        pauses.checkpoint_ended("t")
        pauses.called("t")  # the Resume handler notes the call, then the resume
        pauses.resumed("t")
        connection.set_result(None)

    assert scenario(steps) == []


def test_a_user_pause_is_never_resumed():
    async def steps(pauses, connection, other):
        pauses.paused("t", connection, was_running=True)  # ctr task pause
        pauses.called("t")  # ctr task checkpoint asks the State first and sends no Pause
        pauses.checkpoint_started("t", connection)
        connection.set_result(None)
        pauses.checkpoint_ended("t")

    assert scenario(steps) == []


def test_a_pause_from_another_connection_or_of_a_paused_task_does_not_count():
    async def steps(pauses, connection, other):
        pauses.paused("a", other, was_running=True)
        pauses.checkpoint_started("a", connection)
        pauses.paused("b", connection, was_running=False)  # paused already
        pauses.checkpoint_started("b", connection)
        connection.set_result(None)
        other.set_result(None)
        pauses.checkpoint_ended("a")
        pauses.checkpoint_ended("b")

    assert scenario(steps) == []


def test_each_task_on_its_own():
    async def steps(pauses, connection, other):
        for task in ("a", "b"):
            pauses.paused(task, connection, was_running=True)
            pauses.checkpoint_started(task, connection)
            pauses.checkpoint_ended(task)
        pauses.resumed("a")
        connection.set_result(None)

    assert [task for task, _ in scenario(steps)] == ["b"]
