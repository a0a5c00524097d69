"""Reports: rich tables comparing schedules, measured beside simulated, and text grids.

``compare_table`` is what ``brigade schedule compare`` prints; ``side_by_side`` is what
``brigade report`` prints for a recorded run and its prediction. rich is imported when a
table is made, so that importing :mod:`brigade.schedulers` pulls no rendering library. The Gantt picture and the
trace file live in :mod:`.plot` and :mod:`.trace` and are re-exported here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from .kinds import kinds
from .plot import plot_gantt
from .timeline import Timeline
from .trace import write_chrome_trace

if TYPE_CHECKING:  # pragma: no cover
    from rich.table import Table

    from .schedule import Schedule

__all__ = [
    "compare_table",
    "compare_notes",
    "side_by_side",
    "summary_table",
    "grid_text",
    "plot_gantt",
    "write_chrome_trace",
]

_MAX_WORKER_COLUMNS = 8


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _num(x: float) -> str:
    return f"{x:.4g}"


def _rate(tl: Timeline) -> str:
    """Throughput, in samples per the timeline's time unit."""
    return f"{tl.throughput:.4g}"


def compare_table(timelines: Mapping[str, Timeline], title: str | None = None) -> Table:
    """One row per schedule: bubble, idle fraction per worker, makespan, throughput, work
    per sample, peak in-flight activations per stage; headers carry the units (time in the
    timelines' ``meta["time_unit"]``, e.g. cost units or seconds)."""
    from rich.table import Table

    unit = _unit(timelines)
    workers = max((t.num_workers for t in timelines.values()), default=0)
    table = Table(title=title, title_justify="left")
    table.add_column("schedule", style="bold", no_wrap=True)
    table.add_column("bubble\n(% idle)", justify="right")
    wide = workers <= _MAX_WORKER_COLUMNS
    idle_cols = [f"idle\nw{w}" for w in range(workers)] if wide else ["idle per worker"]
    for col in idle_cols:
        table.add_column(col, justify="right")
    table.add_column(f"makespan\n({unit})", justify="right")
    table.add_column(f"throughput\n(samples\n/ {_singular(unit)})", justify="right")
    table.add_column(f"work per\nsample\n({unit})", justify="right")
    table.add_column("peak activations\nper stage\n(microbatches)", justify="right",
                     no_wrap=True)
    for name, tl in timelines.items():
        idle = [_pct(tl.idle_fraction(w)) for w in range(tl.num_workers)]
        idle_cells = (idle + [""] * (workers - len(idle))) if wide else [" ".join(idle)]
        peaks = " ".join(str(tl.peak_activations(s)) for s in range(tl.num_stages))
        table.add_row(name, _pct(tl.bubble_fraction), *idle_cells, _num(tl.makespan),
                      _rate(tl), _num(tl.work_per_sample), peaks)
    return table


def _unit(timelines: Mapping[str, Timeline]) -> str:
    """The time unit the timelines share (``meta["time_unit"]``; seconds if measured)."""
    units = {t.meta.get("time_unit") or ("s" if t.meta.get("source") != "simulated"
                                         else "cost units") for t in timelines.values()}
    return units.pop() if len(units) == 1 else "time units"


def _singular(unit: str) -> str:
    return unit[:-1] if unit.endswith("units") else unit


