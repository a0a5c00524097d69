"""The Gantt picture: one panel per schedule on a shared time axis, one row per worker,
one colour per kind of action, idle time hatched, the bubble fraction in each title.

matplotlib is imported inside :func:`plot_gantt` (with the Agg canvas), so importing
:mod:`brigade.schedulers` stays cheap and needs no display.
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Mapping
from typing import Any

from .actions import KIND_NAMES
from .kinds import kind_of
from .kinds import kinds as all_kinds
from .errors import ScheduleError
from .timeline import Timeline

__all__ = ["plot_gantt", "KIND_COLORS"]



class _Colours(Mapping):
    """Live ``kind -> colour`` of the compute kinds (:mod:`.kinds`), then ``send`` and
    ``recv`` (the message kinds' colours), in table order: the legend's order."""

    def _items(self) -> dict[str, str]:
        out = {k.code: k.colour for k in all_kinds() if k.is_compute}
        for k in all_kinds():
            if not k.is_compute:
                out.setdefault(k.category, k.colour)
        return out

    def __getitem__(self, key: str) -> str:
        return self._items()[key]

    def __iter__(self):
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())


KIND_COLORS: Mapping[str, str] = _Colours()
_FORMATS = (".png", ".svg", ".pdf")
_ROW = 0.34       # inches per worker row
_PANEL = 0.75     # inches per panel for title and margins


def plot_gantt(timelines: Timeline | Mapping[str, Timeline], path: str | Path,
               title: str | None = None, dpi: int = 150) -> Path:
    """Draw the timelines and write PNG, SVG or PDF (by the suffix of ``path``)."""
    from matplotlib.figure import Figure

    path = Path(path)
    if path.suffix.lower() not in _FORMATS:
        raise ScheduleError(f"cannot write a plot to {path.name!r}: use a file name ending "
                            f"in {', '.join(_FORMATS)}")
    if isinstance(timelines, Timeline):
        timelines = {str(timelines.meta.get("schedule") or "run"): timelines}
    if not timelines:
        raise ScheduleError("nothing to plot: give at least one timeline")
    heights = [_ROW * t.num_workers + _PANEL for t in timelines.values()]
    fig = Figure(figsize=(13, sum(heights) + 1.1), layout="constrained")
    axes = fig.subplots(len(timelines), 1, sharex=True, squeeze=False,
                        gridspec_kw={"height_ratios": heights})[:, 0]
    end = max(t.makespan for t in timelines.values()) or 1.0
    kinds: dict[str, None] = {}
    for ax, (name, tl) in zip(axes, timelines.items()):
        kinds.update(_panel(ax, name, tl, end, fig))
    axes[-1].set_xlabel(_time_label(next(iter(timelines.values()))))
    axes[-1].set_xlim(0, end * 1.005)
    _legend(fig, kinds)
    fig.suptitle(title or _title(next(iter(timelines.values()))), fontsize=13,
                 fontweight="bold", x=0.01, ha="left")
    fig.savefig(path, dpi=dpi)
    return path


def _panel(ax: Any, name: str, tl: Timeline, end: float, fig: Any) -> dict[str, None]:
    """One schedule: hatched idle background, coloured spans, update ticks, title."""
    t0, t1 = tl.window
    seen: dict[str, None] = {}
    virtual = max(1, tl.num_stages // tl.num_workers)
    px_per_unit = fig.get_figwidth() * 0.9 * fig.dpi / end
    for w in range(tl.num_workers):
        ax.broken_barh([(0, t1 - t0)], (w - 0.42, 0.84), facecolor="white",
                       edgecolor="#C8C8C8", hatch="////", linewidth=0)
        spans: dict[tuple[str, int], list[tuple[float, float]]] = {}
        for e in tl.events:
            if e.worker != w or e.category == "wait":
                continue
            key = e.kind if e.category == "compute" else e.category
            if e.duration <= 0:
                if e.kind in KIND_NAMES and kind_of(e.kind).index == "update":
                    ax.vlines(e.start - t0, w - 0.45, w + 0.45, color=KIND_COLORS[e.kind],
                              linewidth=1.4)
                    seen[e.kind] = None
                continue
            chunk = e.stage // tl.num_workers
            spans.setdefault((key, chunk), []).append((e.start - t0, e.duration))
            seen[key] = None
            if e.category == "compute" and e.duration * px_per_unit >= 16:
                ax.text(e.start - t0 + e.duration / 2, w, str(e.microbatch), ha="center",
                        va="center", fontsize=7, color="white" if key != "W" else "black")
        for (key, chunk), bars in spans.items():
            colour = _shade(KIND_COLORS.get(key, "#888888"), chunk, virtual)
            ax.broken_barh(bars, (w - 0.42, 0.84), facecolor=colour, edgecolor="white",
                           linewidth=0.25)
    ax.set_ylim(tl.num_workers - 0.5, -0.5)
    ax.set_yticks(range(tl.num_workers), [f"w{w}" for w in range(tl.num_workers)])
    ax.tick_params(axis="y", length=0)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.set_title(f"{name}   bubble {tl.bubble_fraction:.1%}   makespan {tl.makespan:.4g}   "
                 f"throughput {tl.throughput:.3g} samples per unit time"
                 + ("   (lighter tints: later chunks)" if virtual > 1 else ""), loc="left",
                 fontsize=10.5)
    return seen


def _shade(colour: str, chunk: int, virtual: int) -> str:
    """Later chunks of an interleaved worker in lighter tints of the kind's colour."""
    if virtual <= 1 or chunk == 0:
        return colour
    mix = 0.45 * chunk / (virtual - 1)
    rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(c + (255 - c) * mix):02x}" for c in rgb)


def _legend(fig: Any, kinds: dict[str, None]) -> None:
    """Kinds in a fixed order, then idle."""
    from matplotlib.patches import Patch

    order = [k for k in KIND_COLORS if k in kinds]
    handles = [Patch(facecolor=KIND_COLORS[k], label=_kind_label(k)) for k in order]
    handles.append(Patch(facecolor="white", edgecolor="#A0A0A0", hatch="////", label="idle"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5),
               frameon=False, fontsize=9)


def _kind_label(kind: str) -> str:
    return f"{kind}  {KIND_NAMES[kind]}" if kind in KIND_NAMES else kind


def _time_label(tl: Timeline) -> str:
    unit = tl.meta.get("time_unit")
    return f"time ({unit})" if unit else "time"


def _title(tl: Timeline) -> str:
    """Sizes from the first timeline's meta."""
    m = tl.meta
    parts = [f"p={m['workers'] if 'workers' in m else tl.num_workers} workers"]
    if "microbatches" in m:
        parts.append(f"m={m['microbatches']} microbatches per step")
    if m.get("steps"):
        parts.append(f"S={m['steps']} steps")
    return "Pipeline schedules: " + ", ".join(parts)
