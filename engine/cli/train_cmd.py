"""``brigade train``: train a built-in model on a built-in data set through a pipeline."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from brigade.engine.flags import add_dataclass_flags, flag_values, load_config_file

from . import output

NAME = "train"
HELP = "Train a built-in model on a data set with a pipeline; print accuracy and idle time."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``brigade train``: one per key of ``TrainConfig`` (nested configs and
    every rule's options included), derived from the dataclasses; then the outputs."""
    from brigade.engine.train import TrainConfig

    p.add_argument("--config", default=None, metavar="FILE",
                   help="a TOML file whose keys are these flags' names (model = \"mlp\", "
                        "steps = 3; sections [pipeline], [cluster], [optim] allowed), or a "
                        "--json report to run again; flags given here override it")
    add_dataclass_flags(p, TrainConfig)
    out = p.add_argument_group("outputs")
    out.add_argument("--json", default=None, metavar="PATH",
                     help="write the figures (and the config) as JSON")
    out.add_argument("--save", default=None, metavar="PATH", help="write the trained state_dict")
    out.add_argument("--trace", default=None, metavar="PATH",
                     help="write the measured timeline as a Chrome trace (open it in "
                          "ui.perfetto.dev; `brigade report PATH` reads it)")
    out.add_argument("--quiet", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace):
    """The TrainConfig of the defaults, overridden by ``--config FILE``, overridden by the
    flags typed (its checks name the bad value)."""
    from brigade.engine.train import TrainConfig

    values = load_config_file(args.config, TrainConfig) if args.config else {}
    values.update(flag_values(args, TrainConfig))
    return TrainConfig(**values)


def run(args: argparse.Namespace) -> int:
    _probe_cluster(args)
    cfg = config_from_args(args)  # bad flags and files fail here, before any process starts
    if cfg.pipeline.backend == "torchrun":
        return _spawn_torchrun(args, cfg)
    return run_here(args, cfg)


def _probe_cluster(args: argparse.Namespace) -> None:
    """An unreachable --address (or RAY_ADDRESS), or a cluster that refuses this client's
    auth token, fails first, before torch is imported: one line within seconds
    (``preflight`` and ``ensure_ray`` check it again, for API callers)."""
    import os

    address = getattr(args, "address", None) or os.environ.get("RAY_ADDRESS")
    if getattr(args, "backend", "ray") in (None, "ray") and address:
        from brigade.engine.ray_cluster import probe_cluster

        probe_cluster(address)


def _spawn_torchrun(args: argparse.Namespace, cfg) -> int:
    """Start ``torchrun --nproc-per-node <workers> -m brigade.engine.launch <same flags>``,
    its ranks with the malloc settings Ray stage actors get (see ``actor_env``)."""
    import os
    import subprocess
    import sys

    from brigade.engine.ray_backend import actor_env
    from brigade.engine.train import validate

    validate(cfg)
    workers = cfg.pipeline.num_workers
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={workers}", "-m", "brigade.engine.launch", *args.argv[1:]]
    return subprocess.call(cmd, env={**os.environ, **actor_env()})


def run_here(args: argparse.Namespace, cfg=None) -> int:
    """Train in this process (the driver, or one torchrun rank); rank 0 reports."""
    from brigade.engine.torchrun_backend import is_rank0
    from brigade.engine.train import run_training, validate
    from brigade.schedulers import write_chrome_trace

    from brigade.engine.phases import PhaseLog

    cfg = validate(cfg or config_from_args(args))  # every check before any cluster or bar
    from brigade.engine.preflight import preflight, preflight_text

    console = Console(stderr=True)
    phases = PhaseLog(output.phase_printer(console, ("restored", "checkpoint") if args.quiet
                                           else None))
    with phases.timed("checked", lambda: preflight_text(cfg)):
        warnings = preflight(cfg)  # data, split, schedule, checkpoint: before any cluster
    for line in warnings:
        print(f"brigade train: warning: {line}", file=sys.stderr)
    log = console.print if is_rank0() else None

    def announce(part) -> None:  # the cut and the per-stage cost it balanced, before training
        if is_rank0() and part is not None and part.profile is not None:  # measured only
            console.print(part.table())

    with output.progress_bar(console, "training", disable=args.quiet) as update:
        report = run_training(cfg, progress=update, log=log, announce=announce,
                              phases=phases)
    if not is_rank0():
        return 0
    print_report(report, Console())
    if args.save:
        output.save_state_dict(report["state_dict"], args.save)
    if args.trace:
        write_chrome_trace(report["timeline"], args.trace)  # opens in Perfetto
    if args.json:
        output.write_json(args.json, output.json_figures(report))
    return 0


def print_report(report: dict, console: Console) -> None:
    """Accuracy, throughput and the per-stage idle-time table."""
    cfg = report["config"]
    console.print(
        f"[bold]{cfg['model']}[/] on {cfg['data']}: {report['steps']} steps, "
        f"schedule {cfg['schedule']}, method {cfg['method']}, backend {cfg['backend']}, "
        f"balance {report['balance']}"
    )
    console.print(
        f"test accuracy [bold]{report['final_test_accuracy']:.4f}[/]   "
        f"test loss {report['final_test_loss']:.4f}   "
        f"throughput {report['samples_per_s']:.1f} samples/s   "
        f"train wall {report['wall_s']:.1f} s"
    )
    output.print_run_figures(report, console)
    table = Table(title="per-stage time (measured)")
    for col in ("worker", "stages", "busy s", "idle fraction", "peak stored activations"):
        table.add_column(col, justify="right")
    for row in report["stages"]:
        table.add_row(
            str(row["worker"]), ",".join(map(str, row["stages"])), f"{row['busy_s']:.2f}",
            f"{row['idle_fraction']:.3f}", output.fmt_bytes(row["peak_stored_activation_bytes"]),
        )
    console.print(table)
