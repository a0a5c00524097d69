"""The run: profile, simulate and measure every split, then report; ``main`` is the entry point."""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brigade.schedulers import Timeline
from brigade.stages.errors import ConfigError

from .config import BenchConfig, BenchError, build_parser, parse_config
from .costs import SplitCosts, _balance
from .measure import _ray_cluster, measure_split
from .peer import TorchPeer, torch_worker
from .profiling import make_model, profile_model, stage_table
from .report import add_predictions, print_report, target_checks, write_gantt, write_markdown
from .simulation import simulate_costs, simulate_split

__all__ = ["Results", "main", "run"]


# -- main ------------------------------------------------------------------------------------------
@dataclass
class Results:
    """What a run produces: the rows, and the timelines the Gantt picture draws."""

    rows: list[dict] = field(default_factory=list)
    measured: dict[tuple[str, str, str], Timeline] = field(default_factory=dict)
    simulated: dict[tuple[str, str], Timeline] = field(default_factory=dict)
    measured_costs: dict[str, dict[str, SplitCosts]] = field(default_factory=dict)
    torch_error: str | None = None  # why the torch side stopped, if it did


def run(cfg: BenchConfig, console, stage_tables: bool = False) -> Results:
    """Profile, simulate and (where configured) measure, with a progress bar."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    out = Results()
    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task("profiling", total=len(cfg.models) * len(cfg.shapes)
                            + (len(cfg.measure_models) if cfg.measure else 0))
        for name in cfg.models:
            for shape in cfg.shapes:
                bar.update(task, description=f"profiling and simulating {name} {shape}")
                _profile_and_simulate(cfg, name, shape, out, bar.console, stage_tables)
                bar.advance(task)
        if cfg.measure:
            todo = [m for m in cfg.measure_models if m in out.measured_costs]
            if len(todo) < len(cfg.measure_models):
                bar.console.print(
                    f"[yellow]not measured: {', '.join(sorted(set(cfg.measure_models) - set(todo)))}"
                    f" (a measured model must also be in --models, with --shapes including "
                    f"{cfg.measure_shape} and --stages including {cfg.measure_stages})[/]")
            bar.update(task, total=len(cfg.models) * len(cfg.shapes) + len(todo))
            if todo:
                _measure_all(cfg, todo, out, lambda text: bar.update(task, description=text),
                             lambda: bar.advance(task))
    add_predictions(out.rows)
    return out


def _profile_and_simulate(cfg: BenchConfig, name: str, shape: str, out: Results, console,
                          stage_tables: bool) -> None:
    """Profile one model on one shape, print its stage tables, simulate every split."""
    model = make_model(cfg, name, shape)
    mp = profile_model(cfg, name, shape)
    for p in cfg.stages:
        measured = cfg.measured(name, shape, p)
        keep = measured or (not out.simulated and not cfg.measure)

        def on_costs(schedule: str, sc: SplitCosts) -> None:
            if measured:
                out.measured_costs.setdefault(name, {})[schedule] = sc
            if keep:  # the Gantt picture: the measured window, or one step
                out.simulated[(name, schedule)] = simulate_costs(
                    cfg, schedule, p, sc.costs, steps=cfg.window if measured else None)

        if len(mp.blocks) >= p and (stage_tables or measured):
            part = stage_table(mp, _balance(mp, p), model)
            table = part.table()
            table.title = f"{name} {shape}, {p} stages: balance {part.balance} by time ({mp.source})"
            console.print(table)
        out.rows += simulate_split(cfg, mp, model, p, on_costs)


def _measure_all(cfg: BenchConfig, todo: list[str], out: Results,
                 say: Callable[[str], None], advance: Callable[[], None]) -> None:
    """Start Ray and the torch peer once, measure every split, stop both (also on errors)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="resnet_splits_") as tmp:
        say(f"starting {'Ray and ' if 'ray' in cfg.backends else ''}torchrun "
            f"({cfg.measure_stages} ranks, gloo)")
        peer = TorchPeer(Path(tmp), nproc=cfg.measure_stages, timeout_s=cfg.timeout_s,
                         env=cfg.env)
        try:
            with (_ray_cluster(num_cpus=cfg.measure_stages, env=cfg.env)
                  if "ray" in cfg.backends else nullcontext()):
                for name in todo:
                    rows, tls = measure_split(cfg, name, out.measured_costs[name], peer, say)
                    out.rows += rows
                    out.measured.update({(name, r, s): tl for (r, s), tl in tls.items()})
                    advance()
        finally:
            peer.close()
        out.torch_error = peer.error


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; exit status 2 for bad flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.torch_worker is not None:
        return torch_worker(args.torch_worker, args.parent_pid)
    from rich.console import Console

    try:
        cfg = parse_config(args, argv)
        if args.gantt is not None and args.gantt.suffix.lower() not in (".png", ".svg", ".pdf"):
            raise BenchError(f"--gantt {args.gantt} must end in .png, .svg or .pdf")
    except (ConfigError, ValueError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    console = Console(stderr=True)
    previous = signal.signal(signal.SIGTERM, _terminate)  # so that finally blocks stop Ray/torchrun
    t0 = time.perf_counter()
    try:
        res = run(cfg, console, args.stage_tables)
    finally:
        signal.signal(signal.SIGTERM, previous)
    wall = time.perf_counter() - t0
    checks = target_checks(res.rows)
    print_report(Console(width=None if sys.stdout.isatty() else 200), cfg, res.rows, checks)
    if res.torch_error:
        console.print(f"[red]torch.distributed.pipelining side failed:[/] {res.torch_error}")
    console.print(f"done in {wall:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(res.rows, indent=1, default=_json_default) + "\n")
    if args.markdown:
        write_markdown(args.markdown, cfg, res.rows, checks, wall)
    if args.gantt:
        write_gantt(args.gantt, cfg, res.measured, res.simulated)
    return 0


def _terminate(signum, frame) -> None:
    """SIGTERM as an exception, so that the finally blocks stop Ray and torchrun."""
    raise SystemExit(128 + signum)


def _json_default(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return str(value)
