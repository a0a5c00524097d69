"""The simulator: a schedule plus costs gives the :class:`Timeline` the engine would record.

Discrete-event, in the engine's own terms: each worker executes its list in order; an
action starts when its worker is free and what it waits for (:mod:`.deps`) has finished,
plus ``latency + bytes / bandwidth`` when the edge crosses workers. Waits are recorded as
``"wait"`` events, so a simulated timeline reads like a measured one. An action's time is
its stage's cost of that kind, or, given ``durations``, what that very action took in a
profile (trace-driven: a schedule whose workers wait on each other runs slower than its
mean costs say when the costs vary, and replaying the profiled times keeps that).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from .actions import Action
from .costs import Costs
from .dataflow import run_in_order
from .deps import Dependencies
from .errors import ScheduleError
from .kinds import KINDS, kind_of
from .timeline import Event, Timeline
from .validate import validate

if TYPE_CHECKING:  # pragma: no cover
    from .schedule import Schedule

__all__ = ["simulate", "duration"]

def duration(action: Action, costs: Costs, deps: Dependencies | None = None) -> float:
    """How long ``action`` keeps its worker busy under resolved ``costs``: the sum of its
    kind's cost fields (:mod:`.kinds`) on its stage; a send, its bytes on the wire (``deps``
    sizes PETRA's double message); a receive nothing (the wait before it is the latency)."""
    kind = kind_of(action.kind)
    if kind.category == "send":
        return costs.transfer_time(_send_bytes(action, costs, deps))
    return sum(getattr(costs, name)[action.stage] for name in kind.cost)


def _send_bytes(send: Action, c: Costs, deps: Dependencies | None) -> float:
    """Bytes a lowered send puts on the wire."""
    if kind_of(send.kind).direction == "forward":
        return c.activation_bytes[send.stage]
    if send.stage == 0:
        return 0.0
    producer = deps.of(send)[0].kind if deps is not None else ""
    return _grad_bytes(send.stage - 1, producer, c)


def _grad_bytes(stage: int, producer_kind: str, c: Costs) -> float:
    """Bytes of what travels back to ``stage`` from an action of ``producer_kind``, in
    activations of its output (the kind's ``grad_size``: PETRA's R also sends the input
    back; fwdgrad's F sends d, a few scalars, charged as none)."""
    size = kind_of(producer_kind).grad_size if producer_kind in KINDS else 1.0
    return c.activation_bytes[stage] * size


def _delay(dep: Action, action: Action, deps: Dependencies, c: Costs) -> float:
    """Message time of the edge dep -> action (0 on one worker)."""
    if not deps.crosses(dep, action):
        return 0.0
    if kind_of(dep.kind).category == "send":  # lowered: the send already paid for the bytes
        return c.latency
    if dep.stage < action.stage:
        return c.message_time(c.activation_bytes[dep.stage])
    return c.message_time(_grad_bytes(action.stage, dep.kind, c))


def simulate(schedule: "Schedule", costs: Costs | None = None,
             durations: Mapping[Action, float] | None = None) -> Timeline:
    """Validate ``schedule``, run it under ``costs`` (default :class:`Costs`), and return the
    timeline; a deadlock raises :class:`ScheduleError` with the stuck actions marked.
    ``durations``: seconds of individual actions (``calibrate.action_seconds`` of a profile),
    used instead of their stage's cost where given."""
    validate(schedule)
    c = (costs or Costs()).resolve(schedule.num_stages, schedule.name)
    deps = Dependencies(schedule)
    given = durations or {}
    sending = _sending(schedule, deps, c)
    run = run_in_order(
        schedule,
        duration=lambda a: given[a] if a in given else duration(a, c, deps) + sending.get(a, 0.0),
        delay=lambda d, a: _delay(d, a, deps, c),
        deps=deps,
    )
    if run.deadlocked:  # validate() has already said why; this guards the invariant
        raise ScheduleError("deadlock while simulating\n" + schedule.grid(
            marks={a: "stuck" for a, _ in run.stuck.values()}))
    return Timeline(
        events=_events(schedule, run, sending),
        num_workers=schedule.num_workers,
        samples=schedule.total_microbatches * c.microbatch_size,
        meta=_meta(schedule, c),
    )


def _sending(schedule: "Schedule", deps: Dependencies, c: Costs) -> dict[Action, float]:
    """Seconds each unlowered action spends sending: ``send`` of its stage per worker-
    crossing message, one per stage that consumes it (a lowered send pays for itself)."""
    if not any(c.send):
        return {}
    to: dict[Action, set[int]] = {}
    for row in schedule.workers:
        for a in row:
            for dep in deps.of(a):
                if kind_of(dep.kind).category != "send" and deps.crosses(dep, a):
                    to.setdefault(dep, set()).add(a.stage)
    return {a: c.send[a.stage] * len(stages) for a, stages in to.items()}


def _events(schedule: "Schedule", run, sending: Mapping[Action, float]) -> list[Event]:
    """Compute/send/recv spans (an action's sends after its compute, as the engine
    records them), and a wait span wherever a worker sat before an action."""
    events = []
    for w, row in enumerate(schedule.workers):
        free = 0.0
        for a in row:
            start, end = run.start[a], run.end[a]
            if start > free:
                events.append(Event(w, a.stage, a.kind, a.microbatch, free, start, "wait"))
            split = max(start, end - sending.get(a, 0.0))
            events.append(Event(w, a.stage, a.kind, a.microbatch, start, split,
                                kind_of(a.kind).category))
            if split < end:
                events.append(Event(w, a.stage, a.kind, a.microbatch, split, end, "send"))
            free = end
    return events


def _meta(schedule: "Schedule", c: Costs) -> dict:
    """What the reports need besides the events."""
    return {
        "source": "simulated",
        "schedule": schedule.name,
        "stages": schedule.num_stages,
        "workers": schedule.num_workers,
        "microbatches": schedule.microbatches,
        "virtual": schedule.virtual,
        "steps": schedule.steps,
        "schedule_options": dict(schedule.options),
        "stores_activations": list(c.stores_activations),
        "activation_bytes": list(c.activation_bytes),
        "costs": c.to_dict(),
    }
