"""``brigade report TRACE``: a recorded run's idle time, measured beside its simulation.

TRACE is the Chrome trace that ``brigade train --trace`` writes (it opens in Perfetto too;
brigade's own data rides in its ``otherData``), or a timeline JSON of the older format.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from . import UsageError, output

NAME = "report"
HELP = ("Bubble and idle-time report of a recorded run (brigade train --trace), measured "
        "beside the simulation of the same schedule with the costs it measured.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", help="the trace `brigade train --trace PATH` wrote (a Chrome trace; "
                   "older timeline JSON files read too)")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="Gantt picture of measured and simulated runs (.png or .svg; "
                        "default: TRACE with .png)")
    p.add_argument("--no-plot", action="store_true", help="do not draw the picture")
    p.add_argument("--chrome-trace", default=None, metavar="PATH",
                   help="write the measured run and its simulation side by side as one "
                        "Chrome/Perfetto trace")
    p.add_argument("--json", default=None, metavar="PATH", help="write the figures as JSON")


def _measured_timeline(path: str):
    """The timeline in ``path``: brigade's timeline JSON, or a Chrome trace of one timeline,
    or of several of which one is measured (what ``--chrome-trace`` writes)."""
    import json

    from brigade.schedulers import Timeline, read_chrome_trace
    from brigade.schedulers.trace import is_chrome_trace

    data = json.loads(Path(path).read_text())
    if not is_chrome_trace(data):
        return Timeline.from_json(data)
    found = list(read_chrome_trace(data).values())
    measured = [t for t in found if t.meta.get("source") == "measured"]
    if len(found) == 1 or len(measured) != 1:
        if not found:
            raise ValueError("the trace holds no timeline")
        return found[0]  # one timeline, or several without one measured: _load says so
    return measured[0]


def _load(path: str):
    from brigade.schedulers import Timeline

    if not Path(path).is_file():
        raise UsageError(f"trace {path!r} does not exist; write one with "
                         "`brigade train ... --trace PATH`")
    try:
        tl = _measured_timeline(path)
    except (ValueError, KeyError, TypeError) as err:
        raise UsageError(f"{path!r} is not a brigade timeline ({err}); write one with "
                         "`brigade train ... --trace PATH`") from None
    if tl.meta.get("source") != "measured" or "schedule" not in tl.meta:
        raise UsageError(f"{path!r} holds no measured run (meta source="
                         f"{tl.meta.get('source')!r}); use `brigade train --trace`")
    return tl


def run(args: argparse.Namespace) -> int:
    from brigade.schedulers import (costs_from_timeline, plot_gantt, predict, side_by_side,
                                    write_chrome_trace)

    measured = _load(args.trace)
    costs = costs_from_timeline(measured)
    simulated = predict(measured, costs)
    console = Console()
    meta = measured.meta
    console.print(
        f"[bold]{meta['schedule']}[/] ({meta.get('method', 'backprop')}), "
        f"{measured.num_workers} workers, m={meta['microbatches']}, v={meta.get('virtual', 1)}, "
        f"{meta.get('steps')} steps, backend {meta.get('backend', '?')}"
    )
    console.print(side_by_side(measured, simulated, title="measured vs simulated"))
    ratio = measured.throughput / simulated.throughput if simulated.throughput else 0.0
    console.print(
        f"throughput measured {measured.throughput:.1f} samples/s, simulated "
        f"{simulated.throughput:.1f} samples/s (measured / simulated = {ratio:.2f}); "
        f"message latency {costs.latency * 1e3:.2f} ms"
    )
    if not args.no_plot:
        plot = args.plot or str(Path(args.trace).with_suffix(".png"))
        plot_gantt({"measured": measured, "simulated": simulated}, plot)
        console.print(f"Gantt picture: {plot}")
    probes = meta.get("probes")
    if probes:
        _print_probes(probes, console)
        if not args.no_plot:
            path = str(Path(args.plot or args.trace).with_suffix("")) + ".probes.png"
            _plot_probes(probes, path)
            console.print(f"probe picture: {path}")
    if args.chrome_trace:
        write_chrome_trace({"measured": measured, "simulated": simulated}, args.chrome_trace)
        console.print(f"Chrome trace (measured and simulated): {args.chrome_trace}")
    if args.json:
        output.write_json(args.json, {
            "measured": measured.summary(), "simulated": simulated.summary(),
            "throughput_ratio": ratio, "costs": costs.to_dict(),
            **({"probes": {k: v for k, v in probes.items() if k != "heatmap"}} if probes else {}),
        })
    return 0


def _print_probes(probes: dict, console: Console) -> None:
    """Per stage, the means of what ``--probe-every`` measured."""
    from rich.table import Table

    rows = probes.get("mean_per_stage", {})
    keys = sorted({k for row in rows.values() for k in row})
    table = Table(title=f"gradient-quality probes ({probes['method']}, every {probes['every']} "
                        f"steps; means over {len(probes['records'])} records)")
    table.add_column("stage", justify="right")
    for k in keys:
        table.add_column(k.replace("_", " "), justify="right")
    for s, row in sorted(rows.items(), key=lambda kv: int(kv[0])):
        table.add_row(s, *(f"{row[k]:.4g}" if k in row else "-" for k in keys))
    console.print(table)


def _plot_probes(probes: dict, path: str) -> None:
    import torch

    from brigade.stages.probes import plot_probes

    heat = probes.get("heatmap")
    if heat is not None:
        heat = {**heat, "synthetic": torch.tensor(heat["synthetic"]),
                "true": torch.tensor(heat["true"])}
    import matplotlib.pyplot as plt

    plt.close(plot_probes(probes, heat, path))
