"""The simulator against closed forms (unit costs, free messages) and its cost model.

Closed forms: with zero communication, u = 0 and equal stages, GPipe and 1F1B take
(m+p-1)(f+b) per step and interleaved (m a multiple of p, chunk costs (f+b)/v) takes
(v*m+p-1)(f+b)/v, so the bubbles are (p-1)/(m+p-1) and (p-1)/(v*m+p-1) exactly, for any
ratio b/f (tested with b = f and b = 2f).
"""

from __future__ import annotations

import math

import pytest

from brigade.schedulers import Costs, ScheduleError, build, lower, simulate

UNIT = Costs(f=1, b=1)
SIZES = [(2, 2), (2, 5), (3, 4), (4, 4), (4, 8), (4, 16), (5, 7), (8, 8)]


@pytest.mark.parametrize("costs", [UNIT, Costs(f=1, b=2)], ids=["b=f", "b=2f"])
@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p, m", SIZES)
def test_gpipe_and_1f1b_bubble_closed_form(name, p, m, costs):
    tl = simulate(build(name, p, m), costs)
    assert tl.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)
    f, b = 1.0, costs.b
    assert tl.makespan == pytest.approx((m + p - 1) * (f + b))


@pytest.mark.parametrize("costs", [UNIT, Costs(f=1, b=2)], ids=["b=f", "b=2f"])
@pytest.mark.parametrize("v", [2, 3, 4])
@pytest.mark.parametrize("p, k", [(2, 1), (2, 3), (3, 2), (4, 1), (4, 2), (4, 3)])
def test_interleaved_bubble_closed_form(p, k, v, costs):
    m = k * p  # m a multiple of p
    tl = simulate(build("interleaved", p, m, virtual=v), costs.chunked(p, v))
    assert tl.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1), abs=1e-12)


@pytest.mark.parametrize("p, m", [(2, 4), (3, 6), (4, 8), (4, 16)])
def test_zb1p_bubble_is_a_third_of_1f1b_with_equal_f_i_w(p, m):
    """ZB-H1's bubble is (p-1)(f+i-w): with f = i = w = 1 it is (p-1) of 3m+p-1."""
    tl = simulate(build("zb1p", p, m), Costs(f=1, i=1, w=1))
    assert tl.bubble_fraction == pytest.approx((p - 1) / (3 * m + p - 1))
    one = simulate(build("1f1b", p, m), Costs(f=1, b=2))
    assert tl.idle(0) == pytest.approx(one.idle(0) / 3)


@pytest.mark.parametrize("p, m", [(2, 2), (3, 4), (4, 8), (4, 3), (5, 12)])
def test_peak_activations_1f1b_is_min_p_minus_s_m_and_gpipe_is_m(p, m):
    if m >= p:
        one = simulate(build("1f1b", p, m), UNIT)
        assert [one.peak_activations(s) for s in range(p)] == [min(p - s, m) for s in range(p)]
    gp = simulate(build("gpipe", p, m), UNIT)
    assert [gp.peak_activations(s) for s in range(p)] == [m] * p


def test_peak_activations_of_decoupled_and_split_schedules():
    p, m = 4, 8
    dni = simulate(build("dni", p, m, steps=3), UNIT)
    assert [dni.peak_activations(s) for s in range(p)] == [1] * p  # S frees its own
    petra = simulate(build("petra", p, m, steps=3), UNIT)
    assert [petra.peak_activations(s) for s in range(p)] == [0] * p  # reversible stages
    stored = simulate(build("petra", p, m), Costs(f=1, b=1, stores_activations=True))
    assert [stored.peak_activations(s) for s in range(p)] == [2 * (p - 1 - s) + 1
                                                              for s in range(p)]
    zb = simulate(build("zb1p", p, m), UNIT)  # held until W
    assert [zb.peak_activations(s) for s in range(p)] == [p] * p


@pytest.mark.parametrize("name", ["dni", "petra"])
def test_decoupled_idle_per_worker_does_not_grow_with_steps(name):
    idle = {S: [simulate(build(name, 4, 8, steps=S), UNIT).idle(w) for w in range(4)]
            for S in (1, 3, 10)}
    assert idle[3] == pytest.approx(idle[1])
    assert idle[10] == pytest.approx(idle[1])
    assert max(idle[10]) > 0  # the fill and drain, paid once


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zb1p"])
def test_flush_schedules_idle_grows_linearly_with_steps(name):
    one = [simulate(build(name, 4, 8, steps=1), UNIT).idle(w) for w in range(4)]
    for S in (2, 5, 10):
        many = [simulate(build(name, 4, 8, steps=S), UNIT).idle(w) for w in range(4)]
        assert many == pytest.approx([S * x for x in one])


def test_decoupled_bubble_falls_like_p_over_sm():
    """Fill and drain paid once: the bubble over S steps is (p-1)/(S*m+p-1)."""
    for S in (1, 4, 10):
        tl = simulate(build("dni", 4, 8, steps=S), UNIT)
        assert tl.bubble_fraction == pytest.approx(3 / (S * 8 + 3))


def test_stale_runs_gpipe_steps_every_k_and_forward_only_between():
    gp = simulate(build("gpipe", 3, 4, steps=1), UNIT)
    st = simulate(build("stale", 3, 4, steps=1, k=4), UNIT)
    assert st.makespan == gp.makespan
    many = simulate(build("stale", 3, 4, steps=4, k=4), UNIT)
    assert many.makespan < 4 * gp.makespan  # forward-only steps are cheaper and do not flush


