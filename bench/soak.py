"""Soak: thousands of steps of a 2-stage pipeline per schedule and rule, actor memory sampled.

    python bench/soak.py                              # 2,000 steps of every rule
    python bench/soak.py --steps 300 --schedules 1f1b,dni --json soak.json

Each stage actor's resident memory (VmRSS from /proc, the process ids the Pipeline reports)
is sampled every ``--every`` steps. After warm-up (``--warmup``, step 500) memory must not
grow: no activations, futures or queue items may leak. Prints, per run and stage, RSS at
steps 100, 500, 1,000 and the last, and the slope after warm-up (least squares over the
samples from ``--warmup`` on, MB per 1,000 steps; the target is <= 1), split into private
memory (RssAnon: the heap, where a leak shows) and shared memory pages touched (RssShmem:
Ray's object store is mapped into every worker, and the pages its objects pass through count
in VmRSS up to the store's size, with no leak).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from brigade.engine import Pipeline
from brigade.stages import fg_optim
from brigade.stages.data import load_dataset
from brigade.stages.models import build_model

# run name -> (schedule, method, schedule options, steps per pipelined run): every
# backprop schedule and every rule; decoupled ones run windows of steps, as `brigade train`
# runs them (25, so that the windows end on the sampled steps).
RUNS = {
    "gpipe": ("gpipe", "backprop", {}, 1),
    "1f1b": ("1f1b", "backprop", {}, 1),
    "zb1p": ("zb1p", "backprop", {}, 1),
    "interleaved": ("interleaved", "backprop", {}, 1),
    "stale": ("stale", "stale", {"k": 4}, 1),
    "dni": ("dni", "dni", {}, 25),
    "cdni": ("dni", "cdni", {}, 25),
    "petra": ("petra", "petra", {}, 25),
    "fwdgrad": ("fwdgrad", "fwdgrad", {}, 1),
}
MARKS = (100, 500, 1000, 2000)  # steps whose RSS the table shows (those within --steps)


def rss_bytes(pid: int) -> dict[str, int]:
    """Resident memory of a process from one read of /proc (Linux): ``VmRSS`` (all of it),
    ``RssAnon`` (private: the heap, where a leak shows) and ``RssShmem`` (shared memory pages
    it has touched: Ray's object store, mapped into every worker, counts here as its objects
    come and go, up to the store's size, without any leak)."""
    want = ("VmRSS", "RssAnon", "RssShmem")
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in want:
            found[key] = int(line.split()[1]) * 1024
    if len(found) < len(want):
        raise RuntimeError(f"no {', '.join(k for k in want if k not in found)} for pid {pid}")
    return found


def slope_mb_per_k(samples: list[tuple[int, list[int]]], stage: int, start: int) -> float:
    """Least-squares slope of one stage's RSS over the samples at or after ``start``, in MB
    per 1,000 steps (a line through every sample, so one spike does not decide it)."""
    pts = [(s, rss[stage] / 2**20) for s, rss in samples if s >= start]
    if len(pts) < 2:
        return float("nan")
    mx = sum(s for s, _ in pts) / len(pts)
    my = sum(r for _, r in pts) / len(pts)
    var = sum((s - mx) ** 2 for s, _ in pts)
    return 1000 * sum((s - mx) * (r - my) for s, r in pts) / var


def soak(name: str, args) -> dict:
    schedule, method, sched_opts, window = RUNS[name]
    virtual = 2 if schedule == "interleaved" else 1
    if method == "petra":
        model = build_model("revnet18", width=8, in_channels=1, image_size=28)
    elif virtual > 1:  # 4 model stages: needs at least 4 blocks
        model = build_model("cnn", width=8)
    else:
        model = build_model("mlp", width=256)
    data = load_dataset("synthetic", like="mnist", size=args.batch_size * 8, seed=0)
    batches = [(data.x[i:i + args.batch_size], data.y[i:i + args.batch_size])
               for i in range(0, len(data), args.batch_size)]
    import ray

    samples: list[tuple[int, list[int]]] = []
    private: list[tuple[int, list[int]]] = []  # RssAnon per stage
    shared: list[tuple[int, list[int]]] = []  # RssShmem per stage
    in_use: list[tuple[int, list[int]]] = []  # glibc malloc's bytes in use, per stage
    blocks: list[tuple[int, list[int]]] = []  # Python objects' blocks allocated, per stage
    pending: list[int] = []
    t0 = time.perf_counter()
    optimizer = lambda p: torch.optim.SGD(p, lr=0.01)  # noqa: E731
    if method == "fwdgrad":
        optimizer = functools.partial(fg_optim.make_optimizer, "adam", lr=1e-3)
    with Pipeline(model, stages=2, schedule=schedule, method=method, virtual=virtual,
                  microbatches=4, optimizer=optimizer,
                  loss_fn=nn.CrossEntropyLoss(), backend="ray", cpus_per_stage=1,
                  schedule_options=sched_opts) as pipe:
        pids = pipe.worker_pids
        done = 0
        while done < args.steps:
            n = min(window, args.steps - done)
            pipe.run([batches[(done + i) % len(batches)] for i in range(n)])
            done += n
            pipe.reset_timeline()  # the driver's event log is not what we measure
            if done % args.every < n or done == args.steps:  # windows may step past a mark
                mem_now = [rss_bytes(p) for p in pids]
                samples.append((done, [m["VmRSS"] for m in mem_now]))
                private.append((done, [m["RssAnon"] for m in mem_now]))
                shared.append((done, [m["RssShmem"] for m in mem_now]))
                mem = ray.get([a.memory.remote() for a in pipe._backend.actors])
                in_use.append((done, [m["malloc_in_use"] for m in mem]))
                blocks.append((done, [m["python_blocks"] for m in mem]))
                pending = [m["pending_messages"] for m in mem]
    wall = time.perf_counter() - t0
    at_warm = next((r for s, r in samples if s >= args.warmup), samples[0][1])
    last = samples[-1][1]
    marks = {m: next(r for s, r in samples if s >= m) for m in MARKS if m <= args.steps}
    return {"name": name, "schedule": schedule, "method": method, "steps": args.steps,
            "wall_s": wall, "rss_at_warmup": at_warm, "rss_at_end": last, "rss_at": marks,
            "growth_bytes": [b - a for a, b in zip(at_warm, last)],
            "slope_mb_per_1000": [slope_mb_per_k(samples, i, args.warmup)
                                  for i in range(len(pids))],
            "private_slope_mb_per_1000": [slope_mb_per_k(private, i, args.warmup)
                                          for i in range(len(pids))],
            "shared_slope_mb_per_1000": [slope_mb_per_k(shared, i, args.warmup)
                                         for i in range(len(pids))],
            "in_use_slope_mb_per_1000": [slope_mb_per_k(in_use, i, args.warmup)
                                         for i in range(len(pids))],
            "python_blocks_per_1000": [2**20 * slope_mb_per_k(blocks, i, args.warmup)
                                       for i in range(len(pids))],
            "pending_messages_at_end": pending, "samples": samples, "malloc_in_use": in_use,
            "private": private, "shared": shared}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", default=",".join(RUNS))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=500,
                        help="step from which the slope is fitted (default 500)")
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    import ray
    from rich.console import Console
    from rich.table import Table

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    rows = []
    try:
        for name in [s.strip() for s in args.schedules.split(",") if s.strip()]:
            if name not in RUNS:
                print(f"unknown schedule {name!r}; valid: {', '.join(RUNS)}", file=sys.stderr)
                return 2
            rows.append(soak(name, args))
            r = rows[-1]
            curve = "  ".join(f"{s}:{'/'.join(f'{b / 2**20:.0f}' for b in rss)}"
                              for s, rss in r["samples"])
            print(f"{name}: {r['steps']} steps in {r['wall_s']:.0f} s, slope after step "
                  f"{args.warmup}: {[round(g, 2) for g in r['slope_mb_per_1000']]} MB/1000 "
                  f"steps (private RssAnon: {[round(g, 2) for g in r['private_slope_mb_per_1000']]}, "
                  f"shared RssShmem: {[round(g, 2) for g in r['shared_slope_mb_per_1000']]}, "
                  f"malloc in use: "
                  f"{[round(g, 2) for g in r['in_use_slope_mb_per_1000']]}); RSS MB per "
                  f"stage by step: {curve}", file=sys.stderr, flush=True)
            if args.json:  # after every run: a long soak keeps what it has measured
                Path(args.json).write_text(json.dumps(rows, indent=2))
    finally:
        ray.shutdown()
    marks = [m for m in MARKS if m <= args.steps]
    table = Table(title=f"actor resident memory (MB) by step; slope fitted from step "
                        f"{args.warmup} to {args.steps}")
    for col in ("run", "method", "stage", *(f"@{m}" for m in marks), "MB / 1000 steps",
                "private (RssAnon)", "shared (RssShmem)", "malloc in use, MB / 1000 steps", "Python blocks / 1000 steps",
                "messages left"):
        table.add_column(col, justify="right")
    for r in rows:
        for s, slope in enumerate(r["slope_mb_per_1000"]):
            table.add_row(r["name"], r["method"], str(s),
                          *(f"{r['rss_at'][m][s] / 2**20:.1f}" for m in marks), f"{slope:+.2f}",
                          f"{r['private_slope_mb_per_1000'][s]:+.2f}",
                          f"{r['shared_slope_mb_per_1000'][s]:+.2f}",
                          f"{r['in_use_slope_mb_per_1000'][s]:+.2f}",
                          f"{r['python_blocks_per_1000'][s]:+.0f}",
                          str(r["pending_messages_at_end"][s]))
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
