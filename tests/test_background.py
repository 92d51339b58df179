"""shim.background: the one owner of a server's background tasks, drained (or cancelled, said in the log) at
shutdown."""

import asyncio
import logging

from shim.background import BackgroundTasks


def test_close_lets_running_work_finish_including_what_it_starts_meanwhile():
    async def main():
        background = BackgroundTasks()
        finished = []
        release = asyncio.Event()

        async def second():
            finished.append("second")

        async def first():
            await release.wait()
            background.spawn(second(), "second")  # started while the owner drains
            finished.append("first")

        background.spawn(first(), "first")
        asyncio.get_running_loop().call_soon(release.set)
        await asyncio.wait_for(background.close(grace=10), 20)
        return finished, background.running

    assert asyncio.run(main()) == (["first", "second"], [])


def test_close_cancels_what_outlives_the_grace_and_logs_what_it_was(caplog):
    async def main():
        background = BackgroundTasks()
        cancelled = asyncio.Event()

        async def forever():
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

        task = background.spawn(forever(), "lazy-pages daemon for c1")
        await asyncio.wait_for(background.close(grace=0.05), 20)
        return task.cancelled(), cancelled.is_set(), background.running

    with caplog.at_level(logging.WARNING, logger="shim.background"):
        assert asyncio.run(main()) == (True, True, [])
    assert "cancelling 1 background task(s)" in caplog.text and "lazy-pages daemon for c1" in caplog.text


def test_a_failure_is_logged_with_what_failed(caplog):
    async def main():
        background = BackgroundTasks()

        async def broken():
            raise OSError("no such file")

        background.spawn(broken(), "OOM watch of c2")
        await asyncio.wait_for(background.close(grace=10), 20)

    with caplog.at_level(logging.ERROR, logger="shim.background"):
        asyncio.run(main())
    assert "background task OOM watch of c2 failed: no such file" in caplog.text
