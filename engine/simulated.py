"""A measured run beside the simulation of its own schedule with its own costs.

Why in every report: a bubble or a throughput alone does not say whether the engine did
well. The simulator runs the same schedule (same workers, microbatches and steps) with the
per-stage mean costs and the message latency the run measured
(:func:`brigade.schedulers.costs_from_timeline`, as ``brigade report`` does from a trace):
what remains between the two is overhead beyond compute and messages (driver round trips,
contention), and the latency's share of the simulated time says when messages, not
compute, set the pace.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from brigade.schedulers import Timeline, costs_from_timeline, predict

__all__ = ["simulated_figures", "LATENCY_DOMINATES"]

LATENCY_DOMINATES = 0.2  # a latency share above this is worth a line of its own


def simulated_figures(measured: Timeline) -> dict[str, Any] | None:
    """``bubble_fraction``, ``samples_per_s``, ``makespan_s`` of the simulated run, the
    ``latency_s`` per hand-off it used and ``latency_share``: the part of its makespan that
    goes away with zero latency. None when the run has no compute events to cost."""
    if not measured.compute_events():
        return None
    costs = costs_from_timeline(measured)
    sim = predict(measured, costs)
    share = 0.0
    if costs.latency > 0 and sim.makespan > 0:
        free = predict(measured, replace(costs, latency=0.0))
        share = max(0.0, 1.0 - free.makespan / sim.makespan)
    return {
        "bubble_fraction": sim.bubble_fraction,
        "samples_per_s": sim.throughput,
        "makespan_s": sim.makespan,
        "latency_s": costs.latency,
        "latency_share": share,
        "idle_fraction": [sim.idle_fraction(w) for w in range(sim.num_workers)],
    }
