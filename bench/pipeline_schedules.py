"""Measured throughput and bubble of each backprop schedule beside the simulator's prediction.

    python bench/pipeline_schedules.py                 # 2 stages x 1 thread, m = 8
    python bench/pipeline_schedules.py --steps 20 --json out.json

On 2 Ray actors (one CPU thread each) it trains resnet18 (width 16, CIFAR-shaped synthetic
data, balanced by measured time) with gpipe, 1f1b, zb1p and interleaved (v = 2). For each:
warm-up steps, then rounds of: an in-place profile, the timed steps step by step
(``Pipeline.step``: one driver round trip per step), and the same steps as one pipelined
run (``Pipeline.run``: the steps' programs back to back, one driver round trip; this is what
the simulator models; the difference is the driver's overhead). Measured samples/s (wall
clock, driver included) and bubble fraction beside three predictions of the same schedule;
the in-place and calibrated ones are made per round and compared with that round's run (the
medians over rounds are printed; on a host shared with other jobs this machine's speed
drifts by 10-30% within minutes), the isolated one once per schedule:
  in place    costs from ``Pipeline.profile`` before the round's runs: every action of the
              schedule timed on the actors themselves, all at once, in the schedule's order,
              with recorded stand-ins for the messages it takes (nobody waits); its sends go
              out and are dropped on arrival, so both ends pay for them; the simulator
              replays each action's own profiled time (compute and sends), not its stage's
              mean (trace-driven: when the times vary, workers that wait on each other lose
              more than means say); the latency (the receiver's wake-up beyond the send,
              which a profile that never waits cannot see) is the run's mean, as calibrated
              below
  isolated    costs from profiling each stage alone in this process, the way
              bench/resnet_splits.py does: brigade's Stage class on the time-balanced split
              (F, B, zb1p's split I and W, the loss, the update), one microbatch at a
              time, the other core idle, sends not charged; the lower quartile of the
              last run's send spans as latency
  calibrated  costs from the run's own per-action spans (brigade.schedulers.predict)
Then the hand-off of a 4 MB activation by the engine's route beside torch.distributed gloo
send/recv in the same run (bench/transport.py; each route timed three times in rotating
order, the lowest median kept). Targets (issue 4): measured >= 0.9 x
predicted throughput (from the in-place profile; the isolated one is printed beside it);
hand-off <= 1.5 x gloo.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import resnet_splits  # noqa: E402  (bench/resnet_splits.py: the stage-class profile)
import transport  # noqa: E402  (bench/transport.py)

from brigade.engine import Pipeline  # noqa: E402
from brigade.schedulers import costs_from_timeline, predict, predict_from_profile  # noqa: E402
from brigade.stages.data import load_dataset  # noqa: E402

SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("zb1p", 1), ("interleaved", 2)]


def bench_config(args) -> "resnet_splits.BenchConfig":
    """resnet_splits' configuration for this benchmark's model, batch and schedules."""
    return resnet_splits.BenchConfig(
        models=(args.model,), shapes=("cifar",), stages=(2,),
        schedules=tuple(name for name, _ in SCHEDULES), microbatches=args.microbatches,
        batch_size=args.batch_size, width=args.width,
        virtual=max(v for _, v in SCHEDULES), measure=False, repeats=args.profile_repeats)


def run_schedule(model, data, schedule, virtual, balance, args) -> dict:
    """Warm up, then ``args.repeat`` rounds of: profile in place, ``args.steps`` steps
    step by step, the same steps as one run. Each round's prediction comes from its own
    profile and is compared with its own run (side by side: this machine's speed drifts by
    10-30% over minutes when other jobs share its host); medians over the rounds, and the
    last round's timeline."""
    with Pipeline(model, stages=balance, schedule=schedule, virtual=virtual,
                  microbatches=args.microbatches, cpus_per_stage=1,
                  optimizer=lambda p: torch.optim.SGD(p, lr=0.01),
                  loss_fn=nn.CrossEntropyLoss(), backend="ray") as pipe:
        batches = [data[i % len(data)] for i in range(args.steps)]
        pipe.run([data[i % len(data)] for i in range(args.warmup)])
        rounds = []
        for _ in range(args.repeat):
            profiled = pipe.profile(*data[0], steps=args.steps)
            t0 = time.perf_counter()
            for x, y in batches:
                pipe.step(x, y)
            stepwise = time.perf_counter() - t0
            pipe.reset_timeline()
            t0 = time.perf_counter()
            pipe.run(batches)
            rounds.append(_round(pipe.timeline(), profiled, time.perf_counter() - t0,
                                 stepwise, args.batch_size * args.steps))
    out = {k: statistics.median(r[k] for r in rounds) for k in rounds[0] if k != "timeline"}
    out.update(timeline=rounds[-1]["timeline"],
               rounds_measured_over_in_place=[r["measured_over_in_place"] for r in rounds])
    return out