def compare_notes(runs: Mapping[str, tuple["Schedule", Timeline]]) -> list[str]:
    """Lines under the comparison: what the columns measure, and why a schedule with the
    lowest bubble can have a low throughput (its actions cost more: the kinds it runs that
    fold several phases, read from the table of kinds)."""
    if not runs:
        return []
    timelines = {n: tl for n, (_, tl) in runs.items()}
    unit = _unit(timelines)
    lines = [
        f"units: bubble = idle share of workers x makespan; idle wN = share of the makespan "
        f"worker N waits; makespan in {unit} (the unit of --costs: f=1 is one microbatch's "
        f"forward through one stage); throughput = samples (microbatches x microbatch_size) "
        f"per {_singular(unit)}; work per sample = compute per sample per worker, in {unit}; "
        "peak activations = microbatches whose activations a stage holds at once.",
        "throughput = (1 - bubble) / work per sample: a small bubble makes a schedule fast "
        "only if its actions cost no more than the others'.",
    ]
    rates = sorted(tl.throughput for tl in timelines.values())
    works = sorted(tl.work_per_sample for tl in timelines.values())
    median_rate, median_work = rates[len(rates) // 2], works[len(works) // 2]
    lowest = min(tl.bubble_fraction for tl in timelines.values())
    for name, (schedule, tl) in runs.items():
        if tl.bubble_fraction > lowest + 1e-12 or tl.throughput >= median_rate:
            continue
        folded = _folded_kinds(schedule)
        why = f": {folded}" if folded else ""
        lines.append(
            f"{name} has the lowest bubble ({_pct(tl.bubble_fraction)}) yet a throughput of "
            f"{_rate(tl)}, below the median {median_rate:.4g}: its work per sample is "
            f"{_num(tl.work_per_sample)} {unit} against a median {_num(median_work)}{why}.")
    return lines


def _folded_kinds(schedule: "Schedule") -> str:
    """The kinds a schedule runs whose one action the simulator charges several costs."""
    used = dict.fromkeys(a.kind for _, a in schedule)
    parts = [f"its {k.code} ({k.label}) costs {' + '.join(k.cost)}" for k in kinds()
             if k.code in used and len(k.cost) > 1]
    return "; ".join(parts)


def summary_table(timeline: Timeline, title: str | None = None) -> Table:
    """Per worker: busy, idle, idle fraction, peak activations of its stages; then totals."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col, just in (("worker", "left"), ("busy", "right"), ("idle", "right"),
                      ("idle fraction", "right"), ("peak act. (its stages)", "right")):
        table.add_column(col, justify=just)
    stages = range(timeline.num_stages)
    for w in range(timeline.num_workers):
        own = [s for s in stages if s % timeline.num_workers == w]
        peaks = " ".join(str(timeline.peak_activations(s)) for s in own)
        table.add_row(f"w{w}", _num(timeline.busy(w)), _num(timeline.idle(w)),
                      _pct(timeline.idle_fraction(w)), peaks)
    table.add_section()
    table.add_row("all", f"makespan {_num(timeline.makespan)}",
                  f"throughput {_rate(timeline)}", f"bubble {_pct(timeline.bubble_fraction)}",
                  "")
    return table


def side_by_side(measured: Timeline, simulated: Timeline, title: str | None = None) -> Table:
    """Measured beside simulated: per worker busy, idle and idle fraction; then bubble,
    makespan and throughput. Differences point at the cost model or the transport."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("", style="bold")
    for col in ("busy", "idle", "idle fraction"):
        table.add_column(f"{col}\nmeasured", justify="right")
        table.add_column(f"{col}\nsimulated", justify="right")
    workers = max(measured.num_workers, simulated.num_workers)

    def cell(tl: Timeline, w: int, what: str) -> str:
        if w >= tl.num_workers:
            return "-"
        value = getattr(tl, what)(w)
        return _pct(value) if what == "idle_fraction" else _num(value)

    for w in range(workers):
        row = [cell(tl, w, what) for what in ("busy", "idle", "idle_fraction")
               for tl in (measured, simulated)]
        table.add_row(f"w{w}", *row)
    table.add_section()
    for label, fmt in (("bubble", lambda t: _pct(t.bubble_fraction)),
                       ("makespan", lambda t: _num(t.makespan)),
                       ("throughput", _rate)):
        table.add_row(label, "", "", "", "", fmt(measured), fmt(simulated))
    return table


def grid_text(obj: "Schedule | Timeline", width: int | None = 100) -> str:
    """A terminal grid: a schedule's staircase, or a timeline drawn to scale (one character
    per ``makespan / width``: the kind letter where a worker computes, ``>``/``<`` for
    send/receive, ``.`` where it is idle)."""
    if not isinstance(obj, Timeline):
        return obj.grid(width=width)
    return _timeline_text(obj, width or 100)


def _timeline_text(tl: Timeline, width: int) -> str:
    """Rows of characters, each the event covering most of its time cell."""
    t0, t1 = tl.window
    span = (t1 - t0) or 1.0
    dt = span / width
    rows = []
    label = len(f"w{tl.num_workers - 1}")
    glyphs = {k.category: k.glyph for k in kinds() if not k.is_compute}  # > send, < receive
    for w in range(tl.num_workers):
        cover = [0.0] * width
        chars = ["."] * width
        for e in tl.events:
            if e.worker != w or e.category == "wait":
                continue
            char = glyphs.get(e.category, e.kind[0])
            first = max(0, int((e.start - t0) / dt))
            last = min(width - 1, int((e.end - t0) / dt))
            for c in range(first, last + 1):
                lo, hi = t0 + c * dt, t0 + (c + 1) * dt
                share = min(hi, e.end) - max(lo, e.start)
                if share > cover[c]:
                    cover[c], chars[c] = share, char
        rows.append(f"w{w}".ljust(label) + " | " + "".join(chars))
    axis = " " * (label + 3) + "0" + f"{_num(span)}".rjust(width - 1)
    return "\n".join(rows + [axis])
