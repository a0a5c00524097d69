"""The table of action kinds: the public kind sets are views of it, and a kind registered
from outside the package is known to every pass (parse, deps, validate, simulate, lower,
plot colours) without editing them."""

from __future__ import annotations

import pytest

from brigade.schedulers import (
    BACKWARD_KINDS, COMPUTE_KINDS, FORWARD_KINDS, KIND_NAMES, KINDS, Action, Costs,
    Dependencies, Schedule, ScheduleError, build, lower, simulate, validate,
)
from brigade.schedulers.kinds import (
    ActionKind, Need, kind_of, kinds, register_action_kind, unregister_action_kind,
)
from brigade.schedulers.plot import KIND_COLORS
from brigade.schedulers.simulate import duration


def test_public_sets_are_read_off_the_table():
    table = {k.code: k for k in kinds()}
    assert set(KINDS) == set(table)
    assert FORWARD_KINDS == {c for c, k in table.items() if k.forward} == {"F", "S"}
    assert BACKWARD_KINDS == {"B", "I", "W", "R", "T", "D"}
    assert COMPUTE_KINDS == {"F", "B", "I", "W", "U", "S", "T", "R", "D"}
    assert dict(KIND_NAMES) == {c: k.label for c, k in table.items()}
    assert KINDS - COMPUTE_KINDS == {"SF", "RF", "SB", "RB"}  # set algebra gives frozensets


@pytest.mark.parametrize("code", ["F", "B", "I", "W", "U", "S", "T", "R", "D"])
def test_the_simulator_charges_each_kind_its_cost_fields(code):
    c = Costs(f=[1.0, 10.0], b=[2.0, 20.0], u=0.5, sg=0.25, r=[3.0, 30.0]).resolve(2)
    want = sum(getattr(c, name)[1] for name in kind_of(code).cost)
    assert duration(Action(1, code, 0), c) == want
    assert want > 0 or code == "D"


@pytest.fixture
def synthetic_input_kind():
    """A forward on a synthetic input: it waits for nothing from the previous stage."""
    kind = register_action_kind(ActionKind(
        "X", "forward on a synthetic input", "a synthetic-input forward waits for nothing",
        needs=(), forward=True, cost=("f",), measured_as="f", colour="#123456"))
    yield kind
    unregister_action_kind("X")


def test_a_registered_kind_is_known_to_every_pass(synthetic_input_kind):
    assert Action.parse("1X0") == Action(1, "X", 0)
    assert "X" in KINDS and "X" in FORWARD_KINDS and KIND_NAMES["X"].startswith("forward on")
    assert KIND_COLORS["X"] == "#123456"
    s = Schedule("synthetic", 2, 2, 2, 1, 1, ["0F0 0F1", "1X0 1X1"])
    validate(s)
    assert Dependencies(s).of(Action(1, "X", 0)) == ()
    # stage 1 starts at once instead of after stage 0's first forward
    tl = simulate(s, Costs(f=1.0))
    assert tl.makespan == 2.0 and tl.bubble_fraction == 0.0
    assert lower(s).workers == s.workers  # nothing crosses workers: no messages
    waiting = Schedule("plain", 2, 2, 2, 1, 1, ["0F0 0F1", "1F0 1F1"])
    assert simulate(waiting, Costs(f=1.0)).makespan == 3.0


def test_a_registered_kind_goes_away_again(synthetic_input_kind):
    unregister_action_kind("X")
    with pytest.raises(ScheduleError, match="unknown action kind 'X'"):
        Action(0, "X", 0)
    register_action_kind(synthetic_input_kind)  # for the fixture's clean-up


@pytest.mark.parametrize("make, message", [
    (lambda: ActionKind("x", "bad", "r"), "1 or 2 capital letters"),
    (lambda: ActionKind("QQQ", "bad", "r"), "1 or 2 capital letters"),
    (lambda: ActionKind("Q", "bad", "r", cost=("flops",)), "unknown cost field 'flops'"),
    (lambda: ActionKind("Q", "bad", "r", category="think"), "category 'think'"),
    (lambda: register_action_kind(ActionKind("F", "again", "r")), "already registered"),
    (lambda: register_action_kind(ActionKind("Q", "q", "r", needs=(Need("prev", ("Z",)),))),
     "waits for unknown kind 'Z'"),
    (lambda: Need("above", ("F",)), "Need.on 'above'"),
])
def test_bad_kinds_are_refused(make, message):
    with pytest.raises(ScheduleError, match=message):
        make()
    assert "Q" not in KINDS


def test_dependencies_follow_the_needs_of_the_table():
    s = build("zb1p", stages=3, microbatches=3)
    d = Dependencies(s)
    assert d.of(Action(1, "I", 0)) == (Action(1, "F", 0), Action(2, "I", 0))
    assert d.of(Action(2, "I", 0)) == (Action(2, "F", 0),)  # the last stage: own F only
    assert d.of(Action(1, "W", 0)) == (Action(1, "I", 0),)
    assert d.of(Action(0, "U", 0)) == tuple(
        Action(0, k, j) for j in range(3) for k in ("I", "W"))
    fg = lower(build("fwdgrad", stages=3, microbatches=2))
    assert Dependencies(fg).of(Action(0, "RB", 1)) == (Action(2, "SB", 1),)  # d: from the last
