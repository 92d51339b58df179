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


# What every operation gets in every state, written out here rather than read from the tables under test: "ok"
# allowed, "FP" FailedPrecondition, "NF" NotFound (the process has finished, or was deleted). A state, an operation
# or an outcome the tables gain, lose or change makes the test below fail until this grid says the same.
STATES = ("created", "created from checkpoint", "running", "paused", "stopped", "deleted")
INIT_OUTCOMES = """
            created  restore  running  paused  stopped  deleted
start       ok       ok       FP       FP      FP       NF
pause       FP       FP       ok       FP      FP       NF
resume      FP       FP       FP       ok      FP       NF
kill        ok       ok       ok       ok      NF       NF
delete      ok       ok       FP       FP      ok       NF
exec        ok       FP       ok       ok      FP       NF
update      ok       FP       ok       ok      FP       NF
checkpoint  FP       FP       ok       ok      FP       NF
resize      ok       ok       ok       ok      ok       NF
pids        ok       FP       ok       ok      ok       NF
"""
EXEC_OUTCOMES = """
            created  restore  running  paused  stopped  deleted
start       ok       FP       FP       FP      FP       NF
kill        ok       FP       ok       FP      NF       NF
delete      ok       FP       FP       FP      ok       NF
resize      ok       FP       ok       FP      NF       NF
"""


def grid(text: str) -> dict[tuple[str, str], str]:
    _, *rows = text.strip().splitlines()
    return {(operation, state): outcome
            for operation, *outcomes in (row.split() for row in rows)
            for state, outcome in zip(STATES, outcomes, strict=True)}


def outcome(table, operation: str, state: State) -> str:
    try:
        check(table, operation, state, "p")
    except FailedPrecondition:
        return "FP"
    except NotFound:
        return "NF"
    return "ok"


@pytest.mark.parametrize("table,expected", [(INIT_ALLOWED, INIT_OUTCOMES), (EXEC_ALLOWED, EXEC_OUTCOMES)],
                         ids=["init", "exec"])
def test_every_operation_is_defined_for_every_state(table, expected):
    assert tuple(state.value for state in State) == STATES
    expected_grid = grid(expected)
    operations = list(dict.fromkeys(operation for operation, _ in expected_grid))
    assert sorted(table) == sorted(operations)
    # Every operation, the listed ones whatever the table holds, is answered in every state: allowed or refused
    # with one of the two errors (a KeyError or any other exception fails the test).
    actual = {(operation, state.value): outcome(table, operation, state) for operation in operations for state in State}
    assert actual == expected_grid


def test_allowed_transitions():
    check(INIT_ALLOWED, "start", State.RESTORE_PENDING, "t")
    check(INIT_ALLOWED, "checkpoint", State.PAUSED, "t")
    check(EXEC_ALLOWED, "delete", State.STOPPED, "e")
    assert State.RESTORE_PENDING.status == "created"
