"""A failed checkpoint says what became of the task, as the shim saw it: left as it was, running on after its CRIU
died, paused (its fate shown at the Resume), or dead, with how it died. The checkpointer is a fake whose dump fails
the way shim.criu.checkpoint's does (an errors.Interrupted when CRIU died before it finished); the task is a real
process under the fake runtime, whose death the shim's reaper sees."""

import os
import signal
import time

import pytest

from shim import errors
from shim.api.containerd.task.v2 import shim_pb2 as api
from shim.api.containerd.types import task_pb2 as types
from shim.process import init as init_module
from tests.task.test_service import run


class FailingCheckpointer:
    """A Checkpointer whose dump fails with `error`, after doing `meanwhile(pid)` to the task's init."""

    def __init__(self, error, meanwhile=None):
        self.error = error
        self.meanwhile = meanwhile

    async def checkpoint(self, *, pid, **kwargs):
        if self.meanwhile is not None:
            self.meanwhile(pid)
        raise self.error

    async def release_network_lock(self, lock, why):
        raise AssertionError("a failed dump hands nothing to release")


def failed_checkpoint(tmp_path, error, meanwhile=None, *, pause=False):
    """(the error the init's checkpoint raised, the task's status after it, the exit statuses published)."""

    async def scenario(h):
        await h.create("t", ["sleep", "30"])
        await h.call("Start", api.StartRequest(id="t"))
        if pause:
            await h.call("Pause", api.PauseRequest(id="t"))
        init = h.service.containers["t"].init
        with pytest.raises(errors.ShimError) as failed:
            await init.checkpoint(options=None)
        await h.settle()
        state = await h.call("State", api.StateRequest(id="t"))
        if state.status != STOPPED:
            await h.call("Kill", api.KillRequest(id="t", signal=9))
            await h.call("Wait", api.WaitRequest(id="t"))
        exits = [event.exit_status for topic, event in h.publisher.events if topic == "/tasks/exit"]
        return failed.value, state.status, exits

    return run(scenario, tmp_path, checkpointer=FailingCheckpointer(error, meanwhile))


RUNNING, STOPPED, PAUSED = types.RUNNING, types.STOPPED, types.PAUSED


def kill_with(sig):
    return lambda pid: os.kill(pid, sig)


def killed_before_criu_answers(pid):
    """SIGKILL, and the process dead in the kernel (a zombie) before the dump fails, as when CRIU saw it die."""
    os.kill(pid, signal.SIGKILL)
    for _ in range(500):
        if not init_module._alive(pid):
            return
        time.sleep(0.01)
    raise AssertionError(f"{pid} still alive 5 s after SIGKILL")


def test_a_task_killed_by_criu_s_death_is_said_dead_with_its_signal(tmp_path):
    # What a CRIU SIGKILLed while it stepped the process through its injected code leaves: the process dies of a
    # trap (or a fault) as soon as it runs again.
    error, status, exits = failed_checkpoint(tmp_path, errors.Interrupted("CRIU was killed before it finished: x"),
                                             kill_with(signal.SIGTRAP))
    assert isinstance(error, errors.Interrupted)
    assert str(error).startswith("checkpoint of t failed, and the task did not survive it: its init was killed by "
                                 "SIGTRAP (exit status 133) during the dump (CRIU died while stepping it")
    assert str(error).endswith(". CRIU was killed before it finished: x")
    assert status == STOPPED and exits == [133]


def test_a_task_that_survived_criu_s_death_is_said_running(tmp_path):
    error, status, exits = failed_checkpoint(tmp_path, errors.Interrupted("CRIU was killed before it finished: x"))
    assert str(error) == "checkpoint of t failed; the task runs on. CRIU was killed before it finished: x"
    assert status == RUNNING and exits == [137]  # the test's own kill at the end


def test_a_task_killed_during_a_dump_criu_gave_up_on_is_said_dead(tmp_path):
    # Killed by someone else (the OOM killer, a user) while CRIU dumped it: CRIU fails and answers, the task is gone.
    error, status, exits = failed_checkpoint(tmp_path, errors.ShimError("criu dump failed: errno 3"),
                                             killed_before_criu_answers)
    assert type(error) is errors.ShimError
    assert str(error) == ("checkpoint of t failed, and the task did not survive it: its init was killed by SIGKILL "
                          "(exit status 137) during the dump. criu dump failed: errno 3")
    assert status == STOPPED and exits == [137]


def test_a_failed_dump_of_a_living_task_leaves_it_as_it_was_without_waiting(tmp_path, monkeypatch):
    monkeypatch.setattr(init_module, "EXIT_REPORTED_S", 30)  # would hit the scenario's 20 s limit if waited for
    error, status, _ = failed_checkpoint(tmp_path, errors.ShimError("criu dump failed: errno 9"))
    assert str(error) == "checkpoint of t failed; the task was left as it was. criu dump failed: errno 9"
    assert status == RUNNING


def test_a_paused_task_s_fate_is_left_to_its_resume(tmp_path):
    error, status, _ = failed_checkpoint(tmp_path, errors.Interrupted("CRIU was killed before it finished: x"),
                                         pause=True)
    assert str(error).startswith("checkpoint of t failed; the task stays paused. If CRIU died while it was stepping")
    assert status == PAUSED


@pytest.mark.parametrize("refusal", [errors.FailedPrecondition("pre-dump needs soft-dirty"),
                                     errors.InvalidArgument("bad page-server"), errors.Unavailable("no CRIU")])
def test_a_refusal_is_passed_on_as_it_came(tmp_path, refusal):
    error, status, _ = failed_checkpoint(tmp_path, refusal)
    assert error is refusal and status == RUNNING


@pytest.mark.parametrize("status, words", [(133, "was killed by SIGTRAP (exit status 133)"),
                                           (139, "was killed by SIGSEGV (exit status 139)"),
                                           (3, "exited with status 3"), (0, "exited with status 0"),
                                           (255, "exited with status 255")])
def test_exit_statuses_in_words(status, words):
    assert init_module.describe_exit(status) == words
