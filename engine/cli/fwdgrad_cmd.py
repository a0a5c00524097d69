"""``brigade fwdgrad``: shared-seed data-parallel forward-gradient training on Ray.

N workers each hold a replica and a shard of the training set; per round each sends back only
its directional derivatives (a few scalars), the coordinator merges them (naive, mean,
weighted) and every replica applies the same update from regenerated directions. Prints test
accuracy, bytes on the wire per round and whether the replicas are still bit-identical;
``--json PATH`` writes those figures (``final_test_accuracy``, ``bytes_per_step``,
``wall_s``, ``train_loss`` per epoch, ``replicas_identical``, ...).
"""

from __future__ import annotations

import argparse
import sys
import time

from . import UsageError, int_list, output

__all__ = ["NAME", "HELP", "add_arguments", "run"]

NAME = "fwdgrad"
HELP = "Shared-seed data-parallel forward-gradient training (workers send scalars, not gradients)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=10, help="logical workers, one data shard each (default 10)")
    p.add_argument("--actors", type=int, default=None,
                   help="host processes the workers live in, several to a host sharing one replica "
                        "(default: one per worker, at most one per CPU of the cluster)")
    p.add_argument("--coordinator", default="actor",
                   help="actor (a Ray actor runs the rounds; the driver is off the round path) | driver")
    p.add_argument("--merge", default="mean", help="naive | mean | weighted (default mean)")
    p.add_argument("--directions", default="shared",
                   help="shared (default: one set per round for all workers; one row of scalars down per host) "
                        "| independent (a set per worker; every host receives every worker's scalars)")
    p.add_argument("--model", default="mlp", help="built-in model (see `brigade models`; default mlp)")
    p.add_argument("--width", type=int, default=None, help="hidden units (mlp) or channels (cnn)")
    p.add_argument("--data", default="mnist", help="data set (mnist, cifar10, synthetic, digits)")
    p.add_argument("--data-dir", default=None, help="folder holding the data set's files")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training samples")
    p.add_argument("--test-limit", type=int, default=None, help="use only the first N test samples")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64, help="samples per worker per round (default 64)")
    p.add_argument("--optimizer", default="adam", help="sgd | momentum | nesterov | adam | rmsprop (default adam)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: measured per optimizer and guess, scaled up for mean/weighted merging, 10x for a head on frozen conv features)")
    p.add_argument("--momentum", type=float, default=None, help="momentum / nesterov coefficient")
    p.add_argument("--clip-norm", type=float, default=None, help="clip each estimate to this L2 norm")
    p.add_argument("--decay", default="cosine",
                   help="learning-rate decay: cosine (default, to zero at the end of the run) | constant | "
                        "inverse | sqrt")
    p.add_argument("--weight-decay", type=float, default=None, help="decoupled weight decay")
    p.add_argument("--guess", default="random",
                   help="random (shared seed, scalars only) | local (aux-head guess; sends the estimate)")
    p.add_argument("--projections", default="auto",
                   help="directions per worker per round: N, or one count per block with --scope block "
                        "(e.g. 1,1,192; 0 freezes a block); auto (default): block scope, 192 on the last "
                        "block (whose jvp is cheap), 1 on the others, 0 on convolutional blocks")
    p.add_argument("--dist", default="rademacher", help="rademacher | gaussian")
    p.add_argument("--scope", default=None, help="global (one direction over the model) | block (per block)")
    p.add_argument("--blocks", default=None,
                   help="group the model's children into blocks, e.g. 4,1,1 (default: one per child)")
    p.add_argument("--shards", default="equal", help="equal | uneven (shard i holds a share ∝ i+1)")
    p.add_argument("--seed", type=int, default=0, help="the shared seed (default 0)")
    p.add_argument("--backend", default="ray", help="ray (actors) | local (workers in this process)")
    p.add_argument("--placement", default="pack", help="host actors' placement group: pack | spread | strict_pack | strict_spread")
    p.add_argument("--cpus-per-worker", type=float, default=0.0,
                   help="CPUs reserved per host actor (default 0: no reservation, no placement group)")
    p.add_argument("--address", default=None, help="join this Ray cluster (`auto` or host:port)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray cluster started on demand")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for a worker before failing")
    p.add_argument("--json", default=None, metavar="PATH", help="write the figures as JSON")
    p.add_argument("--save", default=None, metavar="PATH", help="write the trained state_dict")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _blocks(text: str | None) -> tuple[int, ...] | None:
    return None if text is None else tuple(int_list("--blocks", text, "4,1,1"))


