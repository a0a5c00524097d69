"""Issue 5's benchmark: unlocked training (DNI, cDNI, stale gradients, PETRA) against
backpropagation on the MNIST folder, through the pipeline engine.

    python bench/unlocked_mnist.py                       # Ray, 2 actors x 1 thread, 1 epoch
    python bench/unlocked_mnist.py --quick               # a few minutes: fewer steps
    python bench/unlocked_mnist.py --backend local --sections accuracy
    python bench/unlocked_mnist.py --epochs 3 --json /tmp/unlocked.json

Every run uses the same data (``--data-dir``, default ../shared/data/mnist beside the
repository), the same seed, batch size, microbatch count, epochs and optimizer (``--optimizer``
/ ``--lr``, default plain SGD lr 0.05, one setting that serves every method; DNI and cDNI
make one update per microbatch, so at equal epochs they take m times as many steps as
backprop, which takes one per batch). Not SGD with momentum 0.9 (``brigade train``'s default
for backprop, not for DNI): at lr 0.05 its m per-microbatch updates give DNI an effective
step of ~40x lr per batch, which amplifies the synthetic gradient's bias (MNIST MLP, 2
stages, 1 epoch, lr 0.05: 45.4 % test accuracy with momentum against 90.6 % with plain SGD,
as engine/train.py's default_optimizer records; no NaN since the fix in stages/dni.py).
Each pipelined run covers ``--window`` steps (default 32) for every schedule, so the flush
schedules (GPipe, 1F1B, stale) still flush after every step while the decoupled ones (dni,
petra) fill and drain once per window; the driver's round trip between windows counts as
idle for all of them alike. DNI runs with ``--dni-lag`` 4 (the ``dni`` schedule's lag: the
SG is trained 4 microbatches after its forward, so a stage may run up to 4 microbatches
ahead of the next one instead of 1, which absorbs timing jitter on a shared CPU; measured
accuracy-neutral: MLP 1 epoch dni 90.5 / 90.3 %, cdni 90.4 / 90.8 % with lag 1 / 4).
The load average is printed: on a 2-core machine shared with other work the idle figures
move by several points between runs. Sections (``--sections``, all by default):

accuracy  the MLP (``build_model("mlp")``, 2 stages [1, 2]): backprop under 1F1B and GPipe,
          DNI, cDNI and the stale-gradient baseline (backprop every ``--stale-k`` steps).
          Test accuracy, training wall time, throughput, per-stage idle fraction.
revnet    RevNet-18 (width ``--revnet-width``, 1x28x28 input), 2 stages: backprop (1F1B) and
          PETRA on the same split and model.
idle      idle fraction per stage on a BALANCED 2-stage CPU run at the same m: GPipe and 1F1B
          against the decoupled dni, cdni and petra schedules, on ``--idle-model`` (RevNet-34:
          18 blocks, so a cut can balance within a few percent). Balanced means the cut that
          equalises the stages' compute under THAT method (bisection over cuts, each profiled
          for a few steps on the local backend in CPU seconds), since a synthetic-gradient
          module or PETRA's reconstruction adds work that a backprop balance ignores. Short:
          a warm-up run, then ``--idle-steps`` measured steps in one pipelined run.
memory    peak stored-activation bytes per stage, 1F1B vs PETRA, RevNet-18 on 4 stages with
          all-reversible middle stages (balance [1, 1, 1, 7]: stem | rev | rev | the rest).

A table of the issue's targets closes the report (measured value, target, met or not).
``--json PATH`` writes every figure printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mnist"
SECTIONS = ("accuracy", "revnet", "idle", "memory")
MEMORY_BALANCE = [1, 1, 1, 7]  # revnet18: Stem | RevBlock | RevBlock | Downsample ... Head
MLP_BALANCE = [1, 2]  # flatten+linear | linear, linear: the split `brigade train` makes
REVNET_BALANCE = [4, 6]  # revnet18 cut balanced for both backprop and PETRA (profiled)
IDLE_WARMUP = 4  # steps run (and not measured) before an idle measurement
BN_BATCHES = 100  # training microbatches that re-estimate BatchNorm statistics


@dataclass
class RunSpec:
    """One training run: a method on a model, everything else shared."""

    label: str
    model: str
    method: str
    schedule: str
    balance: list[int] | None = None  # None: by time (backprop profile)
    options: dict = field(default_factory=dict)
    schedule_options: dict = field(default_factory=dict)


def model_kwargs(name: str, args) -> dict:
    kw = {"in_channels": 1, "num_classes": 10, "image_size": 28}
    if name.startswith("revnet"):
        kw["width"] = args.revnet_width
    return kw


def make_model(name: str, args) -> nn.Sequential:
    from brigade.stages.models import build_model

    torch.manual_seed(args.seed)  # the same initial weights for every method
    return build_model(name, **model_kwargs(name, args))


def optimizer_factory(args):
    from brigade.engine.train import make_optimizer

    return make_optimizer(args.optimizer, args.lr)


def pipeline(spec: RunSpec, args, backend: str | None = None, stages: int | list[int] = 2):
    """A Pipeline for ``spec`` (Ray: one single-threaded actor per stage)."""
    from brigade.engine import Pipeline

    backend = backend or args.backend
    extra: dict[str, Any] = {}
    if backend == "ray":
        extra["cpus_per_stage"] = 1
    model = make_model(spec.model, args)
    return Pipeline(
        model, stages=spec.balance or stages, schedule=spec.schedule, method=spec.method,
        microbatches=args.microbatches, optimizer=optimizer_factory(args),
        loss_fn=nn.CrossEntropyLoss(), backend=backend, balance_by="time",
        sample=torch.zeros(args.batch_size, 1, 28, 28),
        schedule_options=spec.schedule_options, **extra, **spec.options,
    )


@torch.no_grad()
def recalibrated_accuracy(spec: RunSpec, args, state: dict, train, test) -> float | None:
    """Test accuracy of the trained weights after re-estimating BatchNorm's statistics
    (None for a model without BatchNorm).

    Why: in eval mode BatchNorm uses running statistics, averaged with momentum 0.1 over
    training microbatches of 16 while the weights moved; on the RevNet they lag so far that
    eval accuracy understates the model by ~12 points (backprop, 1 epoch: 81.6 % with the
    running statistics, 93.5 % with each test batch's own) and by different amounts for
    different methods. So the weights are loaded into a single-process copy, the statistics
    are recomputed as a plain average over ``BN_BATCHES`` training microbatches (the same for
    every method), and the test set is evaluated in eval mode. The pipeline's own figure
    stays in the table beside it."""
    model = make_model(spec.model, args)
    model.load_state_dict(state)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return None
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    size = args.batch_size // args.microbatches
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(train), generator=g)[: BN_BATCHES * size]
    for chunk in idx.split(size):
        model(train.x[chunk])
    from brigade.stages.trainer import evaluate

    return evaluate(model, test.x, test.y, 500)


def windows(train, args, steps: int | None = None, epochs: int | None = None):
    """Lists of ``--window`` batches: ``epochs`` epochs, or the first ``steps`` batches."""
    from brigade.stages.data import Batches

    loader = Batches(train, args.batch_size, shuffle=True, seed=args.seed)
    total = steps if steps is not None else len(loader) * (epochs or args.epochs)
    done, pending = 0, []
    while done < total:
        for x, y in loader:
            if x.shape[0] < args.microbatches:
                continue
            pending.append((x, y))
            done += 1
            if len(pending) == args.window or done == total:
                yield pending
                pending = []
            if done == total:
                return


def stage_figures(pipe) -> dict[str, Any]:
    tl = pipe.timeline()
    return {
        "balance": list(pipe.balance),
        "idle_fraction": [tl.idle_fraction(w) for w in range(tl.num_workers)],
        "busy_s": [tl.busy(w) for w in range(tl.num_workers)],
        "bubble_fraction": tl.bubble_fraction,
        "makespan_s": tl.makespan,
        "peak_stored_activation_bytes": list(tl.meta["peak_stored_activation_bytes"]),
    }


def train_run(spec: RunSpec, args, train, test, steps: int | None = None,
              epochs: int | None = None) -> dict[str, Any]:
    """Train ``spec`` for ``epochs`` (or ``steps``); accuracy, wall time, idle figures."""
    from brigade.engine.train import pipeline_accuracy

    t_start = time.perf_counter()
    pipe = pipeline(spec, args)
    startup = time.perf_counter() - t_start
    wall, n_steps, losses = 0.0, 0, []
    try:
        with pipe:
            for chunk in windows(train, args, steps, epochs):
                t0 = time.perf_counter()
                outs = pipe.run(chunk)
                wall += time.perf_counter() - t0
                n_steps += len(outs)
                losses += [o["loss"] for o in outs]
                if not all(math.isfinite(v) for v in losses[-len(outs):]):
                    raise FloatingPointError(f"{spec.label}: loss became {losses[-1]} by step {n_steps}")
            figures = stage_figures(pipe)
            samples = pipe.timeline().samples
            acc = pipeline_accuracy(pipe, test)
            recal = recalibrated_accuracy(spec, args, pipe.state_dict(), train, test)
    except FloatingPointError as err:
        return {"label": spec.label, "model": spec.model, "method": spec.method,
                "schedule": spec.schedule, "error": str(err), "steps": n_steps}
    tail = losses[-max(1, len(losses) // 10):]
    return {
        "label": spec.label, "model": spec.model, "method": spec.method,
        "schedule": spec.schedule, "options": spec.options,
        "schedule_options": spec.schedule_options, "steps": n_steps,
        "test_accuracy": acc, "test_accuracy_bn_recalibrated": recal, "final_train_loss": sum(tail) / len(tail),
        "wall_s": wall, "startup_s": startup,
        "samples_per_s": samples / wall if wall > 0 else 0.0, **figures,
    }


# -- balancing by the method's own cost ------------------------------------------------------
def profile_cut(spec: RunSpec, args, data, cut: int, n: int) -> dict:
    """Compute seconds per stage of the 2-stage split ``[cut, n - cut]`` under ``spec``'s
    method: a local-backend run (one process, one thread, so per-stage compute adds up
    exactly), in CPU seconds of that thread."""
    from brigade.engine import Pipeline

    pipe = Pipeline(make_model(spec.model, args), stages=[cut, n - cut], schedule=spec.schedule,
                    method=spec.method, microbatches=args.microbatches,
                    optimizer=optimizer_factory(args), loss_fn=nn.CrossEntropyLoss(),
                    backend="local", schedule_options=spec.schedule_options, **spec.options)
    # CPU time, not wall time: on a shared machine a preempted action would otherwise look
    # expensive. The local backend's workers run in this thread; their clock is a private
    # attribute, hence the guard (wall time if it is ever renamed).
    for worker in getattr(pipe._backend, "workers", []):
        if hasattr(worker, "_clock"):
            worker._clock = time.thread_time
    with pipe:
        pipe.run(data[:1])  # warm-up (lazy inits, the SG module's creation)
        pipe.reset_timeline()
        pipe.run(data[1:])
        busy = robust_busy(pipe.timeline(), 2)
    return {"cut": [cut, n - cut], "busy_s": busy, "ratio": max(busy) / max(min(busy), 1e-9)}


def calibrate_cut(spec: RunSpec, args, train, steps: int = 3) -> dict:
    """The 2-stage cut of ``spec``'s model that best balances ``spec``'s method: stage 0's
    cost grows with the cut and stage 1's falls, so bisect for the crossing, then keep the
    better of its two sides (max/min of the stages' compute)."""
    n = len(make_model(spec.model, args))
    data = next(windows(train, args, steps))
    seen: dict[int, dict] = {}

    def probe(c: int) -> dict:
        if c not in seen:
            seen[c] = profile_cut(spec, args, data, c, n)
        return seen[c]

    lo, hi = 1, n - 1  # invariant (once probed): stage 0 lighter at lo, heavier at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        b0, b1 = probe(mid)["busy_s"]
        lo, hi = (mid, hi) if b0 < b1 else (lo, mid)
    best = min((probe(c) for c in (lo, hi)), key=lambda r: r["ratio"])
    return {"balance": best["cut"], "ratio": best["ratio"],
            "profile": [seen[c] for c in sorted(seen)]}


def robust_busy(tl, workers: int) -> list[float]:
    """Per-worker compute time as sum over action kinds of count x MEDIAN duration: on a
    shared machine a preempted action would otherwise skew a short profile."""
    by_kind: dict[tuple[int, str], list[float]] = {}
    for e in tl.compute_events():
        by_kind.setdefault((e.worker, e.kind), []).append(e.end - e.start)
    return [sum(len(v) * statistics.median(v) for (w, _), v in by_kind.items() if w == worker)
            for worker in range(workers)]


def idle_run(spec: RunSpec, args, train) -> dict[str, Any]:
    """A warm-up run of ``IDLE_WARMUP`` steps, then ``--idle-steps`` measured steps in ONE
    pipelined run (a decoupled schedule fills and drains once in it)."""
    pipe = pipeline(spec, args)
    data = list(windows(train, args, IDLE_WARMUP + args.idle_steps))
    flat = [b for w in data for b in w]
    with pipe:
        pipe.run(flat[:IDLE_WARMUP])
        pipe.reset_timeline()
        t0 = time.perf_counter()
        pipe.run(flat[IDLE_WARMUP:])
        wall = time.perf_counter() - t0
        figures = stage_figures(pipe)
    return {"label": spec.label, "method": spec.method, "schedule": spec.schedule,
            "wall_s": wall, "steps": args.idle_steps, **figures}


def memory_run(spec: RunSpec, args, train) -> dict[str, Any]:
    """A few steps on the 4-stage split (local backend: bytes do not depend on it)."""
    pipe = pipeline(spec, args, backend="local")
    with pipe:
        for chunk in windows(train, args, 2 * args.microbatches):
            pipe.run(chunk)
        figures = stage_figures(pipe)
    from brigade.stages.revnet import is_reversible

    model = make_model(spec.model, args)
    firsts = [sum(MEMORY_BALANCE[:i]) for i in range(len(MEMORY_BALANCE))]
    figures["reversible"] = [
        all(is_reversible(model[b]) for b in range(f, f + k)) for f, k in zip(firsts, MEMORY_BALANCE)
    ]
    return {"label": spec.label, "method": spec.method, **figures}


# -- the runs ----------------------------------------------------------------------------------
def accuracy_specs(args) -> list[RunSpec]:
    return [
        RunSpec("backprop 1f1b", "mlp", "backprop", "1f1b", MLP_BALANCE),
        RunSpec("backprop gpipe", "mlp", "backprop", "gpipe", MLP_BALANCE),
        RunSpec("dni", "mlp", "dni", "dni", MLP_BALANCE, schedule_options={"lag": args.dni_lag}),
        RunSpec("cdni", "mlp", "cdni", "dni", MLP_BALANCE, schedule_options={"lag": args.dni_lag}),
        RunSpec(f"stale (k={args.stale_k})", "mlp", "stale", "stale", MLP_BALANCE,
                schedule_options={"k": args.stale_k}),
    ]


def revnet_specs(args) -> list[RunSpec]:
    return [
        RunSpec("backprop 1f1b", "revnet18", "backprop", "1f1b", REVNET_BALANCE),
        RunSpec("petra", "revnet18", "petra", "petra", REVNET_BALANCE),
    ]


def idle_specs(args) -> list[RunSpec]:
    return [
        RunSpec("backprop gpipe", args.idle_model, "backprop", "gpipe"),
        RunSpec("backprop 1f1b", args.idle_model, "backprop", "1f1b"),
        RunSpec("dni", args.idle_model, "dni", "dni", schedule_options={"lag": args.dni_lag}),
        RunSpec("cdni", args.idle_model, "cdni", "dni", schedule_options={"lag": args.dni_lag}),
        RunSpec("petra", args.idle_model, "petra", "petra"),
    ]


# -- printing --------------------------------------------------------------------------------
def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n else "0"


def print_training(console, title: str, rows: list[dict], reference: str) -> None:
    from rich.table import Table

    ref = next((r for r in rows if r["label"] == reference and "error" not in r), None)
    recal = any(r.get("test_accuracy_bn_recalibrated") is not None for r in rows)
    table = Table(title=title)
    cols = ["run", "balance", "steps", "test acc", "vs " + reference]
    if recal:
        cols += ["test acc, BN recal.", "vs " + reference + " "]
    cols += ["train loss", "wall s", "samples/s", "idle stage 0", "idle stage 1", "bubble"]
    for col in cols:
        table.add_column(col, justify="right" if col != "run" else "left")

    def delta(r, key):
        if ref is None or r.get(key) is None or ref.get(key) is None:
            return ""
        return f"{100 * (r[key] - ref[key]):+.1f} pt"

    for r in rows:
        if "error" in r:
            table.add_row(r["label"], "", str(r["steps"]), "[red]" + r["error"],
                          *[""] * (len(cols) - 4))
            continue
        idle = r["idle_fraction"] + [float("nan")] * (2 - len(r["idle_fraction"]))
        cells = [r["label"], str(r["balance"]), str(r["steps"]),
                 f"{100 * r['test_accuracy']:.2f}%", delta(r, "test_accuracy")]
        if recal:
            cells += [f"{100 * r['test_accuracy_bn_recalibrated']:.2f}%",
                      delta(r, "test_accuracy_bn_recalibrated")]
        cells += [f"{r['final_train_loss']:.3f}", f"{r['wall_s']:.1f}",
                  f"{r['samples_per_s']:.0f}", _pct(idle[0]), _pct(idle[1]),
                  _pct(r["bubble_fraction"])]
        table.add_row(*cells)
    console.print(table)


def print_idle(console, rows: list[dict], args) -> None:
    from rich.table import Table

    table = Table(title=f"Idle fraction on a balanced 2-stage CPU run, m={args.microbatches}, "
                        f"{args.idle_steps} steps in one run ({args.idle_model}, width "
                        f"{args.revnet_width}; cut balanced per method)")
    for col in ("run", "balance", "profiled max/min", "steps", "wall s", "busy s (0 | 1)",
                "idle stage 0", "idle stage 1", "bubble"):
        table.add_column(col, justify="right" if col != "run" else "left")
    for r in rows:
        table.add_row(r["label"], str(r["balance"]), f"{r['calibration']['ratio']:.2f}",
                      str(r["steps"]), f"{r['wall_s']:.1f}",
                      " | ".join(f"{b:.1f}" for b in r["busy_s"]),
                      _pct(r["idle_fraction"][0]), _pct(r["idle_fraction"][1]),
                      _pct(r["bubble_fraction"]))
    console.print(table)


def print_memory(console, rows: dict[str, dict]) -> None:
    from rich.table import Table

    bp, pe = rows["1f1b"], rows["petra"]
    table = Table(title=f"Peak stored activations per stage, revnet18 on 4 stages "
                        f"{MEMORY_BALANCE}, m={bp['m']}")
    for col in ("stage", "all reversible", "1F1B", "PETRA", "PETRA / 1F1B"):
        table.add_column(col, justify="right")
    for s, (a, b) in enumerate(zip(bp["peak_stored_activation_bytes"],
                                   pe["peak_stored_activation_bytes"])):
        table.add_row(str(s), "yes" if pe["reversible"][s] else "no", _mb(a), _mb(b),
                      _pct(b / a) if a else "-")
    console.print(table)


# -- targets ---------------------------------------------------------------------------------
def targets(report: dict) -> list[dict]:
    out = []
    acc = {r["label"]: r for r in report.get("accuracy", []) if "error" not in r}
    bp = acc.get("backprop 1f1b")
    for label, margin in (("cdni", 1.0), ("dni", 2.0)):
        if bp and label in acc:
            d = 100 * (acc[label]["test_accuracy"] - bp["test_accuracy"])
            out.append({"target": f"{label} >= backprop - {margin:g} pt (mlp)",
                        "measured": f"{d:+.2f} pt", "met": d >= -margin})
    rev = {r["label"]: r for r in report.get("revnet", []) if "error" not in r}
    if "backprop 1f1b" in rev and "petra" in rev:
        for key, how in (("test_accuracy", ""), ("test_accuracy_bn_recalibrated", ", BN recal.")):
            a, b = rev["petra"].get(key), rev["backprop 1f1b"].get(key)
            if a is None or b is None:
                continue
            d = 100 * (a - b)
            out.append({"target": f"petra >= backprop - 0.5 pt (revnet18{how})",
                        "measured": f"{d:+.2f} pt", "met": d >= -0.5})
    idle = {r["label"]: r for r in report.get("idle", [])}
    gp = idle.get("backprop gpipe")
    for label in ("dni", "cdni", "petra"):
        if label in idle:
            worst = max(idle[label]["idle_fraction"])
            ref = f" (gpipe: {_pct(max(gp['idle_fraction']))})" if gp else ""
            out.append({"target": f"{label} idle <= 5% per stage, balanced 2-stage run",
                        "measured": f"max {_pct(worst)}{ref}", "met": worst <= 0.05})
    mem = report.get("memory")
    if mem:
        bp_b, pe_b = mem["1f1b"]["peak_stored_activation_bytes"], mem["petra"]["peak_stored_activation_bytes"]
        ratios = [pe_b[s] / bp_b[s] for s in range(len(bp_b)) if mem["petra"]["reversible"][s] and bp_b[s]]
        if ratios:
            out.append({"target": "petra peak bytes per reversible stage <= 10% of 1f1b",
                        "measured": "max " + _pct(max(ratios)), "met": max(ratios) <= 0.10})
    return out


def print_targets(console, rows: list[dict]) -> None:
    from rich.table import Table

    table = Table(title="Issue 5 targets")
    for col in ("target", "measured", "met"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["target"], r["measured"], "[green]yes" if r["met"] else "[red]no")
    console.print(table)


# -- main ------------------------------------------------------------------------------------
def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA), help="MNIST IDX folder")
    p.add_argument("--backend", default="ray", choices=["ray", "local"],
                   help="ray: 2 actors with one CPU thread each (default); local: one process")
    p.add_argument("--epochs", type=int, default=1, help="epochs of the MLP runs")
    p.add_argument("--revnet-epochs", type=int, default=None,
                   help="epochs of the RevNet runs (default: --epochs)")
    p.add_argument("--quick", action="store_true",
                   help="minutes, not tens of minutes: --steps 40, --idle-steps 8")
    p.add_argument("--steps", type=int, default=None, help="steps per training run (not epochs)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {', '.join(SECTIONS)}")
    p.add_argument("--optimizer", default="sgd", help="the same for every method")
    p.add_argument("--lr", type=float, default=0.05, help="the same for every method")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--window", type=int, default=32, help="steps per pipelined run")
    p.add_argument("--stale-k", type=int, default=4)
    p.add_argument("--dni-lag", type=int, default=4,
                   help="dni schedule: a stage trains its SG this many microbatches after the "
                        "forward (slack that absorbs timing jitter; accuracy-neutral here)")
    p.add_argument("--revnet-width", type=int, default=16)
    p.add_argument("--idle-steps", type=int, default=48, help="measured steps per idle run")
    p.add_argument("--idle-model", default="revnet34", choices=["revnet18", "revnet34"],
                   help="model of the idle section (revnet34: 18 blocks, finer cuts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(argv)
    args.revnet_epochs = args.revnet_epochs or args.epochs
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = sorted(set(args.sections) - set(SECTIONS))
    if bad:
        p.error(f"unknown sections {bad}; valid: {', '.join(SECTIONS)}")
    if args.quick:
        args.steps = args.steps or 40
        args.idle_steps = min(args.idle_steps, 8)
        args.window = min(args.window, 8)
        args.idle_model = "revnet18"
    return args


def main(argv=None) -> int:
    from rich.console import Console

    from brigade.stages.data import load_dataset

    args = parse(argv)
    torch.set_num_threads(1)
    console = Console()
    if not console.is_terminal:  # a file or a pipe: wide enough for the tables
        console = Console(width=200)
    if not (Path(args.data_dir) / "train-images-idx3-ubyte.gz").exists():
        console.print(f"[red]MNIST not found in {args.data_dir}[/]; pass --data-dir")
        return 2
    train = load_dataset("mnist", data_dir=args.data_dir, split="train")
    test = load_dataset("mnist", data_dir=args.data_dir, split="test")
    how = (f"{args.steps} steps" if args.steps else
           f"{args.epochs} epoch(s) (mlp), {args.revnet_epochs} (revnet)")
    console.print(
        f"MNIST {len(train)} train / {len(test)} test; {how}, batch {args.batch_size}, "
        f"m={args.microbatches}, {args.optimizer} lr {args.lr}, seed {args.seed}, "
        f"backend {args.backend}" + (" (2 actors x 1 thread)" if args.backend == "ray" else "")
        + f", window {args.window} steps, dni lag {args.dni_lag}; load average "
        + " ".join(f"{v:.1f}" for v in os.getloadavg()) + f" on {os.cpu_count()} cores"
    )
    report: dict[str, Any] = {"args": {k: v for k, v in vars(args).items()},
                              "load_average_start": list(os.getloadavg())}

    def run_all(specs, key, title, reference, epochs):
        rows = []
        for spec in specs:
            rows.append(train_run(spec, args, train, test, args.steps, epochs))
            r = rows[-1]  # one line per run, printed whole (Ray may log between prints)
            console.print(f"  {key}: {spec.label}: " + (r.get("error") or (
                f"acc {100 * r['test_accuracy']:.2f}%  wall {r['wall_s']:.1f} s")))
        report[key] = rows
        print_training(console, title, rows, reference)

    if "accuracy" in args.sections:
        run_all(accuracy_specs(args), "accuracy",
                f"MLP on MNIST, 2 stages, {args.steps or args.epochs} "
                f"{'steps' if args.steps else 'epoch(s)'}: backprop vs synthetic gradients vs "
                "stale gradients", "backprop 1f1b", args.epochs)
    if "revnet" in args.sections:
        run_all(revnet_specs(args), "revnet",
                f"RevNet-18 (width {args.revnet_width}) on MNIST, 2 stages, "
                f"{args.steps or args.revnet_epochs} {'steps' if args.steps else 'epoch(s)'}: "
                "PETRA vs backprop", "backprop 1f1b", args.revnet_epochs)
    if "idle" in args.sections:
        rows = []
        for spec in idle_specs(args):
            cal = calibrate_cut(spec, args, train)
            spec.balance = cal["balance"]
            row = idle_run(spec, args, train)
            row["calibration"] = cal
            rows.append(row)
            console.print(f"  idle: {spec.label}: cut {row['balance']}: idle "
                          + ", ".join(_pct(v) for v in row["idle_fraction"]))
        report["idle"] = rows
        print_idle(console, rows, args)
    if "memory" in args.sections:
        mem = {}
        for key, method, schedule in (("1f1b", "backprop", "1f1b"), ("petra", "petra", "petra")):
            spec = RunSpec(key, "revnet18", method, schedule, balance=list(MEMORY_BALANCE))
            mem[key] = memory_run(spec, args, train)
            mem[key]["m"] = args.microbatches
        report["memory"] = mem
        print_memory(console, mem)
    report["load_average_end"] = list(os.getloadavg())
    report["targets"] = targets(report)
    print_targets(console, report["targets"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
