"""Chrome/Perfetto trace files: open them in ui.perfetto.dev or chrome://tracing, and read
them back as :class:`Timeline` objects (``brigade report`` does).

The file is the Trace Event Format's JSON object form::

    {"traceEvents": [...], "displayTimeUnit": "ms", "otherData": {"brigade": {...}}}

- one process (``pid``) per timeline, named by a ``process_name`` metadata event (``ph``
  "M"); one thread (``tid``) per worker, named ``worker w (stages ...)`` by
  ``thread_name``, so each worker is a track;
- one complete event (``ph`` "X", ``ts`` and ``dur`` in microseconds from the timeline's
  first event) per span: compute, wait, send, receive (``cat``), with ``args`` holding the
  stage, kind, microbatch and category;
- one flow (``ph`` "s" on the sender's track, ``ph`` "f" with ``bp`` "e" on the receiver's,
  one ``id``) per message between workers: from the producer's send span (its compute span
  where no send was recorded) to the action that consumed it, found by the schedule's
  dependency rules (:mod:`.deps`); a timeline whose schedule cannot be rebuilt from its meta
  gets no flows;
- ``otherData["brigade"]`` keeps what the events do not: per timeline its name, pid,
  workers, samples, meta and the time origin, so :func:`read_chrome_trace` gives back the
  same timeline (times to within float rounding) and the report loses nothing.

The sends of one action are paired with its remote consumers in the order a worker routes
them: forward ones first, then backward ones by stage (DNI's S sends its output on, then the
gradient back; fwdgrad's last F sends d to stage 0, 1, ...).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping

from .errors import ScheduleError
from .timeline import Event, Timeline

__all__ = ["chrome_trace", "write_chrome_trace", "read_chrome_trace", "is_chrome_trace",
           "FORMAT"]

FORMAT = "brigade-timeline"
_VERSION = 1
_US = 1e6  # trace time unit: microseconds


def is_chrome_trace(data: Any) -> bool:
    """Whether a loaded JSON object is a trace (as opposed to brigade's older timeline)."""
    return isinstance(data, Mapping) and "traceEvents" in data


def chrome_trace(timelines: Timeline | Mapping[str, Timeline], flows: bool = True) -> dict:
    """The trace object of one timeline, or of several side by side (one process each)."""
    if isinstance(timelines, Timeline):
        timelines = {_name(timelines): timelines}
    events: list[dict] = []
    kept: list[dict] = []
    next_id = [0]
    for pid, (name, tl) in enumerate(timelines.items()):
        origin = min((e.start for e in tl.events), default=0.0)
        events += _metadata(pid, name, tl)
        events += tl.to_chrome_trace(pid=pid)
        if flows:
            events += _flows(tl, pid, origin, next_id)
        kept.append({"name": name, "pid": pid, "num_workers": tl.num_workers,
                     "samples": tl.samples, "meta": tl.meta, "origin_s": origin})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"brigade": {"format": FORMAT, "version": _VERSION,
                                      "timelines": kept}}}


def write_chrome_trace(timelines: Timeline | Mapping[str, Timeline], path: str | Path) -> Path:
    """Write the trace JSON to ``path`` (via a temporary file and a rename: a reader never
    sees half a trace)."""
    path = Path(path)
    text = json.dumps(chrome_trace(timelines), separators=(",", ":")) + "\n"
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=path.name)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_chrome_trace(source: Mapping[str, Any] | str | Path) -> dict[str, Timeline]:
    """The timelines of a trace written by :func:`chrome_trace` (a dict, JSON text or a
    path), by name; a trace another tool wrote, without brigade's data, is refused."""
    from .schedule import _load_json

    data = _load_json(source)
    if not is_chrome_trace(data):
        raise ScheduleError("not a Chrome trace: it has no 'traceEvents'")
    kept = (data.get("otherData") or {}).get("brigade") or {}
    if kept.get("format") != FORMAT:
        raise ScheduleError("this Chrome trace holds no brigade timeline (otherData.brigade "
                            "is missing); write one with `brigade train --trace PATH`")
    spans: dict[int, list[Event]] = defaultdict(list)
    for e in data["traceEvents"]:
        if e.get("ph") == "X" and "stage" in (e.get("args") or {}):
            spans[e["pid"]].append(e)
    out = {}
    for t in kept["timelines"]:
        origin = float(t["origin_s"])
        events = [_event(e, origin) for e in spans[t["pid"]]]
        out[t["name"]] = Timeline(events=events, num_workers=int(t["num_workers"]),
                                  samples=t.get("samples", 0.0), meta=t.get("meta", {}))
    return out


