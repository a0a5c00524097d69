"""Costs recovered from a measured timeline: a simulated run round-trips, sends are priced
by their transfer, not by the time they spent waiting for the receiver."""

import pytest

from brigade.schedulers import Costs, build, simulate
from brigade.schedulers.calibrate import costs_from_timeline, predict
from brigade.schedulers.timeline import Event, Timeline


def _simulated(name="1f1b", costs=None, steps=1):
    sched = build(name, stages=2, microbatches=4, steps=steps)
    tl = simulate(sched, costs or Costs(f=[1.0, 2.0], b=[2.0, 4.0]))
    tl.meta.update(schedule=name, stages=2, microbatches=4, virtual=1, steps=steps)
    return tl


def test_costs_round_trip_from_a_simulated_timeline():
    tl = _simulated()
    costs = costs_from_timeline(tl)
    assert costs.f == pytest.approx([1.0, 2.0])
    assert costs.b == pytest.approx([2.0, 4.0])
    assert predict(tl).throughput == pytest.approx(tl.throughput)


def test_a_send_costs_its_transfer_not_its_wait():
    """Three 0.1 s sends and one that waited 10 s for its receiver: the cost is 0.1."""
    tl = _simulated()
    sends = [e for e in tl.events if e.stage == 0 and e.kind == "F" and e.category == "compute"]
    extra = []
    for i, e in enumerate(sends):
        extra.append(Event(e.worker, e.stage, "F", e.microbatch, e.end, e.end + (10.0 if i == 0 else 0.1), "send"))
    measured = Timeline(tl.events + extra, tl.num_workers, tl.samples, dict(tl.meta))
    assert costs_from_timeline(measured).f[0] == pytest.approx(1.1)


@pytest.mark.parametrize("name", ["gpipe", "zb1p", "dni", "petra", "stale"])
def test_every_schedule_round_trips_its_own_simulation(name):
    """Actions that fold phases (DNI's S = f + b + u, PETRA's R = r + b) are charged once."""
    costs = Costs(f=[1.0, 2.0], b=[2.0, 3.0], u=[0.25, 0.5], sg=[0.5, 0.5], r=[1.0, 1.5])
    tl = _simulated(name, costs, steps=3)
    assert predict(tl).throughput == pytest.approx(tl.throughput, rel=1e-9)
