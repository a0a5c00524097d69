"""``brigade train``: train a built-in model on a built-in data set through a pipeline."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from . import output
from . import UsageError, int_list

NAME = "train"
HELP = "Train a built-in model on a data set with a pipeline; print accuracy and idle time."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``brigade train`` (README lists them with examples)."""
    p.add_argument("--model", default="mlp", help="built-in model (see `brigade models`)")
    p.add_argument("--width", type=int, default=None, help="base width (channels / units)")
    p.add_argument("--data", default="synthetic",
                   help="synthetic | mnist | cifar10 | digits (default: synthetic)")
    p.add_argument("--data-dir", default=None, help="folder holding the data set's files")
    p.add_argument("--stages", type=int, default=2, help="pipeline workers (default 2)")
    p.add_argument("--balance", default=None,
                   help="blocks per stage, comma-separated (workers x virtual entries)")
    p.add_argument("--balance-by", default="uniform", choices=["uniform", "params", "time"],
                   help="how to cut the model when --balance is not given")
    p.add_argument("--schedule", default=None,
                   help="gpipe | 1f1b | interleaved | zb1p | dni | petra | stale | fwdgrad "
                        "(default: the method's own)")
    p.add_argument("--method", default="backprop",
                   help="backprop | dni | cdni | petra | stale | fwdgrad (default backprop; "
                        "fwdgrad pipelines forward only; with --stages 1 --backend local it "
                        "is the single-process estimator)")
    p.add_argument("--window", type=int, default=None,
                   help="steps per pipelined run (default 1; 32 for dni and petra, which "
                        "do not flush between the steps of a run)")
    p.add_argument("--stale-k", type=int, default=None,
                   help="stale: one backprop step every k steps (default 4)")
    p.add_argument("--accumulate", type=int, default=None,
                   help="petra: microbatches per update (default: --microbatches)")
    p.add_argument("--sg-lr", type=float, default=None,
                   help="dni/cdni: synthetic-gradient module learning rate (default 1e-3)")
    p.add_argument("--sg-hidden-layers", type=int, default=None,
                   help="dni/cdni: hidden layers of the synthesizer, 0-2 (default 1)")
    p.add_argument("--update-prob", type=float, default=None,
                   help="dni/cdni: probability that a stage updates on a microbatch")
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--virtual", type=int, default=1, help="stages per worker (interleaved)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default 0.05; fwdgrad: the optimizer's measured one)")
    p.add_argument("--optimizer", default=None,
                   help="sgd | momentum | nesterov | adam | adamw | rmsprop (default momentum: "
                        "SGD with momentum 0.9; dni/cdni: sgd; fwdgrad: adam)")
    p.add_argument("--guess", default="random", choices=["random", "local"],
                   help="fwdgrad: direction guesses, random or from local auxiliary losses "
                        "(local: --stages 1 --backend local only)")
    p.add_argument("--projections", default="auto",
                   help="fwdgrad: directions per step, an integer or auto (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="ray", choices=["ray", "local", "torchrun"],
                   help="ray: one actor per stage (default); local: one process; "
                        "torchrun: one rank per stage, started with torchrun")
    p.add_argument("--address", default=None,
                   help="join an existing Ray cluster (auto or host:port)")
    p.add_argument("--cpus-per-stage", type=float, default=None, metavar="N",
                   help="CPUs each stage actor reserves (default: a fair share of the cluster)")
    p.add_argument("--gpus-per-stage", type=float, default=None, metavar="N",
                   help="GPUs each stage actor reserves (default: 1 where the cluster has one "
                        "per stage, else 0)")
    p.add_argument("--placement", default="pack", metavar="STRATEGY",
                   help="how stage actors are laid over the nodes: pack (default), spread, "
                        "strict_pack, strict_spread")
    p.add_argument("--placement-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="how long to wait for the cluster to place every stage (default 30)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the figures as JSON")
    p.add_argument("--save", default=None, metavar="PATH", help="write the trained state_dict")
    p.add_argument("--trace", default=None, metavar="PATH",
                   help="write the measured timeline as a Chrome trace (open it in "
                        "ui.perfetto.dev; `brigade report PATH` reads it)")
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="save checkpoints in DIR (atomically; at the end and every N steps)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="steps between checkpoints (default: only at the end)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --checkpoint DIR")
    p.add_argument("--max-restarts", type=int, default=0, metavar="K",
                   help="when a stage fails, restart from the last checkpoint up to K times")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _balance(text: str | None) -> list[int] | None:
    return None if text is None else int_list("--balance", text, "2,3")


def config_from_args(args: argparse.Namespace):
    """Turn parsed flags into a TrainConfig (its checks name the bad value)."""
    from brigade.engine.train import TrainConfig

    return TrainConfig(
        model=args.model, width=args.width, data=args.data, data_dir=args.data_dir,
        stages=args.stages, balance=_balance(args.balance), balance_by=args.balance_by,
        schedule=args.schedule, method=args.method, microbatches=args.microbatches,
        virtual=args.virtual, batch_size=args.batch_size, epochs=args.epochs,
        steps=args.steps, lr=args.lr, optimizer=args.optimizer, seed=args.seed,
        backend=args.backend, address=args.address, window=args.window,
        cpus_per_stage=args.cpus_per_stage, gpus_per_stage=args.gpus_per_stage,
        placement=args.placement, placement_timeout=args.placement_timeout,
        checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
        resume=args.resume, max_restarts=args.max_restarts, guess=args.guess,
        projections=args.projections,
        options=_method_options(args), schedule_options=_schedule_options(args),
    )


def _method_options(args: argparse.Namespace) -> dict:
    """Stage-class options given on the command line (only those that were set)."""
    pairs = {"sg_lr": args.sg_lr, "sg_hidden_layers": args.sg_hidden_layers,
             "update_prob": args.update_prob}
    given = {k: v for k, v in pairs.items() if v is not None}
    if given and args.method not in ("dni", "cdni"):
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise UsageError(f"{flags} apply to --method dni or cdni, not {args.method!r}")
    return given


def _schedule_options(args: argparse.Namespace) -> dict:
    """Schedule options given on the command line, checked against the method."""
    opts = {}
    if args.stale_k is not None:
        if args.method != "stale":
            raise UsageError(f"--stale-k applies to --method stale, not {args.method!r}")
        opts["k"] = args.stale_k
    if args.accumulate is not None:
        if args.method != "petra":
            raise UsageError(f"--accumulate applies to --method petra, not {args.method!r}")
        opts["accumulate"] = args.accumulate
    return opts


def run(args: argparse.Namespace) -> int:
    if args.backend == "torchrun":
        return _spawn_torchrun(args)
    return run_here(args)


def _spawn_torchrun(args: argparse.Namespace) -> int:
    """Start ``torchrun --nproc-per-node <workers> -m brigade.engine.launch <same flags>``,
    its ranks with the malloc settings Ray stage actors get (see ``actor_env``)."""
    import os
    import subprocess
    import sys

    from brigade.engine.ray_backend import actor_env

    cfg = config_from_args(args)  # bad flags fail here, before any process starts
    workers = len(cfg.balance) // cfg.virtual if cfg.balance else cfg.stages
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={workers}", "-m", "brigade.engine.launch", *args.argv[1:]]
    return subprocess.call(cmd, env={**os.environ, **actor_env()})


def run_here(args: argparse.Namespace) -> int:
    """Train in this process (the driver, or one torchrun rank); rank 0 reports."""
    from brigade.engine.torchrun_backend import is_rank0
    from brigade.engine.train import run_training
    from brigade.schedulers import write_chrome_trace

    cfg = config_from_args(args)
    console = Console(stderr=True)
    with output.progress_bar(console, "training", disable=args.quiet) as update:
        report = run_training(cfg, progress=update)
    if not is_rank0():
        return 0
    print_report(report, Console())
    if args.save:
        output.save_state_dict(report["state_dict"], args.save)
    if args.trace:
        if report["timeline"] is None:  # the single-process estimator runs no pipeline
            console.print("[yellow]--trace: a single-process run has no pipeline timeline; "
                          "nothing written[/]")
        else:
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
        f"throughput {report['samples_per_s']:.1f} samples/s   "
        f"train wall {report['wall_s']:.1f} s   bubble {report['bubble_fraction']:.3f}"
    )
    table = Table(title="per-stage time (measured)")
    for col in ("worker", "stages", "busy s", "idle fraction", "peak stored activations"):
        table.add_column(col, justify="right")
    for row in report["stages"]:
        table.add_row(
            str(row["worker"]), ",".join(map(str, row["stages"])), f"{row['busy_s']:.2f}",
            f"{row['idle_fraction']:.3f}", output.fmt_bytes(row["peak_stored_activation_bytes"]),
        )
    console.print(table)
