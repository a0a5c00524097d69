"""Timeline: what ran where and when, simulated or measured, and the figures read off it.

The simulator and the engine both produce a :class:`Timeline`, so a prediction and a
measured run print side by side. Metrics use compute events only, over the window from
the first compute start to the last compute end:

- ``busy(w)``: time worker w spends inside compute events; ``idle(w) = makespan - busy(w)``;
- ``bubble_fraction`` = total idle / (workers x makespan) = 1 - ideal / makespan;
- ``throughput`` = samples / makespan = (1 - bubble) / work per sample (compute time per
  sample per worker);
- ``peak_activations(s)``: the most microbatches whose activations stage s holds at once.
  A microbatch is held from the start of its forward (a forward kind: F, or DNI's S) to
  the end of the last action that frees them (B, I, W or R: the kinds' ``frees``; for S,
  and for a forward-only F, the forward itself). Stages with ``meta["stores_activations"][s]`` false hold nothing.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import ScheduleError
from .kinds import FORWARD_KINDS, FREEING_KINDS

__all__ = ["Event", "Timeline", "CATEGORIES"]

CATEGORIES = ("compute", "wait", "send", "recv")


@dataclass(frozen=True)
class Event:
    """One span on one worker: an action's compute, a wait for a message, a send or a
    receive (``category``); times in seconds (or the costs' unit)."""

    worker: int
    stage: int
    kind: str
    microbatch: int
    start: float
    end: float
    category: str = "compute"

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise ScheduleError(f"event {self.label} on worker {self.worker} ends "
                                f"({self.end}) before it starts ({self.start})")
        if self.category not in CATEGORIES:
            raise ScheduleError(f"event category {self.category!r} is not one of "
                                f"{', '.join(CATEGORIES)}")

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def label(self) -> str:
        """The action's text form, ``1F3``."""
        return f"{self.stage}{self.kind}{self.microbatch}"


def _event(item: Any) -> Event:
    """An Event from an Event, a dict (JSON) or a tuple in field order."""
    if isinstance(item, Event):
        return item
    if isinstance(item, Mapping):
        return Event(**item)
    return Event(*item)


@dataclass
class Timeline:
    """Events of a run on ``num_workers`` workers that processed ``samples`` samples.

    ``meta`` carries the schedule name, stages, workers, microbatches, virtual,
    schedule_options, steps, source ("simulated", "measured" or "profiled"), and optionally
    ``stores_activations`` and ``activation_bytes`` per stage.
    """

    events: list[Event]
    num_workers: int
    samples: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.events = [_event(e) for e in self.events]
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) \
                or self.num_workers < 1:
            raise ScheduleError(f"num_workers must be a positive integer, got "
                                f"{self.num_workers!r}")
        bad = [e for e in self.events if not 0 <= e.worker < self.num_workers]
        if bad:
            raise ScheduleError(f"event {bad[0].label} is on worker {bad[0].worker}, but the "
                                f"timeline has workers 0..{self.num_workers - 1}")
        self.meta = dict(self.meta)

    # -- the window --------------------------------------------------------------------------
    def compute_events(self, worker: int | None = None) -> list[Event]:
        """Compute events (of one worker, or all)."""
        return [e for e in self.events if e.category == "compute"
                and (worker is None or e.worker == worker)]

    @property
    def window(self) -> tuple[float, float]:
        """(first compute start, last compute end); (0, 0) when nothing was computed."""
        comp = self.compute_events()
        if not comp:
            return 0.0, 0.0
        return min(e.start for e in comp), max(e.end for e in comp)

    @property
    def makespan(self) -> float:
        t0, t1 = self.window
        return t1 - t0

    @property
    def num_stages(self) -> int:
        """Stages seen in the events, or named in ``meta["stages"]``, whichever is more."""
        seen = max((e.stage + 1 for e in self.events), default=0)
        return max(seen, int(self.meta.get("stages", 0)))

    # -- busy and idle ---------------------------------------------------------------------
    def busy(self, worker: int) -> float:
        """Time inside compute events on ``worker`` (overlaps counted once)."""
        return _union(((e.start, e.end) for e in self.compute_events(worker)))

    def idle(self, worker: int) -> float:
        """Makespan minus busy time: the worker's share of the bubble."""
        return self.makespan - self.busy(worker)

    def idle_fraction(self, worker: int) -> float:
        span = self.makespan
        return self.idle(worker) / span if span > 0 else 0.0

    @property
    def bubble_fraction(self) -> float:
        """Total idle over workers x makespan."""
        span = self.makespan
        if span <= 0:
            return 0.0
        idle = sum(self.idle(w) for w in range(self.num_workers))
        return idle / (self.num_workers * span)

    @property
    def throughput(self) -> float:
        """Samples per unit of time over the window."""
        span = self.makespan
        return self.samples / span if span > 0 else 0.0

    @property
    def work_per_sample(self) -> float:
        """Compute time per sample per worker: total busy / (samples x workers). With the
        bubble it gives the throughput: ``throughput = (1 - bubble) / work_per_sample``, so
        a schedule whose actions cost more is slower at the same bubble."""
        if self.samples <= 0:
            return 0.0
        busy = sum(self.busy(w) for w in range(self.num_workers))
        return busy / (self.samples * self.num_workers)

    # -- memory -----------------------------------------------------------------------------
    def peak_activations(self, stage: int) -> int:
        """Most microbatches whose activations ``stage`` holds at one time."""
        stores = self.meta.get("stores_activations")
        if stores is not None and stage < len(stores) and not stores[stage]:
            return 0
        held = _held_intervals(self.compute_events(), stage)
        return _peak_overlap(held)

    def peak_activation_bytes(self, stage: int) -> float:
        """Peak bytes of stage activations: measured if recorded, else peak x size."""
        measured = self.meta.get("peak_stored_activation_bytes")
        if measured is not None and stage < len(measured):
            return float(measured[stage])
        sizes = self.meta.get("activation_bytes")
        if not sizes or stage >= len(sizes):
            return 0.0
        return self.peak_activations(stage) * float(sizes[stage])

    # -- reports ----------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """The figures the reports print, JSON-ready."""
        workers = range(self.num_workers)
        stages = range(self.num_stages)
        return {
            "schedule": self.meta.get("schedule"),
            "source": self.meta.get("source"),
            "bubble_fraction": self.bubble_fraction,
            "idle_fraction": [self.idle_fraction(w) for w in workers],
            "busy": [self.busy(w) for w in workers],
            "idle": [self.idle(w) for w in workers],
            "makespan": self.makespan,
            "throughput": self.throughput,
            "peak_activations": [self.peak_activations(s) for s in stages],
            "peak_activation_bytes": [self.peak_activation_bytes(s) for s in stages],
        }

    def to_json(self, path: str | Path | None = None) -> dict[str, Any]:
        """A JSON-ready dict of the whole timeline; also written to ``path`` if given."""
        data = {
            "num_workers": self.num_workers,
            "samples": self.samples,
            "meta": self.meta,
            "events": [asdict(e) for e in self.events],
        }
        if path is not None:
            Path(path).write_text(json.dumps(data) + "\n")
        return data

    @classmethod
    def from_json(cls, source: Mapping[str, Any] | str | Path) -> "Timeline":
        """Read what :meth:`to_json` wrote, or a Chrome trace of one timeline that
        :func:`~.trace.write_chrome_trace` wrote (``brigade train --trace``): a dict, JSON
        text, or a file path."""
        from .schedule import _load_json
        from .trace import is_chrome_trace, read_chrome_trace

        data = _load_json(source)
        if is_chrome_trace(data):
            found = read_chrome_trace(data)
            if len(found) != 1:
                raise ScheduleError(f"this trace holds {len(found)} timelines "
                                    f"({', '.join(found)}); read them with read_chrome_trace")
            return next(iter(found.values()))
        try:
            return cls(events=data["events"], num_workers=data["num_workers"],
                       samples=data.get("samples", 0.0), meta=data.get("meta", {}))
        except KeyError as err:
            raise ScheduleError(f"timeline JSON lacks the key {err}") from None

    def to_chrome_trace(self, pid: int = 0) -> list[dict[str, Any]]:
        """Complete ("X") events for chrome://tracing and Perfetto: one thread per worker,
        times in microseconds from the start of the window."""
        t0 = min((e.start for e in self.events), default=0.0)
        out = []
        for e in self.events:
            name = e.label if e.category == "compute" else f"{e.category} {e.label}"
            out.append({
                "name": name, "cat": e.category, "ph": "X",
                "ts": (e.start - t0) * 1e6, "dur": e.duration * 1e6,
                "pid": pid, "tid": e.worker,
                "args": {"stage": e.stage, "kind": e.kind, "microbatch": e.microbatch,
                         "category": e.category},
            })
        return out


def _union(spans: Iterable[tuple[float, float]]) -> float:
    """Total length covered by possibly overlapping spans."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


def _held_intervals(events: list[Event], stage: int) -> list[tuple[float, float]]:
    """(start of forward, end of releasing action) per microbatch of ``stage``."""
    starts: dict[int, float] = {}
    fwd_end: dict[int, float] = {}
    release: dict[int, float] = defaultdict(lambda: float("-inf"))
    for e in events:
        if e.stage != stage:
            continue
        if e.kind in FORWARD_KINDS:
            starts[e.microbatch] = e.start
            fwd_end[e.microbatch] = e.end
        elif e.kind in FREEING_KINDS:
            release[e.microbatch] = max(release[e.microbatch], e.end)
    return [(t, max(fwd_end[j], release[j])) for j, t in starts.items()]


def _peak_overlap(spans: list[tuple[float, float]]) -> int:
    """Most half-open spans [start, end) that overlap at one instant."""
    spans = [(s, e) for s, e in spans if e > s]
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    peak = live = 0
    for _, step in edges:  # at equal times, ends (-1) sort before starts (+1)
        live += step
        peak = max(peak, live)
    return peak
