"""The forward-only pipeline's schedule (fwdgrad): its staircase, dependencies and idle time.

Closed form: with f per forward, free messages and D, U free, a step takes m + p - 1
forward slots (the last stage's last forward ends there; d comes back at once), so every
worker idles p - 1 slots per step and the bubble is (p-1)/(m+p-1), GPipe's, but over
forwards only. The flush repeats every step (each update needs all of the step's d), so
idle grows linearly with the steps. A message latency L adds p*L per step: p-1 hops
forward, one hop back for d.
"""

from __future__ import annotations

import textwrap

import pytest

from brigade.schedulers import (
    Action, Costs, Dependencies, ScheduleError, Schedule, build, lower, simulate, unlower,
    validate,
)


def grid(text: str) -> str:
    return textwrap.dedent(text).strip("\n")


def test_exact_staircase_two_steps():
    assert build("fwdgrad", 3, 2, steps=2).grid() == grid("""
        w0 | 0F0 0F1     0D0 0D1 0U0 0F2 0F3     0D2 0D3 0U1
        w1 |     1F0 1F1 1D0 1D1 1U0     1F2 1F3 1D2 1D3 1U1
        w2 |         2F0 2F1 2D0 2D1 2U0     2F2 2F3 2D2 2D3 2U1
        """)


def test_d_waits_for_the_last_stage_forward_and_u_for_every_d():
    s = build("fwdgrad", 4, 3, steps=2)
    deps = Dependencies(s)
    for stage in range(4):
        for j in range(6):
            assert deps.of(Action(stage, "D", j)) == (Action(3, "F", j),)
        assert deps.of(Action(stage, "U", 1)) == tuple(Action(stage, "D", j) for j in (3, 4, 5))
    assert "last stage's forward" in deps.rule(Action(0, "D", 0))


@pytest.mark.parametrize("p, m", [(1, 1), (2, 2), (2, 5), (3, 4), (4, 8), (5, 7), (8, 8)])
@pytest.mark.parametrize("steps", [1, 3])
def test_bubble_closed_form_and_idle_grows_with_steps(p, m, steps):
    tl = simulate(build("fwdgrad", p, m, steps=steps), Costs(f=1))
    assert tl.makespan == pytest.approx(steps * (m + p - 1))
    assert tl.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)
    for w in range(p):
        assert tl.idle(w) == pytest.approx(steps * (p - 1))
        assert tl.peak_activations(w) == 0  # nothing is kept for a backward


def test_backward_cost_does_not_matter_and_gpipe_bubble_is_the_same_fraction():
    """fwdgrad has no B: b changes gpipe's makespan, never fwdgrad's."""
    for b in (1, 2, 5):
        fg = simulate(build("fwdgrad", 4, 8), Costs(f=1, b=b))
        gp = simulate(build("gpipe", 4, 8), Costs(f=1, b=b))
        assert fg.makespan == pytest.approx(11)
        assert gp.makespan == pytest.approx(11 * (1 + b))
        assert fg.bubble_fraction == pytest.approx(gp.bubble_fraction)


@pytest.mark.parametrize("steps", [1, 3])
def test_latency_adds_p_hops_per_step_and_d_costs_no_bandwidth(steps):
    p, m, lat = 3, 4, 0.5
    slow = simulate(build("fwdgrad", p, m, steps=steps), Costs(f=1, latency=lat))
    assert slow.makespan == pytest.approx(steps * (m + p - 1 + p * lat))
    # bytes: activations forward are charged (0.5 per hop), d (a few scalars) is not
    wire = Costs(f=1, latency=lat, activation_bytes=100, bandwidth=200)
    sent = simulate(build("fwdgrad", p, m, steps=steps), wire)
    assert sent.makespan == pytest.approx(steps * (m + p - 1 + (p - 1) * (lat + 0.5) + lat))
    lowered = simulate(lower(build("fwdgrad", p, m, steps=steps)), wire)
    sends = [e for e in lowered.events if e.category == "send"]
    assert {e.kind for e in sends} == {"SF", "SB"}
    assert all(e.duration == 0 for e in sends if e.kind == "SB")
    assert all(e.duration == pytest.approx(0.5) for e in sends if e.kind == "SF")
    plain = simulate(lower(build("fwdgrad", p, m, steps=steps)), Costs(f=1, latency=lat))
    assert plain.makespan == pytest.approx(slow.makespan)


def test_lowering_sends_d_once_from_the_last_stage_to_every_stage():
    s = lower(build("fwdgrad", 3, 1))
    assert [str(a) for a in s.workers[2]] == ["2RF0", "2F0", "2SB0", "2D0", "2U0"]
    assert [str(a) for a in s.workers[0]] == ["0F0", "0SF0", "0RB0", "0D0", "0U0"]
    assert [str(a) for a in s.workers[1]] == ["1RF0", "1F0", "1SF0", "1RB0", "1D0", "1U0"]
    deps = Dependencies(s)
    assert deps.of(Action(0, "RB", 0)) == (Action(2, "SB", 0),)
    validate(s)
    assert unlower(s) == build("fwdgrad", 3, 1)


def test_validation_catches_a_missing_d_and_a_d_before_its_forward():
    good = build("fwdgrad", 2, 2)
    rows = [list(r) for r in good.workers]
    rows[0].remove(Action(0, "D", 1))
    with pytest.raises(ScheduleError, match="runs D for some microbatches of step 0"):
        validate(Schedule("fwdgrad", 2, 2, 2, 1, 1, rows))
    rows = [list(r) for r in good.workers]
    rows[1] = [Action(1, "D", 0)] + [a for a in rows[1] if a != Action(1, "D", 0)]
    with pytest.raises(ScheduleError, match="move 1D0 after 1F0"):
        validate(Schedule("fwdgrad", 2, 2, 2, 1, 1, rows))


def test_one_stage_per_worker():
    with pytest.raises(ScheduleError, match="virtual must be 1"):
        build("fwdgrad", 2, 4, virtual=2)
