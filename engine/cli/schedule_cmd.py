"""``brigade schedule``: a schedule's grid, or several schedules simulated side by side.

``show`` prints one schedule's staircase (actions at unit-time slots) and its simulated
idle time; ``compare`` simulates several schedules under the same costs and prints bubble,
idle fraction per worker, makespan, throughput and peak in-flight activations, and can
write the figures (``--json``), a Gantt picture (``--plot``) and a Perfetto trace
(``--trace``). Costs are per pipeline stage (per worker); interleaved splits each worker's
share of the model into ``--virtual`` chunks, each costing 1/v of it, so every schedule
runs the same model. Nothing here imports torch or ray.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from typing import Any

__all__ = ["NAME", "HELP", "add_arguments", "run", "simulate_all", "compare_figures"]

NAME = "schedule"
HELP = "Show a pipeline schedule's grid, or compare schedules' idle time and throughput."



def _default_names() -> str:
    """The schedules ``compare`` runs by default: those declared ``compared``."""
    from brigade.schedulers import specs

    return ",".join(s.name for s in specs() if s.compared)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``show`` and ``compare`` subcommands and their shared sizes and costs."""
    sub = parser.add_subparsers(dest="action", metavar="{show,compare}", required=True)
    show = sub.add_parser("show", help="print one schedule's grid and its simulated idle time")
    from brigade.schedulers import names

    everything = _default_names()
    show.add_argument("--schedule", required=True, help=f"one of: {', '.join(names())}")
    compare = sub.add_parser("compare", help="simulate several schedules side by side")
    compare.add_argument("--schedules", default=everything,
                         help=f"comma-separated names (default: {everything})")
    for p in (show, compare):
        _sizes(p)
    show.add_argument("--lowered", action="store_true",
                      help="show the grid with explicit send/receive actions")


def _sizes(p: argparse.ArgumentParser) -> None:
    """Options both subcommands take."""
    p.add_argument("--stages", type=int, required=True, help="pipeline stages p (= workers)")
    p.add_argument("--microbatches", type=int, required=True, help="microbatches per step m")
    p.add_argument("--virtual", type=int, default=None,
                   help="stages per worker for interleaved (default 2; others use 1)")
    p.add_argument("--steps", type=int, default=1, help="steps S (default 1)")
    p.add_argument("--costs", default="",
                   help="per-stage costs, e.g. 'f=1,b=2,u=0.1,latency=0.05' (lists per stage "
                        "with ':', e.g. f=1:2:1:1); default f=1, b=2f, all else 0")
    p.add_argument("--options", default="",
                   help="schedule options, e.g. 'k=4' (stale), 'accumulate=8' (petra), "
                        "'lag=1' (dni); each schedule takes only its own")
    p.add_argument("--width", type=int, default=None, help="wrap grids at this many columns")
    p.add_argument("--json", metavar="PATH", default=None, help="write the figures as JSON")
    p.add_argument("--plot", metavar="PATH", default=None,
                   help="write a Gantt picture (.png, .svg or .pdf)")
    p.add_argument("--trace", metavar="PATH", default=None,
                   help="write a Chrome/Perfetto trace JSON")


