"""Soak: thousands of steps of a 2-stage pipeline per schedule, actor memory sampled.

    python bench/soak.py                              # 2,000 steps per schedule
    python bench/soak.py --steps 300 --schedules 1f1b,dni --json soak.json

Each stage actor's resident memory (VmRSS from /proc, the process ids the Pipeline reports)
is sampled every ``--every`` steps. After warm-up (step 100) memory must not grow: no
activations, futures or queue items may leak. Prints, per schedule and stage, RSS at step
100 and at the last step, the growth, and the mailbox/stored-activation counts at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from brigade.engine import Pipeline
from brigade.stages.data import load_dataset
from brigade.stages.models import build_model

# schedule -> (method, schedule options, steps per pipelined run)
RUNS = {
    "gpipe": ("backprop", {}, 1),
    "1f1b": ("backprop", {}, 1),
    "zb1p": ("backprop", {}, 1),
    "interleaved": ("backprop", {}, 1),
    "stale": ("stale", {"k": 4}, 1),
    "dni": ("dni", {}, 50),
    "petra": ("petra", {}, 50),
}


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def soak(schedule: str, args) -> dict:
    method, sched_opts, window = RUNS[schedule]
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
    samples: list[tuple[int, list[int]]] = []
    t0 = time.perf_counter()
    with Pipeline(model, stages=2, schedule=schedule, method=method, virtual=virtual,
                  microbatches=4, optimizer=lambda p: torch.optim.SGD(p, lr=0.01),
                  loss_fn=nn.CrossEntropyLoss(), backend="ray", cpus_per_stage=1,
                  schedule_options=sched_opts) as pipe:
        pids = pipe.worker_pids
        done = 0
        while done < args.steps:
            n = min(window, args.steps - done)
            pipe.run([batches[(done + i) % len(batches)] for i in range(n)])
            done += n
            pipe.reset_timeline()  # the driver's event log is not what we measure
            if done % args.every == 0 or done == args.steps or done == args.warmup:
                samples.append((done, [rss_bytes(p) for p in pids]))
    wall = time.perf_counter() - t0
    at_warm = next((r for s, r in samples if s >= args.warmup), samples[0][1])
    last = samples[-1][1]
    return {"schedule": schedule, "method": method, "steps": args.steps, "wall_s": wall,
            "rss_at_warmup": at_warm, "rss_at_end": last,
            "growth_bytes": [b - a for a, b in zip(at_warm, last)], "samples": samples}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", default=",".join(RUNS))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=100)
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
            print(f"{name}: {r['steps']} steps in {r['wall_s']:.0f} s, RSS growth after step "
                  f"{args.warmup}: {[round(g / 2**20, 1) for g in r['growth_bytes']]} MB; "
                  f"RSS MB per stage by step: {curve}", file=sys.stderr)
    finally:
        ray.shutdown()
    table = Table(title=f"actor resident memory, step {args.warmup} -> step {args.steps}")
    for col in ("schedule", "stage", f"RSS @ {args.warmup}", f"RSS @ {args.steps}", "growth"):
        table.add_column(col, justify="right")
    for r in rows:
        for s, (a, b) in enumerate(zip(r["rss_at_warmup"], r["rss_at_end"])):
            table.add_row(r["schedule"], str(s), f"{a / 2**20:.1f} MB", f"{b / 2**20:.1f} MB",
                          f"{(b - a) / 2**20:+.1f} MB")
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
