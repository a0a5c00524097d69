"""Where unlocking pays: decoupled methods against 1F1B as the microbatch count shrinks.

    python bench/unlocked_regime.py              # p=2, m in 1,2,4,8: revnet18 w16, MNIST MLP
    python bench/unlocked_regime.py --models revnet18 --microbatches 2 --json /tmp/regime.json

A flush schedule at p stages and m microbatches idles (p-1)/(m+p-1) of every step; a
decoupled schedule (dni, petra, dgl) never flushes, so on balanced stages it can run at
most (m+p-1)/m times as fast: 2x at p=2, m=1; 1.5x at m=2; 1.125x at m=8. This sweep
measures, for each model and m, real compute on the same split (same weights, same batch
of 64: CIFAR-shaped images for RevNet-18 at width 16, MNIST-shaped ones for the MNIST MLP
at its own width) with ``bench/resnet_splits.py``'s machinery (the package
``bench/resnet_bench``, imported directly): brigade's 1F1B, brigade's dni, petra (revnets
only: it needs reversible stages) and dgl, and torch.distributed.pipelining's Schedule1F1B
under torchrun (gloo), the runners taking turns round by round. It prints, per m, each
decoupled method's samples/s over brigade 1F1B and over torch 1F1B beside the ceiling
(m+p-1)/m. Figures are medians over the rounds of one run (``resnet_splits``' step times
are medians over timed steps); the machine's load average is printed, since on a shared
2-core machine the ratios move by tens of percent between runs.

The MLP's inputs are random (the throughput does not depend on the digits); its accuracy
race against backprop is ``brigade race``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from resnet_bench.config import BenchConfig  # noqa: E402  (bench/resnet_splits.py's package)
from resnet_bench.main import run as run_splits  # noqa: E402

from brigade.stages.errors import ConfigError  # noqa: E402

DECOUPLED = ("dni", "petra", "dgl")


def sweep_config(model: str, m: int, args) -> BenchConfig:
    """One point of the sweep: 2 stages, the model's shape, the model measured."""
    shape = "mnist" if model == "mlp" else "cifar"
    return BenchConfig(
        models=(model,), shapes=(shape,), stages=(2,), schedules=("1f1b", *DECOUPLED),
        microbatches=m, batch_size=args.batch_size, width=args.width,
        measure_models=(model,), measure_shape=shape, backends=tuple(args.backends.split(",")),
        measure_stages=2, warmup=args.warmup, steps=args.steps, window=args.window)


def ratios(rows: list[dict], m: int, p: int = 2) -> list[dict]:
    """Per decoupled method and brigade backend: samples/s over brigade 1F1B and torch 1F1B."""
    measured = [r for r in rows if r.get("runner") in ("brigade", "torch")]
    torch_1f1b = next((r for r in measured if r["runner"] == "torch" and r["schedule"] == "1f1b"), None)
    out = []
    for r in measured:
        if r["runner"] != "brigade" or r["schedule"] not in DECOUPLED:
            continue
        own = next((b for b in measured if b["runner"] == "brigade" and b["schedule"] == "1f1b"
                    and b.get("backend") == r.get("backend")), None)
        out.append({
            "model": r.get("model"), "m": m, "p": p, "method": r["schedule"],
            "backend": r.get("backend"),
            "samples_per_s": r["samples_per_s"],
            "over_brigade_1f1b": r["samples_per_s"] / own["samples_per_s"] if own else None,
            "over_torch_1f1b": (r["samples_per_s"] / torch_1f1b["samples_per_s"]
                                if torch_1f1b else None),
            "brigade_1f1b_samples_per_s": own["samples_per_s"] if own else None,
            "torch_1f1b_samples_per_s": torch_1f1b["samples_per_s"] if torch_1f1b else None,
            "ceiling": (m + p - 1) / m, "load_avg_1min": r.get("load_avg_1min"),
        })
    return out


def best_over_torch(points: list[dict]) -> dict[tuple[str, int], tuple[str, float]]:
    """Per (model, m): the decoupled method with the most samples/s over torch's 1F1B."""
    best: dict[tuple[str, int], tuple[str, float]] = {}
    for r in points:
        v, key = r["over_torch_1f1b"], (r["model"], r["m"])
        if v is not None and v > best.get(key, ("", 0.0))[1]:
            best[key] = (r["method"], v)
    return best


def print_sweep(console, points: list[dict]) -> None:
    from rich.table import Table

    table = Table(title="decoupled samples/s over 1F1B, p = 2 (medians of rounds, one run)")
    for c in ("model", "m", "method", "backend", "samples/s", "/ brigade 1F1B", "/ torch 1F1B",
              "ceiling (m+p-1)/m", "load"):
        table.add_column(c, justify="right")
    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in points:
        load = r["load_avg_1min"] or []
        table.add_row(str(r["model"]), str(r["m"]), r["method"], str(r["backend"]),
                      f"{r['samples_per_s']:.1f}",
                      f(r["over_brigade_1f1b"]), f(r["over_torch_1f1b"]), f"{r['ceiling']:.3f}",
                      "/".join(f"{v:.1f}" for v in load))
    console.print(table)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--microbatches", default="1,2,4,8", help="the m sweep (default 1,2,4,8)")
    p.add_argument("--models", default="revnet18,mlp",
                   help="comma list of models (default revnet18,mlp)")
    p.add_argument("--width", type=int, default=16, help="the revnet's base width (default 16; "
                   "the MLP keeps its own)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--backends", default="ray", help="brigade backends (ray, torchrun)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--window", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from rich.console import Console

    console = Console()
    try:
        ms = [int(v) for v in args.microbatches.split(",")]
        models = [v.strip() for v in args.models.split(",") if v.strip()]
        # every bad flag fails here, before anything starts
        cfgs = [(model, m, sweep_config(model, m, args)) for model in models for m in ms]
    except (ValueError, ConfigError) as err:
        print(f"unlocked_regime: error: {err}", file=sys.stderr)
        return 2
    points, raw = [], []
    for model, m, cfg in cfgs:
        console.print(f"[bold]{model}, m = {m}[/] (load {os.getloadavg()[0]:.1f})")
        res = run_splits(cfg, console)
        if res.torch_error:
            console.print(f"[yellow]torch side failed: {res.torch_error}[/]")
        raw += [{**r, "m": m} for r in res.rows if r.get("runner") in ("brigade", "torch")]
        points += ratios(res.rows, m)
        print_sweep(console, points)
    for (model, m), (method, v) in sorted(best_over_torch(points).items()):
        console.print(f"{model} m={m}: best decoupled / torch 1F1B = {v:.2f}x ({method}; "
                      f"ceiling {(m + 1) / m:.3f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps({"points": points, "rows": raw}, indent=2,
                                              default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
