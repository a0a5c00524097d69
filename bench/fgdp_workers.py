"""Shared-seed forward gradients against the number of workers, at a fixed sample budget.

For each worker count (default 1, 2, 4, 10, 32) the same number of training samples is
processed (``--budget-epochs`` passes over the training set, batch 64 per worker, so N
workers take N times fewer rounds), with the defaults of ``brigade fwdgrad`` otherwise
(shared directions, mean merge, Adam with a cosine schedule, projections auto). Prints, and
writes with ``--json``, one row per count: rounds, rounds/s, samples/s, test accuracy, bytes
per round (up, down, per worker), start-up bytes, and whether the replicas are
bit-identical. Workers live several to a host actor beyond ``--max-actors`` (default 10);
the coordinator is a Ray actor.

    python bench/fgdp_workers.py --data-dir ../shared/data/mnist
    python bench/fgdp_workers.py --workers 1,2,4 --budget-epochs 1 --train-limit 2000   # quick

Timings on a shared machine are noisy: compare the rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def run_one(workers: int, train, test, args) -> dict:
    from brigade.engine.cli.fwdgrad_cmd import add_arguments, config_from_args
    from brigade.engine.fgdp import ForwardGradientDP
    from brigade.stages.models import build_model, shape_kwargs

    p = argparse.ArgumentParser()
    add_arguments(p)
    flags = ["--workers", str(workers), "--model", args.model, "--batch-size", str(args.batch_size),
             "--seed", str(args.seed), "--actors", str(min(workers, args.max_actors))]
    cli = p.parse_args(flags + args.extra)
    torch.manual_seed(args.seed)
    model = build_model(args.model, **shape_kwargs(tuple(train.x.shape[1:]), train.num_classes))
    cfg = config_from_args(cli, model)
    rounds_total = max(1, round(args.budget_epochs * len(train.y) / (workers * args.batch_size)))
    t0 = time.perf_counter()
    with ForwardGradientDP(model, train, test, None, cfg) as dp:
        start_s = time.perf_counter() - t0
        # the schedule's length is the run's: a cosine decay ends with the budget
        dp._ask("set_total_steps", rounds_total * (workers if cfg.merge == "naive" else 1))
        t1 = time.perf_counter()
        recs = dp.run(rounds_total)
        wall = time.perf_counter() - t1
        rep = dp.report([], wall)
    n = sum(r["samples"] for r in recs)
    return {
        "workers": workers, "hosts": rep["hosts"], "rounds": len(recs), "samples": n,
        "rounds_per_s": len(recs) / wall, "samples_per_s": n / wall, "wall_s": wall, "start_s": start_s,
        "test_accuracy": rep["final_test_accuracy"], "bytes_per_round": rep["bytes_per_step"],
        "bytes_up_per_round": rep["bytes_up_per_step"], "bytes_down_per_round": rep["bytes_down_per_step"],
        "bytes_per_worker_per_round": rep["bytes_per_worker_per_step"], "startup_bytes": rep["startup_bytes"],
        "replicas_identical": rep["replicas_identical"], "param_hash": rep["param_hash"][:16],
        "lr": cfg.lr, "projections": cfg.projections,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"))
    p.add_argument("--model", default="mlp")
    p.add_argument("--workers", default="1,2,4,10,32")
    p.add_argument("--budget-epochs", type=float, default=3.0, help="samples processed, in passes over the training set")
    p.add_argument("--batch-size", type=int, default=64, help="per worker per round")
    p.add_argument("--max-actors", type=int, default=10, help="host actors at most; more workers share hosts")
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: the machine's)")
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="more `brigade fwdgrad` flags after --")
    args = p.parse_args(argv)
    args.extra = [a for a in args.extra if a != "--"]
    counts = [int(v) for v in args.workers.split(",") if v.strip()]
    if not counts or min(counts) < 1:
        p.error(f"--workers needs positive counts; got {args.workers!r}")

    import ray

    from brigade.stages.data import load_dataset

    torch.set_num_threads(1)
    train = load_dataset("mnist", args.data_dir, "train")
    test = load_dataset("mnist", args.data_dir, "test")
    if args.train_limit:
        train = train.take(args.train_limit)
    started = False
    if not ray.is_initialized():
        from brigade.engine.quiet import quiet_ray

        quiet_ray()  # no "Token authentication is enabled" banner above the table
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, logging_level="WARNING",
                 log_to_driver=False)
        started = True
    rows = []
    try:
        print(f"{args.model} on MNIST, {len(train.y)} train / {len(test.y)} test, budget {args.budget_epochs:g} "
              f"epochs ({round(args.budget_epochs * len(train.y))} samples), batch {args.batch_size} per worker")
        print(f"{'workers':>7} {'hosts':>5} {'rounds':>6} {'rounds/s':>8} {'samples/s':>9} {'test acc':>8} "
              f"{'B/round':>8} {'up':>7} {'down':>7} {'B/worker':>8} {'start-up':>9} identical")
        for n in counts:
            r = run_one(n, train, test, args)
            rows.append(r)
            print(f"{r['workers']:>7} {r['hosts']:>5} {r['rounds']:>6} {r['rounds_per_s']:>8.2f} "
                  f"{r['samples_per_s']:>9.0f} {r['test_accuracy']:>8.4f} {r['bytes_per_round']:>8.0f} "
                  f"{r['bytes_up_per_round']:>7.0f} {r['bytes_down_per_round']:>7.0f} "
                  f"{r['bytes_per_worker_per_round']:>8.0f} {r['startup_bytes']:>9.0f} {r['replicas_identical']}",
                  flush=True)
    finally:
        if started:
            ray.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
