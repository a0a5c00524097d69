"""From a measured run to the costs that explain it, and the simulation they predict.

A measured :class:`Timeline` (from the engine) holds every action's span. Its per-stage
means of each kind are the profiled costs; the message latency is the mean gap between
a producer finishing its send and the waiting consumer starting (mean, as for the costs:
the latencies on a run's critical path add up), and each stage's sends cost their mean
span, charged as send spans of their own (communication, not busy time, as the run counts
them). Simulating the same schedule with those costs
gives the prediction a measured run is compared with (``brigade report``): where they
differ, the difference is the engine's overhead beyond compute and messages (driver round
trips between steps, contention) and the spread of the costs around their means, which a
schedule whose workers wait on each other pays and a simulation of means does not.
:func:`action_seconds` keeps each action's own time, for a trace-driven simulation of a
profile (``Pipeline.profile``) that keeps that spread.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from .actions import Action
from .costs import LINKED_FIELDS, Costs
from .deps import Dependencies
from .kinds import kind_of, kinds
from .registry import build
from .schedule import Schedule
from .simulate import simulate
from .timeline import Event, Timeline

__all__ = ["costs_from_spans", "costs_from_timeline", "schedule_of", "predict",
           "action_seconds", "predict_from_profile"]


def _fields() -> dict[str, str]:
    """The Costs field a measured span of each kind calibrates (the kinds' ``measured_as``;
    DNI's S folds forward, backward and update: charged as f)."""
    return {k.code: k.measured_as for k in kinds() if k.measured_as}


def schedule_of(timeline: Timeline) -> Schedule:
    """The schedule a run executed (measured or simulated), rebuilt from its metadata;
    ``build`` takes workers, which traces written before ``meta["workers"]`` existed kept
    under ``"stages"``."""
    meta = timeline.meta
    return build(
        meta["schedule"], stages=int(meta.get("workers", meta["stages"])),
        microbatches=int(meta["microbatches"]),
        virtual=int(meta.get("virtual", 1)), steps=max(1, int(meta.get("steps", 1))),
        **meta.get("schedule_options", {}),
    )


def _means(events: list[Event]) -> dict[tuple[int, str], float]:
    """Mean duration per (stage, kind) of compute events.

    Means, not medians: the prediction should reproduce the run's total busy time.
    """
    spans: dict[tuple[int, str], list[float]] = defaultdict(list)
    for e in events:
        if e.category == "compute":
            spans[(e.stage, e.kind)].append(e.duration)
    return {key: statistics.fmean(v) for key, v in spans.items()}


def _send_costs(events: list[Event], stages: int) -> list[float]:
    """Per stage, what one message it sends costs its sender (``Costs.send``; 0 where it
    sent none): the mean send span, waits included. A simulated send is a span of its own,
    not busy time, as in the measured run; so the mean reproduces the worker's
    communication time, whether the span was copying (the same-host ring) or waiting for
    the receiver to post its receive (gloo between hosts)."""
    spans: dict[int, list[float]] = defaultdict(list)
    for e in events:
        if e.category == "send" and 0 <= e.stage < stages:
            spans[e.stage].append(e.duration)
    return [statistics.fmean(spans[s]) if spans.get(s) else 0.0 for s in range(stages)]


def _latency(timeline: Timeline, schedule: Schedule) -> float:
    """Mean delay from a producer's last byte sent to the blocked consumer's start."""
    deps = Dependencies(schedule)
    m = schedule.microbatches
    released: dict[tuple[int, str, int], list[float]] = defaultdict(list)
    for e in timeline.events:  # a compute span, then its send if it made one
        if e.category in ("compute", "send"):
            released[(e.stage, e.kind, e.microbatch)].append(e.end)
    samples = []
    for e in timeline.events:
        if e.category != "wait" or kind_of(e.kind).index == "update":
            continue
        for dep in deps.of(Action(e.stage, e.kind, e.microbatch % m if m else 0)):
            if not deps.crosses(dep, Action(e.stage, e.kind, 0)):
                continue
            inside = [t for t in released.get((dep.stage, dep.kind, e.microbatch), ())
                      if e.start <= t <= e.end]
            if inside:
                samples.append(e.end - max(inside))
    return statistics.fmean(samples) if samples else 0.0


def _folded(seconds: dict[tuple[int, str], float], n: int) -> dict[str, list[float]]:
    """Zero the parts an action that folds several phases already paid for.

    The simulator charges a kind the sum of its cost fields (DNI's S: f + b + u; PETRA's R:
    r + b) but a measured span is the whole of it, charged to one field (``measured_as``).
    Each other field it folds is 0 unless a kind that ran is measured as that field (or one
    linked to it: b, i, w), rather than its default (b = 2f; r = f).
    """
    present = {k for _, k in seconds}
    measured = {kind_of(k).measured_as for k in present}
    out: dict[str, list[float]] = {}
    for code in present:
        kind = kind_of(code)
        for name in kind.cost:
            linked = LINKED_FIELDS.get(name, (name,))
            if name != kind.measured_as and not measured & set(linked):
                out.update({x: [0.0] * n for x in linked})
    return out


def costs_from_spans(seconds: dict[tuple[int, str], float], stages: int, **others) -> Costs:
    """Costs from each (stage, action kind)'s seconds, measured or profiled: every kind
    charged to its field (the kinds' ``measured_as``), folded actions charged once (``_folded``); a kind a
    stage never ran costs it 0. ``others`` are further Costs fields (latency, ...)."""
    fields: dict[str, list[float]] = {}
    for kind, name in _fields().items():
        values = [seconds.get((s, kind)) for s in range(stages)]
        if any(v is not None for v in values) and name not in fields:
            fields[name] = [v or 0.0 for v in values]
    if "i" in fields and "b" not in fields:
        fields["w"] = fields.get("w", [0.0] * stages)
    fields.update(_folded(seconds, stages))
    return Costs(**fields, **others)


def costs_from_timeline(timeline: Timeline, latency: float | None = None) -> Costs:
    """Per-stage mean costs and the message latency of a measured run (``latency``, where
    given, instead: a profile never waits, so it has none of its own)."""
    schedule = schedule_of(timeline)
    total_mb = schedule.microbatches * max(1, int(timeline.meta.get("steps", 1)))
    return costs_from_spans(
        _means(timeline.events), schedule.num_stages,
        send=_send_costs(timeline.events, schedule.num_stages),
        latency=_latency(timeline, schedule) if latency is None else latency,
        microbatch_size=timeline.samples / total_mb if total_mb else 1,
    )


def action_seconds(timeline: Timeline) -> dict[Action, float]:
    """Each action's own seconds in ``timeline``: its compute span plus its sends' spans.
    Made for a profile (``Pipeline.profile``), where nobody waits, so a span is a cost; in a
    measured run a blocking send's span also holds its wait for the receiver."""
    out: dict[Action, float] = defaultdict(float)
    for e in timeline.events:
        if e.category in ("compute", "send") and e.microbatch >= 0:
            out[Action(e.stage, e.kind, e.microbatch)] += e.duration
    return dict(out)


def predict(timeline: Timeline, costs: Costs | None = None,
            durations: dict[Action, float] | None = None) -> Timeline:
    """Simulate the schedule a measured run executed, with the costs it measured
    (``costs``: ``costs_from_timeline(timeline)`` when the caller has it already), and
    ``durations`` of individual actions where given (see :func:`action_seconds`)."""
    tl = simulate(schedule_of(timeline), costs or costs_from_timeline(timeline), durations)
    tl.meta["source"] = "simulated"
    return tl


def predict_from_profile(run: Timeline, profile: Timeline, latency: float | None = None) -> Timeline:
    """Simulate the schedule ``run`` executed from ``profile`` (``Pipeline.profile`` of as
    many steps): each action's own profiled time, the profile's means where one is missing,
    and ``latency`` (default: ``run``'s own, which a profile that never waits cannot see)."""
    if latency is None:
        latency = _latency(run, schedule_of(run))
    return predict(run, costs_from_timeline(profile, latency), action_seconds(profile))