# -- writing ------------------------------------------------------------------------------------
def _name(tl: Timeline) -> str:
    """A timeline's process name: its schedule, method and source where known."""
    meta = tl.meta
    parts = [str(meta.get("schedule") or "run")]
    if meta.get("method"):
        parts.append(f"({meta['method']})")
    if meta.get("source"):
        parts.append(str(meta["source"]))
    return " ".join(parts)


def _metadata(pid: int, name: str, tl: Timeline) -> list[dict]:
    """Process and thread names, and their order in the viewer."""
    out = [{"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": name}},
           {"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0,
            "args": {"sort_index": pid}}]
    for w in range(tl.num_workers):
        stages = ",".join(str(s) for s in range(w, tl.num_stages, tl.num_workers))
        out.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": w,
                    "args": {"name": f"worker {w} (stages {stages})"}})
        out.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": w,
                    "args": {"sort_index": w}})
    return out


def _flows(tl: Timeline, pid: int, origin: float, next_id: list[int]) -> list[dict]:
    """A flow per message between workers, from its send (or producer) to its consumer."""
    edges = _message_edges(tl)
    out = []
    for src, dst in edges:
        fid = next_id[0]
        next_id[0] += 1
        label = f"{src.label} -> {dst.label}"
        for ph, e in (("s", src), ("f", dst)):
            event = {"name": label, "cat": "message", "ph": ph, "id": fid, "pid": pid,
                     "tid": e.worker, "ts": (e.start - origin) * _US}
            if ph == "f":
                event["bp"] = "e"
            out.append(event)
    return out


def _message_edges(tl: Timeline) -> list[tuple[Event, Event]]:
    """(send span, consumer span) of every message between workers in ``tl``."""
    from .calibrate import schedule_of
    from .deps import Dependencies
    from .kinds import COMM_KINDS, KINDS, kind_of

    from .lowering import lower

    try:
        schedule = schedule_of(tl)
    except (ScheduleError, KeyError, ValueError, TypeError):
        return []
    if any(e.kind in COMM_KINDS for e in tl.events):  # a lowered schedule's simulation
        schedule = lower(schedule)
    deps = Dependencies(schedule)
    m = schedule.microbatches
    spans: dict[tuple[int, str, int], dict[str, list[Event]]] = defaultdict(
        lambda: defaultdict(list))
    for e in tl.events:
        spans[(e.stage, e.kind, e.microbatch)][e.category].append(e)
    consumers: dict[tuple[int, str, int], list[Event]] = defaultdict(list)
    for e in tl.events:
        if e.category not in ("compute", "recv") or e.kind not in KINDS \
                or kind_of(e.kind).index != "microbatch" or not 0 <= e.stage < schedule.num_stages:
            continue
        local = e.microbatch % m
        try:
            needs = deps.of(_action(e.stage, e.kind, local))
        except ScheduleError:  # an action its rebuilt schedule cannot place: no flow
            continue
        for dep in needs:
            if deps._valid(dep) and deps.crosses(dep, _action(e.stage, e.kind, local)):
                consumers[(dep.stage, dep.kind, dep.microbatch + e.microbatch - local)].append(e)
    edges = []
    for key, readers in consumers.items():
        found = spans.get(key, {})
        sends = sorted(found.get("send", []), key=lambda x: x.start) or found.get("compute", [])
        if not sends:
            continue
        readers.sort(key=lambda r: (r.stage < key[0], r.stage))  # forward first
        edges += [(sends[min(i, len(sends) - 1)], r) for i, r in enumerate(readers)]
    return edges


def _action(stage: int, kind: str, microbatch: int):
    from .actions import Action

    return Action(stage, kind, microbatch)


# -- reading ------------------------------------------------------------------------------------
def _event(e: Mapping[str, Any], origin: float) -> Event:
    """A timeline event from a complete ("X") trace event."""
    args = e["args"]
    start = origin + float(e["ts"]) / _US
    return Event(worker=int(e["tid"]), stage=int(args["stage"]), kind=str(args["kind"]),
                 microbatch=int(args["microbatch"]), start=start,
                 end=max(start, origin + (float(e["ts"]) + float(e["dur"])) / _US),
                 category=str(args.get("category", e.get("cat", "compute"))))