def test_latency_and_bandwidth_delay_messages_between_workers():
    base = simulate(build("gpipe", 2, 1), Costs(f=1, b=1))
    slow = simulate(build("gpipe", 2, 1), Costs(f=1, b=1, latency=0.5))
    assert slow.makespan == pytest.approx(base.makespan + 2 * 0.5)  # one hop each way
    wire = simulate(build("gpipe", 2, 1),
                    Costs(f=1, b=1, activation_bytes=100, bandwidth=200))
    assert wire.makespan == pytest.approx(base.makespan + 2 * 0.5)
    free = simulate(build("gpipe", 2, 1),
                    Costs(f=1, b=1, activation_bytes=100, bandwidth=math.inf))
    assert free.makespan == base.makespan


def test_waits_are_recorded_but_do_not_count_as_busy():
    tl = simulate(build("gpipe", 3, 2), UNIT)
    waits = [e for e in tl.events if e.category == "wait"]
    assert waits and all(e.duration > 0 for e in waits)
    assert tl.busy(2) == pytest.approx(4.0)


@pytest.mark.parametrize("name", ["1f1b", "interleaved", "dni", "petra"])
def test_lowered_schedule_simulates_the_same_with_latency_only(name):
    v = 2 if name == "interleaved" else 1
    s = build(name, 3, 6, virtual=v, steps=2)
    c = Costs(f=1, b=2, latency=0.25, sg=0.5)
    plain, low = simulate(s, c), simulate(lower(s), c)
    assert low.makespan == pytest.approx(plain.makespan)
    assert any(e.category == "recv" for e in low.events)


def test_costs_resolution_rules():
    c = Costs(f=[1, 2], b=4).resolve(2)
    assert (c.i, c.w, c.r) == ([2, 2], [2, 2], [1, 2])
    c = Costs(f=1, i=1, w=3).resolve(2)
    assert c.b == [4, 4]
    c = Costs(f=1).resolve(3)
    assert (c.b, c.i, c.w) == ([2, 2, 2], [1, 1, 1], [1, 1, 1])
    assert Costs().resolve(2, "petra").stores_activations == [False, False]
    assert Costs().resolve(2, "gpipe").stores_activations == [True, True]


def test_costs_parse_and_profile():
    c = Costs.parse("f=1,b=2,u=0.1,latency=0.05, f=1:2:1:1,stores_activations=1:0:0:1")
    assert c.f == [1, 2, 1, 1] and c.b == 2 and c.u == 0.1 and c.latency == 0.05
    assert c.stores_activations == [True, False, False, True]
    p = Costs.from_profile([0.1, 0.2], [0.2, 0.4], latency=0.01)
    assert p.resolve(2).i == [0.1, 0.2]
    split = Costs.from_profile([0.1, 0.2], [0.2, 0.4], [0.0, 0.3], [0.2, 0.25]).resolve(2)
    assert split.i == [0.0, 0.3] and split.w == [0.2, 0.25] and split.b == [0.2, 0.4]
    with pytest.raises(ScheduleError, match="2 forward times but 1 W times"):
        Costs.from_profile([0.1, 0.2], [0.2, 0.4], [0.1, 0.2], [0.1])


@pytest.mark.parametrize("text, expected", [
    ("f", "write key=value"),
    ("flops=3", "write key=value with keys f, b"),
    ("f=fast", "expected a number"),
    ("f=-1", "finite number >= 0"),
    ("f=1:2,b=1:2:3", "differ in length"),
    ("stores_activations=maybe", "1/0 or true/false"),
    ("microbatch_size=0", "microbatch_size must be > 0"),
])
def test_bad_costs_say_what_works(text, expected):
    with pytest.raises(ScheduleError, match=expected):
        Costs.parse(text)


def test_cost_list_must_match_stages():
    with pytest.raises(ScheduleError, match="give 3 values"):
        simulate(build("gpipe", 3, 3), Costs(f=[1, 2]))


def test_given_durations_replace_their_actions_cost_and_keep_the_spread():
    """Trace-driven: each given action takes its own time. Durations equal to the costs
    change nothing; costs that vary around the same mean (one F of stage 0 slow, one fast)
    cost a 1F1B pipeline more than their mean does, which is why a profile is replayed
    action by action rather than averaged: p=2, m=4, f=1, b=2, stage 0's F of microbatch 1
    has 2 of slack (stage 0 waits for B of 0 until t=4), its F of 2 is on the critical path
    (stage 1 is free for it at t=7, when it ends)."""
    from brigade.schedulers import Action
    from brigade.schedulers.calibrate import action_seconds

    sched, costs = build("1f1b", 2, 4), Costs(f=1, b=2)
    base = simulate(sched, costs)
    same = simulate(sched, costs, durations=action_seconds(base))
    assert same.makespan == base.makespan and same.events == base.events
    spread = {Action(0, "F", 1): 0.5, Action(0, "F", 2): 1.5}  # mean still 1
    varied = simulate(sched, costs, durations=spread)
    assert varied.makespan > base.makespan
    assert varied.makespan == pytest.approx(base.makespan + 0.5)