def _round(tl, profiled, window_s: float, stepwise_s: float, samples: int) -> dict:
    """One round's figures: measured throughput (one run, and step by step) and the
    in-place and calibrated predictions with this run's message latency."""
    calibrated = costs_from_timeline(tl)
    in_place = predict_from_profile(tl, profiled, calibrated.latency)
    cal = predict(tl, calibrated)
    measured = samples / window_s
    return {"timeline": tl, "samples_per_s": measured,
            "stepwise_samples_per_s": samples / stepwise_s,
            "in_place_samples_per_s": in_place.throughput,
            "in_place_bubble": in_place.bubble_fraction,
            "measured_over_in_place": measured / in_place.throughput,
            "calibrated_samples_per_s": cal.throughput,
            "calibrated_bubble": cal.bubble_fraction, "measured_bubble": tl.bubble_fraction}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per schedule")
    parser.add_argument("--profile-repeats", type=int, default=5,
                        help="microbatches timed per stage action in the isolated profile "
                             "(median)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import ray

    torch.set_num_threads(1)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        hand = transport.measure(["4MB"], rounds=20, repeat=3)[0]
        torch.manual_seed(0)
        ds = load_dataset("synthetic", like="cifar10", size=args.batch_size * 4, seed=0)
        data = [(ds.x[i:i + args.batch_size], ds.y[i:i + args.batch_size])
                for i in range(0, len(ds), args.batch_size)]
        # the time-balanced split and each stage's action seconds for one microbatch, timed
        # on brigade's own Stage class; one profile per split and rule (gpipe and 1f1b
        # share theirs; each run's latency goes into a copy of the costs)
        cfg, cache = bench_config(args), {}
        blocks = resnet_splits.profile_model(cfg, args.model, "cifar")
        rows = []
        for name, virtual in SCHEDULES:
            model = resnet_splits.make_model(cfg, args.model, "cifar")
            sc = resnet_splits.split_costs(cfg, blocks, model, 2, name, cache)
            res = run_schedule(model, data, name, virtual, sc.balance, args)
            tl = res["timeline"]
            isolated = replace(sc.costs, latency=_latency_for(tl, hand), bandwidth=0.0)
            prof = resnet_splits.simulate_costs(cfg, name, 2, isolated, steps=args.steps)
            rows.append({
                "schedule": name, "virtual": virtual, "balance": sc.balance,
                "measured_samples_per_s": res["samples_per_s"],
                "measured_bubble": res["measured_bubble"],
                "stepwise_samples_per_s": res["stepwise_samples_per_s"],
                "in_place_samples_per_s": res["in_place_samples_per_s"],
                "in_place_bubble": res["in_place_bubble"],
                "measured_over_in_place": res["measured_over_in_place"],
                "rounds_measured_over_in_place": res["rounds_measured_over_in_place"],
                "profile_samples_per_s": prof.throughput, "profile_bubble": prof.bubble_fraction,
                "calibrated_samples_per_s": res["calibrated_samples_per_s"],
                "calibrated_bubble": res["calibrated_bubble"],
            })
            r = rows[-1]
            print(f"{name}: measured {r['measured_samples_per_s']:.1f} samples/s (step by step "
                  f"{r['stepwise_samples_per_s']:.1f}), in place "
                  f"{r['in_place_samples_per_s']:.1f}, isolated "
                  f"{r['profile_samples_per_s']:.1f}, calibrated "
                  f"{r['calibrated_samples_per_s']:.1f}", file=sys.stderr)
    finally:
        ray.shutdown()
    print_tables(rows, hand, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"schedules": rows, "handoff_4MB": hand},
                                              indent=2, default=str))
    return 0


def _latency_for(tl, hand: dict) -> float:
    """The message latency the profile's prediction uses (the sender is charged nothing):
    the lower quartile of this run's send spans, the transfer itself (a blocking send's
    longer spans also wait for the receiver); the 4 MB hand-off where the run sent nothing."""
    sends = sorted(e.duration for e in tl.events if e.category == "send")
    return sends[len(sends) // 4] if sends else hand["brigade-p2p"]


def print_tables(rows: list[dict], hand: dict, args) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{args.model} width {args.width}, 2 stages x 1 thread, "
                    f"m={args.microbatches}, batch {args.batch_size}, {args.steps} steps per run, "
                    f"medians of {args.repeat} runs")
    for col in ("schedule", "measured samples/s", "step by step", "predicted (in place)",
                "measured / predicted", "predicted (isolated)", "measured / isolated",
                "predicted (calibrated)", "bubble measured", "bubble predicted"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(
            r["schedule"] + (f" v={r['virtual']}" if r["virtual"] > 1 else ""),
            f"{r['measured_samples_per_s']:.1f}", f"{r['stepwise_samples_per_s']:.1f}",
            f"{r['in_place_samples_per_s']:.1f}",
            f"{r['measured_over_in_place']:.2f}",
            f"{r['profile_samples_per_s']:.1f}",
            f"{r['measured_samples_per_s'] / r['profile_samples_per_s']:.2f}",
            f"{r['calibrated_samples_per_s']:.1f}",
            f"{r['measured_bubble']:.3f}", f"{r['in_place_bubble']:.3f}",
        )
    console = Console(width=max(Console().width, 150))
    console.print(t)
    console.print(
        f"4 MB hand-off, one way (lowest of 3 medians): brigade engine route (p2p) "
        f"{hand['brigade-p2p'] * 1e3:.2f} ms, gloo send/recv {hand['gloo'] * 1e3:.2f} ms, "
        f"ratio {hand['brigade-p2p'] / hand['gloo']:.2f}x (target <= 1.5x); numpy via Ray "
        f"call {hand['ray-numpy'] * 1e3:.2f} ms; pickled torch tensor via Ray "
        f"{hand['ray-torch'] * 1e3:.2f} ms; in-process copy {hand['copy'] * 1e3:.3f} ms"
    )


if __name__ == "__main__":
    sys.exit(main())