def _projections(text: str, model=None, blocks=None) -> int | tuple[int, ...]:
    """``--projections``: a count, one per block, or auto (``fgdp.auto_projections`` of
    ``model``; 1 while the model is not built yet, for an early check of the flags)."""
    if str(text).strip().lower() == "auto":
        from brigade.engine.fgdp import auto_projections

        ns = (1,) if model is None else auto_projections(model, blocks)
    else:
        ns = tuple(int_list("--projections", text, "1,1,256",
                            "an integer or comma-separated integers"))
    if not ns:
        raise UsageError("--projections needs at least one number")
    return ns[0] if len(ns) == 1 else ns


def config_from_args(args: argparse.Namespace, model=None):
    """The system's settings; ``model`` (once built) resolves ``--projections auto``."""
    from brigade.engine.fgdp import FGDPConfig

    okw = {
        k: v
        for k, v in dict(momentum=args.momentum, clip_norm=args.clip_norm, decay=args.decay,
                         weight_decay=args.weight_decay).items()
        if v is not None
    }
    auto = str(args.projections).strip().lower() == "auto"
    blocks = _blocks(args.blocks)
    projections = 1 if args.guess == "local" else _projections(args.projections, model, blocks)
    scope = args.scope or ("block" if auto or isinstance(projections, tuple) or args.guess == "local" else "global")
    if auto and scope == "global":
        projections = 1
    from brigade.engine.fgdp import auto_lr_scale

    lr_scale = auto_lr_scale(projections) if auto and model is not None else 1.0
    return FGDPConfig(
        workers=args.workers, merge=args.merge, directions=args.directions, guess=args.guess,
        projections=projections, dist=args.dist, scope=scope, blocks=blocks, optimizer=args.optimizer,
        lr=args.lr, optimizer_kw=okw, batch_size=args.batch_size, shards=args.shards,
        seed=args.seed, timeout_s=args.timeout, actors=args.actors, coordinator=args.coordinator,
        placement=args.placement, cpus_per_worker=args.cpus_per_worker, lr_scale=lr_scale,
    )