# -- parsing ----------------------------------------------------------------------------------
def _options(text: str) -> dict[str, int]:
    """``"k=4,accumulate=8"`` -> ``{"k": 4, "accumulate": 8}``."""
    from brigade.schedulers import ScheduleError

    out: dict[str, int] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, sep, value = item.partition("=")
        try:
            out[key.strip()] = int(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ScheduleError(f"cannot read option {item!r}: write key=integer, e.g. 'k=4'")
    return out


def _names(text: str) -> list[str]:
    """Schedule names, checked against the registry (the error lists the valid ones)."""
    from brigade.schedulers import ScheduleError, names

    chosen = [n.strip().lower() for n in text.split(",") if n.strip()]
    if not chosen:
        raise ScheduleError(f"no schedule named; choose from {', '.join(names())}")
    for n in chosen:
        if n not in names():
            raise ScheduleError(f"unknown schedule {n!r}; valid names: {', '.join(names())}")
    return chosen


def _virtual_for(name: str | None, virtual: int | None, strict: bool = False) -> int:
    """A schedule that places several stages per worker (interleaved) takes --virtual
    (default: its declared one); the others run one stage per worker (in ``compare`` they
    ignore --virtual; in ``show`` asking them for more is an error). ``name`` None: the
    value the chunked schedules get."""
    from brigade.schedulers import schedule_spec, specs

    chunked = [s for s in specs() if s.takes_virtual]
    spec = schedule_spec(name) if name is not None else (chunked[0] if chunked else None)
    if spec is not None and spec.takes_virtual:
        return spec.default_virtual if virtual is None else virtual
    return virtual if strict and virtual is not None else 1


# -- the work -----------------------------------------------------------------------------------
def simulate_all(names: list[str], stages: int, microbatches: int, virtual: int | None,
                 steps: int, costs: Any, options: dict[str, int], strict: bool = False
                 ) -> dict[str, Any]:
    """Build and simulate each schedule on the same model: ``{name: (schedule, timeline)}``."""
    from brigade.schedulers import build, options_of, simulate

    out = {}
    for name in names:
        v = _virtual_for(name, virtual, strict)
        own = {k: val for k, val in options.items() if k in options_of(name)}
        schedule = build(name, stages, microbatches, virtual=v, steps=steps, **own)
        out[name] = (schedule, simulate(schedule, costs.chunked(stages, v)))
    return out


def _costs_shown(costs: Any, stages: int) -> dict[str, Any]:
    """The costs as simulated (b, i, w, r filled in), per pipeline stage."""
    shown = costs.resolve(stages).to_dict()
    shown["stores_activations"] = costs.stores_activations  # None: by schedule
    return shown


def compare_figures(args: argparse.Namespace, costs: Any, runs: dict[str, Any]) -> dict:
    """The JSON that ``--json`` writes."""
    figures = {}
    for name, (_, tl) in runs.items():
        s = tl.summary()
        figures[name] = {k: s[k] for k in ("bubble_fraction", "idle_fraction", "makespan",
                                           "throughput", "peak_activations", "busy", "idle")}
        figures[name]["work_per_sample"] = tl.work_per_sample
    return {
        "stages": args.stages,
        "microbatches": args.microbatches,
        "virtual": _virtual_for(args.schedule if args.action == "show" else None,
                                args.virtual, strict=True),
        "steps": args.steps,
        "costs": _costs_shown(costs, args.stages),
        "schedules": figures,
    }


def _check_unused(options: dict[str, int], names: list[str]) -> None:
    """An option no chosen schedule takes is a typo: say which ones exist."""
    from brigade.schedulers import ScheduleError, options_of

    known = {k for n in names for k in options_of(n)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ScheduleError(f"no chosen schedule takes option {', '.join(unknown)}; options: "
                            f"{', '.join(sorted(known)) or 'none'}")


def _write_outputs(args: argparse.Namespace, runs: dict[str, Any], figures: dict,
                   title: str) -> list[str]:
    """--json, --plot, --trace; returns lines saying what was written."""
    from brigade.schedulers import plot_gantt, write_chrome_trace

    written = []
    timelines = {name: tl for name, (_, tl) in runs.items()}
    if args.json:
        from brigade.engine.cli.output import write_json

        write_json(args.json, figures)
        written.append(f"figures: {args.json}")
    if args.plot:
        plot_gantt(timelines, args.plot, title=title)
        written.append(f"plot: {args.plot}")
    if args.trace:
        write_chrome_trace(timelines, args.trace)
        written.append(f"trace: {args.trace}")
    return written


def _title(args: argparse.Namespace, costs: Any) -> str:
    """Sizes and costs, for the table and the picture."""
    shown = _costs_shown(costs, args.stages)
    c = ", ".join(
        f"{k}={_fmt(v)}" for k, v in shown.items()
        if k not in ("i", "w", "microbatch_size", "stores_activations")
        and (k in ("f", "b") or (k == "r" and v != shown["f"]) or (k != "r" and _any(v))))
    return (f"p={args.stages} workers, m={args.microbatches} microbatches per step, "
            f"S={args.steps} step{'s' if args.steps != 1 else ''}; costs per stage: {c}")


def _fmt(value: Any) -> str:
    """A number, or a per-stage list joined with ':' as --costs takes it."""
    if isinstance(value, list):
        return ":".join(f"{x:g}" for x in value)
    return f"{value:g}"


def _any(value: Any) -> bool:
    return any(value) if isinstance(value, list) else bool(value)


def _check_plot_path(path: str | None) -> None:
    """Refuse an unknown picture format before any work is done."""
    from brigade.schedulers import ScheduleError

    if path and not path.lower().endswith((".png", ".svg", ".pdf")):
        raise ScheduleError(f"cannot write a plot to {path!r}: use a file name ending in "
                            ".png, .svg or .pdf")


def run(args: argparse.Namespace) -> int:
    """Parse sizes, costs and options; simulate; print; write the requested files."""
    from rich.console import Console

    from brigade.schedulers import Costs

    width = args.width or max(100, shutil.get_terminal_size((120, 24)).columns)
    console = Console(file=sys.stdout, width=width)
    costs = Costs.parse(args.costs)
    options = _options(args.options)
    show = args.action == "show"
    names = _names(args.schedule if show else args.schedules)
    if show and len(names) != 1:
        from brigade.schedulers import ScheduleError

        raise ScheduleError(f"show takes one schedule, got {len(names)}; use compare")
    _check_unused(options, names)
    _check_plot_path(args.plot)
    runs = simulate_all(names, args.stages, args.microbatches, args.virtual, args.steps,
                        costs, options, strict=show)
    for _, tl in runs.values():
        tl.meta["time_unit"] = "cost units"
    title = _title(args, costs)
    (_print_show if show else _print_compare)(console, args, runs, title, width)
    for line in _write_outputs(args, runs, compare_figures(args, costs, runs), title):
        console.print(line, markup=False, highlight=False)
    return 0


def _print_show(console: Any, args: argparse.Namespace, runs: dict, title: str,
                width: int) -> None:
    """The grid (lowered if asked) and the per-worker summary."""
    from brigade.schedulers import lower, summary_table

    schedule, tl = next(iter(runs.values()))
    if args.lowered:
        schedule = lower(schedule)
    console.print(f"{schedule.name}: {title}", markup=False, highlight=False)
    console.print(schedule.grid(width=width), markup=False, highlight=False, soft_wrap=True)
    console.print(summary_table(tl))


def _print_compare(console: Any, args: argparse.Namespace, runs: dict, title: str,
                   width: int) -> None:
    """One row per schedule, then what the columns measure and why a small bubble can
    still be slow."""
    from brigade.schedulers.report import compare_notes, compare_table

    console.print(compare_table({n: tl for n, (_, tl) in runs.items()}, title=title))
    for line in compare_notes(runs):
        console.print(line, markup=False, highlight=False)
