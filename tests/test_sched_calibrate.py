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


def test_a_send_costs_its_transfer_not_its_wait():
    """Two 0.1 s sends and two that waited 10 s for their receiver: the cost is 0.1 (the
    lower quartile; a median would say 5.05, a mean 5.05)."""
    tl = _simulated()
    forwards = [e for e in tl.events if e.stage == 0 and e.kind == "F" and e.category == "compute"]
    extra = []
    for i, e in enumerate(forwards):
        extra.append(Event(e.worker, e.stage, "F", e.microbatch, e.end, e.end + (10.0 if i < 2 else 0.1), "send"))
    measured = Timeline(tl.events + extra, tl.num_workers, tl.samples, dict(tl.meta))
    assert costs_from_timeline(measured).f[0] == pytest.approx(1.1)


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