def _data(args: argparse.Namespace):
    from brigade.stages.data import load_dataset

    train = load_dataset(args.data, args.data_dir, "train")
    test = load_dataset(args.data, args.data_dir, "test")
    for flag, value in (("--train-limit", args.train_limit), ("--test-limit", args.test_limit)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be a positive number of samples; got {value}")
    if args.train_limit:
        train = train.take(args.train_limit)
    if args.test_limit:
        test = test.take(args.test_limit)
    return train, test


def _model(args: argparse.Namespace, train):
    import torch

    from brigade.stages.models import build_model, model_options, shape_kwargs

    shape = shape_kwargs(tuple(train.x.shape[1:]), train.num_classes)
    kw = {k: v for k, v in {**shape, "width": args.width}.items() if v is not None and k in model_options(args.model)}
    torch.manual_seed(args.seed)
    return build_model(args.model, **kw)


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from brigade.engine.errors import PipelineConfigError
    from brigade.engine.fgdp import FGWorkerError, ForwardGradientDP

    if args.epochs < 1:
        raise UsageError(f"--epochs must be at least 1; got {args.epochs}")
    config_from_args(args)  # bad settings fail before any data is read
    train, test = _data(args)
    model = _model(args, train)
    cfg = config_from_args(args, model)
    torch.set_num_threads(1)
    console = Console(stderr=True)
    if cfg.guess == "local":
        console.print("note: --guess local: a local-loss guess depends on each worker's data and cannot be "
                      "regenerated from the seed, so every worker sends a parameter-sized estimate each round "
                      "(ordinary data-parallel traffic, not scalars)")
    started = time.perf_counter()
    try:
        dp = ForwardGradientDP(model, train, test, None, cfg, address=args.address, num_cpus=args.num_cpus,
                               backend=args.backend)
    except PipelineConfigError as err:  # e.g. no Ray cluster at --address
        raise UsageError(str(err)) from None
    except FGWorkerError as err:
        print(f"brigade fwdgrad: error: {err}", file=sys.stderr)
        return 1
    try:
        total = args.epochs * dp.rounds_per_epoch
        with output.progress_bar(console, f"fwdgrad x{cfg.workers}", disable=args.quiet) as update:
            update(0, total, {})

            def on_round(rec: dict) -> None:
                update(rec["t"] + 1, total, {"epoch": rec["epoch"] + 1, "loss": rec["loss"],
                                             "bytes/round": output.fmt_bytes(rec["bytes"])})

            def on_epoch(e: int, ep: dict) -> None:
                console.print(_epoch_line(ep))

            report = dp.fit(args.epochs, on_round=on_round, on_epoch=on_epoch)
        state = dp.state_dict() if args.save else None
    except FGWorkerError as err:  # a worker raised, died or went silent: one line, no hang
        print(f"brigade fwdgrad: error: {err}", file=sys.stderr)
        return 1
    finally:
        dp.shutdown()
    report.update(model=args.model, data=args.data, workers=cfg.workers, merge=cfg.merge,
                  guess=cfg.guess, backend=args.backend, total_wall_s=time.perf_counter() - started)
    print_report(report, Console())
    if args.save:
        output.save_state_dict(state, args.save)
    if args.json:
        output.write_json(args.json, report)
    return 0


def _epoch_line(ep: dict) -> str:
    acc = ep.get("test_accuracy")
    return (f"epoch {ep['epoch']:2d}  train loss {ep['train_loss']:.4f}"
            + (f"  test accuracy {acc:.4f}" if acc is not None else ""))


def print_report(report: dict, console) -> None:
    cfg = report["config"]
    fb = output.fmt_bytes
    console.print(
        f"[bold]{report['model']}[/] on {report['data']}: {cfg['workers']} workers on {report['hosts']} hosts, "
        f"merge {cfg['merge']}, guess {cfg['guess']}, directions {cfg['directions']}, "
        f"projections {cfg['projections']}, {cfg['optimizer']} lr {cfg['lr']:g}"
        f"{' ' + cfg['optimizer_kw']['decay'] if cfg['optimizer_kw'].get('decay') else ''}, "
        f"{report['rounds']} rounds, backend {report['backend']}, coordinator "
        f"{cfg['coordinator'] if report['backend'] == 'ray' else 'in-process'}"
    )
    for ep in report["epochs"]:
        console.print(_epoch_line(ep))
    console.print(
        f"test accuracy [bold]{report['final_test_accuracy']:.4f}[/]   train wall {report['wall_s']:.1f} s   "
        f"{report['rounds_per_s']:.2f} rounds/s"
    )
    console.print(
        f"wire per round {fb(report['bytes_per_step'])} (up {fb(report['bytes_up_per_step'])}, "
        f"down {fb(report['bytes_down_per_step'])}); per worker {fb(report['bytes_per_worker_per_step'])} "
        f"(up {fb(report['bytes_up_per_worker_per_step'])}, down {fb(report['bytes_down_per_worker_per_step'])}); "
        f"{report['scalars_per_worker_per_step']} scalars per worker; start-up {fb(report['startup_bytes'])} "
        f"({fb(report['startup_bytes_per_worker'])} per worker); parameters {fb(report['param_bytes'])}"
    )
    console.print(
        f"replicas identical: {report['replicas_identical']} ({report['hosts']} replicas, "
        f"sha256 {report['param_hash'][:16]})"
    )
