"""Costs recovered from a measured timeline: a simulated run round-trips, sends are priced
by their transfer, not by the time they spent waiting for the receiver."""

import pytest

from brigade.schedulers import Costs, build, simulate
from brigade.schedulers.calibrate import costs_from_timeline, predict
from brigade.schedulers.timeline import Event, Timeline


def _simulated(name="1f1b", costs=None, steps=1, **options):
    sched = build(name, stages=2, microbatches=4, steps=steps, **options)
    return simulate(sched, costs or Costs(f=[1.0, 2.0], b=[2.0, 4.0]))


def test_costs_round_trip_from_a_simulated_timeline():
    tl = _simulated()
    costs = costs_from_timeline(tl)
    assert costs.f == pytest.approx([1.0, 2.0])
    assert costs.b == pytest.approx([2.0, 4.0])
    assert predict(tl).throughput == pytest.approx(tl.throughput)


def test_sends_are_their_own_cost_and_not_busy_time():
    """Two 0.1 s sends and two that waited 10 s: the forward's compute stays 1.0, the stage's
    send cost is their mean (the run spent 20.2 s sending), and the simulation charges it as
    send spans after the compute: idle, as the measured bubble counts it."""
    tl = _simulated()
    forwards = [e for e in tl.events if e.stage == 0 and e.kind == "F" and e.category == "compute"]
    extra = []
    for i, e in enumerate(forwards):
        extra.append(Event(e.worker, e.stage, "F", e.microbatch, e.end, e.end + (10.0 if i < 2 else 0.1), "send"))
    measured = Timeline(tl.events + extra, tl.num_workers, tl.samples, dict(tl.meta))
    costs = costs_from_timeline(measured)
    assert costs.f[0] == pytest.approx(1.0) and costs.send == pytest.approx([5.05, 0.0])
    sim = predict(measured, costs)
    sends = [e for e in sim.events if e.category == "send"]
    assert [(e.stage, e.kind) for e in sends] == [(0, "F")] * 4  # one message per forward
    assert all(e.duration == pytest.approx(5.05) for e in sends)
    assert sim.busy(0) == pytest.approx(_simulated().busy(0))  # sends are not busy time


def test_a_run_with_send_costs_round_trips_its_own_simulation():
    """Simulated with per-message send costs, re-costed from its own timeline, simulated
    again: the same bubble and throughput; every message a worker boundary carries has a
    send span (1F1B on 2 stages: 4 forwards out of stage 0, 4 backwards out of stage 1)."""
    tl = _simulated(costs=Costs(f=[1.0, 2.0], b=[2.0, 4.0], send=[0.3, 0.2], latency=0.1))
    counts = {}
    for e in tl.events:
        if e.category == "send":
            counts[(e.stage, e.kind)] = counts.get((e.stage, e.kind), 0) + 1
    assert counts == {(0, "F"): 4, (1, "B"): 4}
    costs = costs_from_timeline(tl)
    assert costs.send == pytest.approx([0.3, 0.2])
    again = predict(tl, costs)
    assert again.bubble_fraction == pytest.approx(tl.bubble_fraction, rel=1e-9)
    assert again.throughput == pytest.approx(tl.throughput, rel=1e-9)
    plain = _simulated()
    assert tl.bubble_fraction > plain.bubble_fraction  # sending is idle, not busy


@pytest.mark.parametrize("name,options", [
    ("gpipe", {}), ("1f1b", {}), ("interleaved", {"virtual": 2}), ("zb1p", {}), ("dni", {}),
    ("petra", {}), ("stale", {"k": 3}), ("fwdgrad", {})])
def test_every_schedule_round_trips_its_own_simulation(name, options):
    """Actions that fold phases (DNI's S = f + b + u, PETRA's R = r + b) are charged once;
    interleaved is rebuilt on its workers, stale with its own k."""
    per = options.get("virtual", 1)  # model stages per worker
    costs = Costs(f=[1.0, 2.0] * per, b=[2.0, 3.0] * per, u=[0.25, 0.5] * per,
                  sg=[0.5, 0.5] * per, r=[1.0, 1.5] * per)
    tl = _simulated(name, costs, steps=3, **options)
    assert predict(tl).throughput == pytest.approx(tl.throughput, rel=1e-9)
