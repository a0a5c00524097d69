"""Worker clocks against the driver's: exact on one host, least-in-flight round trip elsewhere."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from brigade.engine import Pipeline, clock


def test_the_quickest_round_trip_sets_the_offset():
    # (sent, remote reading, answered): the 2nd is the quickest (1 ms in flight)
    pings = [(0.0, 10.004, 0.010), (1.0, 11.0006, 1.001), (2.0, 12.003, 2.004)]
    assert clock.offset_from_pings(pings) == pytest.approx(10.0001)
    with pytest.raises(ValueError, match="at least one"):
        clock.offset_from_pings([])


def test_a_process_on_the_same_clock_has_offset_zero_whatever_its_answer_took():
    def slow_same_clock():  # the reply arrives late, skewing a midpoint estimate by 5 ms
        t = time.perf_counter()
        time.sleep(0.01)
        return t, clock.clock_id()

    assert clock.measure_offset(slow_same_clock) == 0.0


def test_another_clock_is_estimated_within_half_the_quickest_round_trip():
    calls = []

    def shifted():  # a clock 5 s ahead on some other host
        calls.append(1)
        return time.perf_counter() + 5.0, "other-host/0"

    est = clock.measure_offset(shifted, pings=4)
    assert len(calls) == 4
    assert est == pytest.approx(5.0, abs=1e-3)


def test_clock_id_is_stable_and_names_the_boot():
    assert clock.clock_id.__wrapped__() == clock.clock_id()  # read again, not the cached
    with open("/proc/sys/kernel/random/boot_id") as f:
        assert clock.clock_id().startswith(f.read().strip())


@pytest.mark.ray
def test_ray_actors_on_the_drivers_host_share_its_clock(ray_cluster):
    """Every actor of a local cluster reads the driver's clock: offsets are exactly 0, so a
    measured message latency carries no offset error."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with Pipeline(model, stages=2, microbatches=2, loss_fn=nn.CrossEntropyLoss(),
                  optimizer=lambda p: torch.optim.SGD(p, lr=0.1), cpus_per_stage=1) as pipe:
        assert pipe._backend.clock_offsets() == [0.0, 0.0]
        pipe.step(torch.randn(4, 4), torch.tensor([0, 1, 0, 1]))
        tl = pipe.timeline()
        # on the one clock, stage 1 starts a forward after its activation's send began (not
        # after it ended: the receiver may start while the sender is still returning)
        sent = {e.microbatch: e.start for e in tl.events if e.category == "send" and e.stage == 0}
        first_f = {e.microbatch: e.start for e in tl.events
                   if e.category == "compute" and e.stage == 1 and e.kind == "F"}
        assert len(sent) == 2 and all(first_f[j] >= sent[j] for j in sent)
