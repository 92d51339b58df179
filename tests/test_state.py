import pytest

from shim.errors import FailedPrecondition, NotFound
from shim.process.state import EXEC_ALLOWED, INIT_ALLOWED, State, check


@pytest.mark.parametrize("operation,state,error", [
    ("start", State.RUNNING, FailedPrecondition),
    ("pause", State.CREATED, FailedPrecondition),
    ("resume", State.RUNNING, FailedPrecondition),
    ("delete", State.RUNNING, FailedPrecondition),
    ("delete", State.PAUSED, FailedPrecondition),
    ("kill", State.STOPPED, NotFound),
    ("exec", State.STOPPED, FailedPrecondition),
    ("start", State.DELETED, NotFound),
])
def test_init_refusals(operation, state, error):
    with pytest.raises(error):
        check(INIT_ALLOWED, operation, state, "task c1")


def test_every_operation_is_defined_for_every_state():
    for table in (INIT_ALLOWED, EXEC_ALLOWED):
        for operation in table:
            for state in State:
                try:
                    check(table, operation, state, "p")
                except (FailedPrecondition, NotFound):
                    pass


def test_allowed_transitions():
    check(INIT_ALLOWED, "start", State.RESTORE_PENDING, "t")
    check(INIT_ALLOWED, "checkpoint", State.PAUSED, "t")
    check(EXEC_ALLOWED, "delete", State.STOPPED, "e")
    assert State.RESTORE_PENDING.status == "created"
