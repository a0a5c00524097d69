"""The validator: bad schedules fail with the numbers, the rule and the marked grid."""

from __future__ import annotations

import pytest

from brigade.schedulers import Schedule, ScheduleError, simulate, validate


def sched(*rows: str, m: int = 2, steps: int = 1, virtual: int = 1) -> Schedule:
    """A hand-written schedule: one string of actions per worker."""
    p = len(rows)
    return Schedule("hand", p * virtual, p, m, steps, virtual, list(rows))


def error_of(schedule: Schedule) -> str:
    with pytest.raises(ScheduleError) as info:
        validate(schedule)
    return str(info.value)


def test_a_good_hand_written_schedule_passes():
    validate(sched("0F0 0F1 0B0 0B1 0U0", "1F0 1B0 1F1 1B1 1U0"))


def test_missing_microbatch_names_it_and_marks_who_needs_it():
    msg = error_of(sched("0F0 0B0 0B1 0U0", "1F0 1F1 1B0 1B1 1U0"))
    assert "stage 0 never runs a forward of microbatch 1" in msg
    assert "microbatches 0..1" in msg
    # 0B1 is stage 0's own action on microbatch 1: that is the one marked
    assert "w0 | 0F0" in msg and "<-- ERROR HERE (0B1)" in msg
    assert "^^^" in msg


def test_missing_forward_without_own_actions_marks_the_next_stage():
    msg = error_of(Schedule("hand", 2, 2, 2, 1, 1, ["0F0", "1F0 1F1"]))
    assert "stage 0 never runs a forward of microbatch 1" in msg
    assert "<-- ERROR HERE (1F1)" in msg


def test_backward_before_forward_on_the_same_worker():
    msg = error_of(sched("0B0 0F0 0F1 0B1 0U0", "1F0 1B0 1F1 1B1 1U0"))
    assert "0B0 comes before 0F0 on worker 0" in msg
    assert "a backward needs its own forward" in msg and "move 0B0 after 0F0" in msg
    line = next(l for l in msg.splitlines() if "ERROR HERE" in l)
    assert line.startswith("w0 |") and "0B0: needs 0F0, which comes later" in line


def test_cross_stage_deadlock_marks_each_stuck_worker():
    # worker 0 wants 1's backward of microbatch 1 before it will forward microbatch 1,
    # which worker 1 needs first
    msg = error_of(sched("0F0 0B0 0B1 0F1 0U0", "1F0 1B0 1F1 1B1 1U0"))
    assert "0B1 comes before 0F1" in msg  # same-worker order is reported first
    validate(sched("0F0 0F1 0B1 0B0 0U0", "1F0 1B0 1F1 1B1 1U0"))  # odd but runs
    # a true cycle across workers: each waits for the other
    msg = error_of(sched("0F0 0B0 0F1 0B1 0U0", "1F1 1F0 1B0 1B1 1U0"))
    assert "deadlock: worker 0 waits at 0B0 for 1B0; worker 1 waits at 1F1 for 0F1" in msg
    assert msg.count("<-- ERROR HERE") == 2
    assert "never started" in msg


def test_simulate_refuses_a_deadlocked_schedule_with_the_grid():
    with pytest.raises(ScheduleError, match="deadlock") as info:
        simulate(sched("0F0 0B0 0F1 0B1 0U0", "1F1 1F0 1B0 1B1 1U0"))
    assert "w1 |" in str(info.value)


@pytest.mark.parametrize("rows, m, expected", [
    (("0F0 0F0 0B0 0U0", "1F0 1B0 1U0"), 1, "appears twice"),
    (("0F0 0B0 0U0 1F0", "1B0 1U0"), 1, "lives on worker 1"),
    (("0F0 0F2 0B0 0U0", "1F0 1B0 1U0"), 1, "valid microbatch indices are 0..0"),
    (("0F0 0B0 0U0 0U1", "1F0 1B0 1U0"), 1, "valid update indices are 0..0"),
    (("0F0 0F1 0B0 0U0", "1F0 1F1 1B0 1U0"), 2, "but not for 1"),
    (("0F0 0I0 0U0", "1F0 1B0 1U0"), 1, "runs 0I0 but no 0W0"),
    (("0F0 0B0 0I0 0W0 0U0", "1F0 1B0 1U0"), 1, "runs both 0B0 and 0I0"),
    (("0F0 0B0", "1F0 1B0 1U0"), 1, None),  # a stage may skip updates entirely
    (("0S0 0T0", "1S0 1T0"), 1, "no synthetic-gradient module"),
    (("0F0 0B0 0U0", "1F0 1U0"), 1, "0B0 needs 1B0, which no worker runs"),
])
def test_table_of_invalid_schedules(rows, m, expected):
    s = Schedule("hand", 2, 2, m, 1, 1, list(rows))
    if expected is None:
        validate(s)
        return
    with pytest.raises(ScheduleError, match=expected):
        validate(s)


def test_update_waits_for_the_step_backward():
    msg = error_of(sched("0F0 0U0 0B0", "1F0 1B0 1U0", m=1))
    assert "0U0 comes before 0B0" in msg and "update needs" in msg
