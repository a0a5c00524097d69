"""ResNet and RevNet stage splits: brigade beside torch.distributed.pipelining, and the simulator.

    python bench/resnet_splits.py                                  # the default set, < 10 min
    python bench/resnet_splits.py --json out.json --markdown out.md --gantt out.png
    python bench/resnet_splits.py --quick --no-measure             # seconds: a smoke run
    python bench/resnet_splits.py --models resnet50 --shapes imagenet --stages 4,8 --no-measure

What it does, for every model (resnet18/34/50, revnet18/34/50), input shape (CIFAR 3x32x32,
ImageNet 3x224x224, synthetic data) and stage count (2, 4, 8):

1. Profiles every block's forward and backward on this machine, one torch thread
   (``brigade.stages.partition.profile_blocks``), on one microbatch. ImageNet shapes are
   profiled on a smaller batch (``--imagenet-profile-batch``) and the times scaled linearly
   to the microbatch: the tables say ``scaled xN`` where that happened, ``profiled`` where not.
2. Balances by time (the exact contiguous min-max partition) and prints the stage table.
3. Simulates every schedule from a profile of that split (``brigade.schedulers``: build,
   lower, simulate): gpipe, 1f1b, interleaved (2 chunks per worker), zb1p, and the decoupled
   dni (every model) and petra (revnets). The costs are the per-stage action times of
   brigade's own stage classes on the balanced split, one microbatch, one thread (backprop
   F and B, zb1p F, I and W, DNI S and T, PETRA F and R; an SGD step for U), so they include
   what the engine runs beyond the blocks (loss, saved-bytes hooks, the split backward,
   synthetic gradients, reconstruction). Sends are charged to the sender
   (``--latency-ms``, ``--bandwidth-gbs``; the defaults, 0.2 ms and 1.7 GB/s, put a 4 MB
   hand-off at 2.7 ms, about what bench/transport.py measures for gloo on this kind of
   machine, 1.7-3.1 ms). Figures: step time, samples/s, bubble, idle fraction per worker, peak stored
   activation bytes per worker.
4. Measures the splits that fit the machine (default: 2 stages, CIFAR shape, resnet18 and
   revnet18 at width 16) on brigade's engine, on each of ``--backends`` (default both): Ray
   (2 actors x 1 CPU thread, the p2p transport: on one host a Unix socket and a
   shared-memory ring) and torchrun (2 ranks, the same transport and worker code); and, side by side in the same run, the same split (same seed, same
   weights, same batch) on torch.distributed.pipelining (PipelineStage with ScheduleGPipe,
   Schedule1F1B, ScheduleInterleaved1F1B) under ``torchrun --standalone --nproc-per-node 2``
   with gloo, one thread per rank. The torchrun ranks stay up for the whole run and take
   commands from this process (a hidden ``--torch-worker DIR`` mode of this script); they
   hold both torch's side and brigade's torchrun side of a split, so those two differ by
   their pipelines alone (same launcher, processes and allocator settings). The runners
   take turns round by round: each round runs ``--window`` steps of each runner, in an order
   rotating every round, after warm-up steps that are not counted. Step time is the median
   over timed steps. On the torchrun ranks, which have no driver, each step of a flush
   schedule runs between barriers (torch's and brigade's alike); a decoupled schedule's
   round, which does not flush between steps, is one ``Pipeline.run`` of ``--window``
   steps, timed as the window's wall time over its steps. On Ray every round is one
   ``Pipeline.run`` of ``--window`` steps, as ``brigade train`` drives it (one driver round
   trip per window); ``Pipeline.step`` per step would add the round trip to every step
   (~7.5 ms on a ~190 ms resnet18 step here; bench/pipeline_schedules.py prints both). The torch
   companion of zb1p, dni and petra is torch's Schedule1F1B. torch's stages' compute calls
   (forward_one_chunk, backward_one_chunk, backward_weight_one_chunk) and its optimizer step
   are timed, which gives its busy time and bubble as brigade's timeline gives brigade's.

Reported: brigade / torch step-time ratio per schedule and backend (target <= 1.0 for GPipe
and 1F1B); brigade DNI (and PETRA, revnets) throughput over torch 1F1B's on the same split
(target >= 1.3x; printed beside its ceiling on balanced stages, the flush a decoupled schedule
drops: (m+p-1)/m, 1.125x at p=2, m=8); simulated over measured throughput for every measured
brigade row (target within 10%), simulated from in-place profiles of the split on that backend
(``Pipeline.profile`` of ``--window`` steps right before each round: every action timed on the
workers themselves, all at once; the simulator replays each action's time, with the round's
mean message latency; the rounds' predicted time summed over their measured time), and, beside
it, from the isolated profile of step 3 (the one the simulated table uses for every split).
A *calibrated* prediction simulates each measured round again with the costs that round
measured (``brigade.schedulers.predict``): profiled -> calibrated is how much slower compute
ran inside the engine than in the profile, calibrated -> measured is overhead outside compute
(driver round trips, waits); the per-worker compute per step, measured beside simulated, is in
the measured table too. Outputs: rich tables on the terminal, ``--json`` (a list of rows:
model, stages, microbatches, schedule, runner = brigade | torch | simulated, step_time_s,
samples_per_s, bubble_fraction, and more; brigade rows name their ``backend``), ``--markdown``
(the same as tables) and ``--gantt`` (measured rounds beside brigade's simulation of them, or
the simulated schedules when nothing is measured). Every process started here (the Ray
cluster, the torchrun ranks) is stopped at the end, on errors too.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from brigade import schedulers
from brigade.engine.cli.output import atomic_write_bytes
from brigade.engine.ray_backend import actor_env
from brigade.schedulers import Costs, ScheduleError, Timeline
from brigade.schedulers.calibrate import costs_from_spans
from brigade.stages.errors import ConfigError, choose
from brigade.stages.models import build_model, shape_kwargs
from brigade.stages.partition import (
    BlockProfile,
    Partition,
    min_max_partition,
    profile_blocks,
    split,
)

__all__ = [
    "BenchConfig",
    "BenchError",
    "ModelProfile",
    "SplitCosts",
    "TorchPeer",
    "MODELS",
    "SHAPES",
    "SCHEDULES",
    "TORCH_SCHEDULES",
    "BACKENDS",
    "parse_config",
    "profile_model",
    "stage_costs",
    "split_costs",
    "simulate_split",
    "measure_split",
    "torch_worker",
    "main",
]

MODELS = ("resnet18", "resnet34", "resnet50", "revnet18", "revnet34", "revnet50")
# name -> ((channels, height, width), classes, stem)
SHAPES: dict[str, tuple[tuple[int, int, int], int, str]] = {
    "cifar": ((3, 32, 32), 10, "cifar"),
    "imagenet": ((3, 224, 224), 1000, "imagenet"),
}
SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb1p", "dni", "petra")
# brigade schedule -> the torch.distributed.pipelining schedule measured beside it
TORCH_SCHEDULES = {"gpipe": "gpipe", "1f1b": "1f1b", "interleaved": "interleaved",
                   "zb1p": "1f1b", "dni": "1f1b", "petra": "1f1b"}
BACKENDS = ("ray", "torchrun")  # brigade's backends the measured splits run on
_TORCH_CLASSES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B",
                  "interleaved": "ScheduleInterleaved1F1B"}
_METHOD = {"dni": "dni", "petra": "petra"}  # schedule -> learning rule (else backprop)
_SPEEDUP_TARGET = 1.3   # decoupled throughput over torch 1F1B
_RATIO_TARGET = 1.0     # brigade / torch step time, for the schedules below
_RATIO_SCHEDULES = ("gpipe", "1f1b")
_PREDICT_TOLERANCE = 0.10  # |simulated / measured - 1|
LR = 0.01


class BenchError(ConfigError):
    """A bad flag or combination; the message names the value and what would work."""


# -- configuration ------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchConfig:
    """Everything a run needs, checked once in ``__post_init__`` (errors name the fix)."""

    models: tuple[str, ...] = MODELS
    shapes: tuple[str, ...] = ("cifar", "imagenet")
    stages: tuple[int, ...] = (2, 4, 8)
    schedules: tuple[str, ...] = SCHEDULES
    microbatches: int = 8
    batch_size: int = 64
    width: int = 16
    virtual: int = 2
    measure: bool = True
    measure_models: tuple[str, ...] = ("resnet18", "revnet18")
    backends: tuple[str, ...] = BACKENDS  # brigade's, each measured beside torch
    measure_stages: int = 2
    measure_shape: str = "cifar"
    warmup: int = 2
    steps: int = 12
    window: int = 3
    repeats: int = 3
    imagenet_profile_batch: int = 2
    latency_ms: float = 0.2
    bandwidth_gbs: float = 1.7
    seed: int = 0
    timeout_s: float = 300.0
    worker_env: tuple[str, ...] = ()  # KEY=VALUE for the Ray actors and the torch ranks

    def __post_init__(self) -> None:
        for name, kind, choices in (("models", "model", MODELS), ("shapes", "shape", SHAPES),
                                    ("schedules", "schedule", SCHEDULES),
                                    ("measure_models", "measured model", MODELS),
                                    ("backends", "backend", BACKENDS)):
            names = (choose(kind, v, choices) for v in getattr(self, name))
            object.__setattr__(self, name, tuple(dict.fromkeys(names)))  # once each, in order
        object.__setattr__(self, "stages", tuple(dict.fromkeys(self.stages)))
        object.__setattr__(self, "measure_shape", choose("measured shape", self.measure_shape, SHAPES))
        for name in ("models", "shapes", "stages", "schedules", "backends"):
            if not getattr(self, name):
                raise BenchError(f"--{name} is empty; give at least one value")
        for name in ("microbatches", "batch_size", "width", "steps", "window", "repeats",
                     "imagenet_profile_batch", "timeout_s"):
            _positive(name, getattr(self, name))
        for name in ("warmup", "latency_ms", "bandwidth_gbs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise BenchError(f"--{_flag(name)} {value!r} must be a number >= 0")
        for p in (*self.stages, self.measure_stages):
            if isinstance(p, bool) or not isinstance(p, int) or not 2 <= p <= 64:
                raise BenchError(f"stage count {p!r} is out of range; give 2..64 (e.g. --stages 2,4,8)")
        for item in self.worker_env:
            if "=" not in item or not item.split("=", 1)[0]:
                raise BenchError(f"--worker-env {item!r} must read KEY=VALUE, e.g. MALLOC_ARENA_MAX=1")
        if self.virtual < 2:
            raise BenchError(f"--virtual {self.virtual} must be >= 2 (interleaved chunks per worker)")
        if self.batch_size % self.microbatches:
            fit = max(self.microbatches, round(self.batch_size / self.microbatches) * self.microbatches)
            raise BenchError(f"--batch-size {self.batch_size} is not a multiple of --microbatches "
                             f"{self.microbatches}; use --batch-size {fit}")
        models = self.models + (self.measure_models if self.measure else ())
        if self.width % 2 and any(m.startswith("revnet") for m in models):
            raise BenchError(f"--width {self.width} must be even for revnets (reversible blocks "
                             f"split channels in two); use --width {self.width + 1}")

    @property
    def microbatch_size(self) -> int:
        return self.batch_size // self.microbatches

    @property
    def env(self) -> dict[str, str]:
        """``worker_env`` as a dict."""
        return dict(item.split("=", 1) for item in self.worker_env)

    def measured(self, model: str, shape: str, stages: int) -> bool:
        """Whether this split is run on the engines, not only simulated."""
        return (self.measure and model in self.measure_models and shape == self.measure_shape
                and stages == self.measure_stages)


QUICK = dict(models=("resnet18", "revnet18"), shapes=("cifar",), stages=(2,), microbatches=4,
             batch_size=16, width=8, warmup=1, steps=2, window=2, repeats=1,
             measure_models=("resnet18",))


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise BenchError(f"--{_flag(name)} {value!r} must be a positive number")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line and exits 2 (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see --help\n")


def _csv(kind: Callable[[str], Any]) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x.strip()) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"cannot read {text!r}: give a comma-separated "
                                             "list such as 2,4,8") from None
    parse.__name__ = "list"
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command line (every BenchConfig field, plus outputs and the hidden worker mode)."""
    p = _Parser(prog="resnet_splits.py", description=__doc__.splitlines()[0])
    d = BenchConfig()
    p.add_argument("--models", type=_csv(str), default=d.models, help="comma list (%(default)s)")
    p.add_argument("--shapes", type=_csv(str), default=d.shapes, help="cifar,imagenet")
    p.add_argument("--stages", type=_csv(int), default=d.stages, help="stage counts (2,4,8)")
    p.add_argument("--schedules", type=_csv(str), default=d.schedules,
                   help="gpipe,1f1b,interleaved,zb1p,dni,petra (petra: revnets only)")
    p.add_argument("--microbatches", type=int, default=d.microbatches)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--width", type=int, default=d.width, help="base channels of every model")
    p.add_argument("--virtual", type=int, default=d.virtual, help="interleaved chunks per worker")
    p.add_argument("--measure", action=argparse.BooleanOptionalAction, default=d.measure,
                   help="run the measured splits on brigade and torch (default on)")
    p.add_argument("--measure-models", type=_csv(str), default=d.measure_models)
    p.add_argument("--backends", type=_csv(str), default=d.backends,
                   help="brigade backends to measure: ray,torchrun (both by default)")
    p.add_argument("--measure-stages", type=int, default=d.measure_stages)
    p.add_argument("--measure-shape", default=d.measure_shape)
    p.add_argument("--warmup", type=int, default=d.warmup, help="steps not timed, per runner")
    p.add_argument("--steps", type=int, default=d.steps, help="timed steps per runner and schedule")
    p.add_argument("--window", type=int, default=d.window,
                   help="steps per round (and per decoupled Pipeline.run)")
    p.add_argument("--repeats", type=int, default=d.repeats, help="profiling repeats")
    p.add_argument("--imagenet-profile-batch", type=int, default=d.imagenet_profile_batch)
    p.add_argument("--latency-ms", type=float, default=d.latency_ms)
    p.add_argument("--bandwidth-gbs", type=float, default=d.bandwidth_gbs)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--worker-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment of brigade's Ray actors and the torch ranks (repeatable), "
                        "e.g. MALLOC_ARENA_MAX=1")
    p.add_argument("--quick", action="store_true",
                   help="tiny set: resnet18+revnet18, CIFAR, 2 stages, width 8, 2 timed steps")
    p.add_argument("--stage-tables", action="store_true", help="print every split's stage table")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--gantt", type=Path, default=None, help=".png, .svg or .pdf")
    p.add_argument("--torch-worker", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    return p


def parse_config(args: argparse.Namespace, given: Sequence[str]) -> BenchConfig:
    """A BenchConfig from parsed flags; ``--quick`` fills whatever was not given."""
    fields = {f for f in BenchConfig.__dataclass_fields__}
    values = {k: v for k, v in vars(args).items() if k in fields}
    if args.quick:
        explicit = {a.split("=")[0][2:].replace("-", "_") for a in given if a.startswith("--")}
        values.update({k: v for k, v in QUICK.items() if k not in explicit})
    for key in ("models", "shapes", "schedules", "measure_models", "stages", "worker_env",
                "backends"):
        values[key] = tuple(values[key])
    return BenchConfig(**values)


# -- profiling -------------------------------------------------------------------------------
@dataclass
class ModelProfile:
    """One model on one input shape: block costs for ONE microbatch, and how they were got.

    ``scale`` is microbatch / profiled batch: 1 when profiled at the microbatch size, else the
    factor the times and bytes were multiplied by (linear scaling, an approximation).
    """

    model: str
    shape: str
    blocks: list[BlockProfile]
    scale: float
    profile_batch: int

    @property
    def source(self) -> str:
        """What the costs rest on, as the tables print it."""
        return "profiled" if self.scale == 1 else f"scaled x{self.scale:g} from batch {self.profile_batch}"

    @property
    def block_seconds(self) -> list[float]:
        """Forward + backward seconds per block: what the balance minimises the max of."""
        return [b.forward_s + b.backward_s for b in self.blocks]


def make_model(cfg: BenchConfig, name: str, shape: str) -> nn.Sequential:
    """The model as both runners build it: same seed, same options, so the same weights."""
    dims, classes, stem = SHAPES[shape]
    torch.manual_seed(cfg.seed)
    return build_model(name, width=cfg.width, stem=stem, **shape_kwargs(dims, classes))


def make_batch(cfg: BenchConfig, shape: str, n: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic batch (normal images, uniform labels) from the config's seed."""
    dims, classes, _ = SHAPES[shape]
    g = torch.Generator().manual_seed(cfg.seed + 1 + offset)
    return torch.randn(n, *dims, generator=g), torch.randint(0, classes, (n,), generator=g)


def _profile_batch(cfg: BenchConfig, shape: str) -> int:
    """Microbatch size, or fewer samples for ImageNet shapes (times are scaled up)."""
    if shape == "imagenet":
        return min(cfg.microbatch_size, cfg.imagenet_profile_batch)
    return cfg.microbatch_size


def profile_model(cfg: BenchConfig, name: str, shape: str) -> ModelProfile:
    """Every block's forward and backward seconds for one microbatch, on one thread."""
    model = make_model(cfg, name, shape)
    batch = _profile_batch(cfg, shape)
    x, _ = make_batch(cfg, shape, batch)
    with _threads(1):
        blocks = profile_blocks(model, x, "cpu", cfg.repeats)
    scale = cfg.microbatch_size / batch
    if scale != 1:
        blocks = [replace(b, forward_s=b.forward_s * scale, backward_s=b.backward_s * scale,
                          input_s=b.input_s * scale, weight_s=b.weight_s * scale,
                          batch=cfg.microbatch_size,
                          out_shape=(cfg.microbatch_size, *b.out_shape[1:]),
                          out_bytes=int(b.out_bytes * scale)) for b in blocks]
    return ModelProfile(name, shape, blocks, scale, batch)


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """Run a block with ``n`` torch threads (the engines' workers use one each)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def stage_table(mp: ModelProfile, balance: list[int], model: nn.Sequential) -> Partition:
    """The partition table of ``balance`` from the profile (no second profiling pass)."""
    return Partition.from_profile(model, balance, mp.blocks, "time")


# -- costs of a split ----------------------------------------------------------------------------
@dataclass
class SplitCosts:
    """What the simulator needs for one schedule on one split, and what it was made from."""

    balance: list[int]
    costs: Costs
    stored_bytes: list[float]  # per model stage, per in-flight microbatch
    source: str


def _balance(mp: ModelProfile, parts: int) -> list[int]:
    """Min-max partition of the profiled block times (brigade's balance_by_time)."""
    return min_max_partition(mp.block_seconds, parts)


def _comm(cfg: BenchConfig) -> dict[str, float]:
    """Message costs and microbatch size, the Costs fields every split shares."""
    return {"latency": cfg.latency_ms * 1e-3, "bandwidth": cfg.bandwidth_gbs * 1e9,
            "microbatch_size": cfg.microbatch_size}


def _update_seconds(module: nn.Module, repeats: int) -> float:
    """One SGD step over ``module``'s parameters (the U action), median of a few."""
    params = [p for p in copy.deepcopy(module).parameters() if p.requires_grad]
    if not params:
        return 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.SGD(params, lr=LR)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def _stage_inputs(model: nn.Sequential, balance: list[int], x: torch.Tensor) -> list[torch.Tensor]:
    """The input each stage sees for ``x`` (a no-grad forward through a copy)."""
    work = copy.deepcopy(model).train()
    inputs, h = [], x
    with torch.no_grad():
        for piece in split(work, balance):
            inputs.append(h)
            h = piece(h)
    return inputs


def stage_costs(cfg: BenchConfig, mp: ModelProfile, model: nn.Sequential, parts: int,
                rule: str) -> SplitCosts:
    """Per-stage action seconds of brigade's own stage classes on the time-balanced split.

    Why the stage classes and not the summed block times: the engine runs them, with what
    they add (the saved-bytes hooks, the loss, zb1p's split backward, DNI's synthetic
    gradient and per-microbatch update in S and its training in T, PETRA's reconstruction
    in R). ``rule`` is backprop, zb1p (backprop with I and W timed), dni or petra.
    """
    from brigade.stages.stage import StageSpec, make_stage_module

    balance = _balance(mp, parts)
    x, y = make_batch(cfg, mp.shape, mp.profile_batch)
    seconds: dict[tuple[int, str], float] = {}  # (stage, action kind) -> one microbatch's
    stored, acts, first = [], [], 0
    with _threads(1):
        inputs = _stage_inputs(model, balance, x)
        pieces = split(copy.deepcopy(model), balance)
        for s, piece in enumerate(pieces):
            last = s == parts - 1
            if rule != "dni":  # DNI's S updates inside, per microbatch: no U of its own
                seconds[(s, "U")] = _update_seconds(piece, cfg.repeats)
            st = _make_stage(rule, make_stage_module(list(piece), first), StageSpec(s, parts), last)
            first += len(piece)
            measured, held, out_bytes = _time_actions(rule, st, inputs[s], y if last else None,
                                                      cfg.repeats)
            seconds.update({(s, kind): t * mp.scale for kind, t in measured.items()})
            stored.append(held * mp.scale)
            acts.append(out_bytes * mp.scale)
    # each kind charged as the simulator charges it, folded actions once (as a measured
    # run is calibrated); DNI's last stage has no T: 0
    costs = costs_from_spans(seconds, parts, activation_bytes=acts, **_comm(cfg))
    return SplitCosts(balance, costs, stored, mp.source)


def _make_stage(rule: str, module: nn.Module, spec, last: bool):
    """The stage class the engine builds for ``rule``, with its fixed options (zb1p's is
    backprop's; PETRA never steps inside R here)."""
    from brigade.stages.rules import get_method, method_names

    rule_spec = get_method(rule if rule in method_names() else "backprop")
    extra = {"accumulate": 10**9} if rule == "petra" else {}
    return rule_spec.stage_class(module, spec, lambda p: torch.optim.SGD(p, lr=LR),
                                 nn.CrossEntropyLoss() if last else None,
                                 **rule_spec.fixed, **extra)


def _time_actions(rule: str, st, x: torch.Tensor, y: torch.Tensor | None,
                  repeats: int) -> tuple[dict[str, float], int, int]:
    """Median seconds per action kind over ``repeats`` microbatches (after one warm-up),
    the bytes the stage keeps for one in-flight microbatch, and the bytes it sends on."""
    samples: dict[str, list[float]] = {}
    held = out_bytes = 0
    for j in range(repeats + 1):
        spans, held, out_bytes = _one_microbatch(rule, st, j, x, y)
        if j:
            for kind, seconds in spans.items():
                samples.setdefault(kind, []).append(seconds)
    return {k: statistics.median(v) for k, v in samples.items()}, held, out_bytes


def _one_microbatch(rule: str, st, j: int, x: torch.Tensor, y: torch.Tensor | None
                    ) -> tuple[dict[str, float], int, int]:
    """Run microbatch ``j`` through every action ``rule`` has on this stage, timing each."""
    last = y is not None
    clock = time.perf_counter
    t0 = clock()
    out = st.forward(j, x, y)
    t1 = clock()
    if rule == "dni":
        out = out[0]
    held = st.stored_bytes()
    out_bytes = 0 if last else out.numel() * out.element_size()
    grad = None if last else torch.randn_like(out) * 1e-3
    first = {"dni": "S"}.get(rule, "F")
    if rule == "backprop":
        st.backward(j, grad)
        return {first: t1 - t0, "B": clock() - t1}, held, out_bytes
    if rule == "zb1p":
        st.backward_input(j, grad)
        t2 = clock()
        st.backward_weight(j)
        return {first: t1 - t0, "I": t2 - t1, "W": clock() - t2}, held, out_bytes
    if rule == "dni":
        if last:  # the last stage has no synthetic gradient to train
            return {first: t1 - t0}, held, out_bytes
        st.train_sg(j, grad)
        return {first: t1 - t0, "T": clock() - t1}, held, out_bytes
    st.reverse(j) if last else st.reverse(j, out, grad)
    return {first: t1 - t0, "R": clock() - t1}, held, out_bytes


def _rule(schedule: str) -> str:
    """What is profiled for ``schedule``: its learning rule, or zb1p's split backward."""
    return "zb1p" if schedule == "zb1p" else _METHOD.get(schedule, "backprop")


def split_costs(cfg: BenchConfig, mp: ModelProfile, model: nn.Sequential, stages: int,
                schedule: str, cache: dict | None = None) -> SplitCosts:
    """The costs ``schedule`` is simulated with on a ``stages``-worker split (interleaved:
    ``stages x virtual`` model stages). With a ``cache`` dict, schedules that share a split
    and a learning rule (gpipe and 1f1b) share one profile, so they are predicted from the
    same numbers."""
    parts = stages * (cfg.virtual if schedule == "interleaved" else 1)
    key = (parts, _rule(schedule))
    if cache is None or key not in cache:
        sc = stage_costs(cfg, mp, model, parts, _rule(schedule))
        if cache is None:
            return sc
        cache[key] = sc
    return cache[key]


# -- simulation ------------------------------------------------------------------------------------
def _skip_reason(cfg: BenchConfig, model: str, blocks: int, stages: int, schedule: str) -> str | None:
    """Why ``schedule`` cannot run this split (None when it can)."""
    v = cfg.virtual if schedule == "interleaved" else 1
    if stages * v > blocks:
        return f"{stages * v} model stages but {model} has {blocks} blocks"
    try:
        schedulers.build(schedule, stages=stages, microbatches=cfg.microbatches, virtual=v)
    except ScheduleError as err:
        return str(err).split(";")[0]
    return None


def applies(schedule: str, model: str) -> bool:
    """PETRA needs reversible stages: revnets only."""
    return schedule != "petra" or model.startswith("revnet")


def _steps_of(cfg: BenchConfig, schedule: str) -> int:
    """Simulated steps: one for flush schedules, a window for decoupled ones."""
    return cfg.window if schedule in schedulers.DECOUPLED else 1


def simulate_costs(cfg: BenchConfig, schedule: str, stages: int, costs: Costs,
                   steps: int | None = None) -> Timeline:
    """Simulate ``schedule`` with sends charged to the sender (brigade's sends block)."""
    v = cfg.virtual if schedule == "interleaved" else 1
    sched = schedulers.build(schedule, stages=stages, microbatches=cfg.microbatches, virtual=v,
                             steps=steps or _steps_of(cfg, schedule))
    tl = schedulers.simulate(schedulers.lower(sched), costs)
    tl.meta["time_unit"] = "s"
    return tl


def _peak_bytes(tl: Timeline, stored: Sequence[float], workers: int) -> list[float]:
    """Per worker: the sum over its stages of peak in-flight microbatches x bytes each."""
    out = [0.0] * workers
    for s, per_mb in enumerate(stored):
        out[s % workers] += tl.peak_activations(s) * per_mb
    return out


def _timeline_row(cfg: BenchConfig, tl: Timeline, steps: int) -> dict[str, Any]:
    """Step time, samples/s, bubble and idle per worker of a (simulated) timeline."""
    step = tl.makespan / steps
    return {"step_time_s": step, "samples_per_s": cfg.batch_size / step if step else 0.0,
            "bubble_fraction": tl.bubble_fraction,
            "idle_per_stage": [tl.idle_fraction(w) for w in range(tl.num_workers)],
            "busy_per_step_s": [tl.busy(w) / steps for w in range(tl.num_workers)]}


def simulate_split(cfg: BenchConfig, mp: ModelProfile, model: nn.Sequential, stages: int,
                   on_costs: Callable[[str, SplitCosts], None] | None = None) -> list[dict]:
    """One simulated row per schedule for this (model, shape, stages) split."""
    rows: list[dict] = []
    cache: dict[tuple[int, str], SplitCosts] = {}
    for schedule in cfg.schedules:
        if not applies(schedule, mp.model):
            continue
        base = _row_base(cfg, mp.model, mp.shape, stages, schedule, "simulated")
        reason = _skip_reason(cfg, mp.model, len(mp.blocks), stages, schedule)
        if reason:
            rows.append({**base, "skipped": reason, "step_time_s": None, "samples_per_s": None,
                         "bubble_fraction": None})
            continue
        sc = split_costs(cfg, mp, model, stages, schedule, cache)
        steps = _steps_of(cfg, schedule)
        tl = simulate_costs(cfg, schedule, stages, sc.costs, steps)
        peaks = _peak_bytes(tl, sc.stored_bytes, stages)
        rows.append({**base, **_timeline_row(cfg, tl, steps), "simulated_steps": steps,
                     "balance": sc.balance, "costs": sc.source,
                     "peak_activation_bytes": max(peaks), "peak_activation_bytes_per_worker": peaks,
                     "stage_seconds": [round(x, 6) for x in _stage_seconds(sc.costs, stages)]})
        if on_costs is not None:
            on_costs(schedule, sc)
    return rows


def _stage_seconds(costs: Costs, stages: int) -> list[float]:
    """Compute seconds per microbatch on each worker (f + b, zb1p's b = i + w, S + T, or
    F + R), model stage s on worker s mod ``stages``."""
    c = costs.resolve(len(costs.f) if isinstance(costs.f, list) else stages)
    out = [0.0] * stages
    for s, (f, b, sg) in enumerate(zip(c.f, c.b, c.sg)):
        out[s % stages] += f + b + sg
    return out


def _row_base(cfg: BenchConfig, model: str, shape: str, stages: int, schedule: str,
              runner: str) -> dict[str, Any]:
    """The keys that identify a row (what was run, where)."""
    return {"model": model, "shape": shape, "width": cfg.width, "stages": stages,
            "virtual": cfg.virtual if schedule == "interleaved" else 1,
            "microbatches": cfg.microbatches, "batch_size": cfg.batch_size,
            "schedule": schedule, "runner": runner}


# -- torch.distributed.pipelining: the peer, run by torchrun -----------------------------------------
class TorchPeerError(RuntimeError):
    """The torchrun ranks failed or stopped answering; the message holds their log's tail."""


class TorchPeer:
    """``torchrun --standalone --nproc-per-node N`` on this script in ``--torch-worker`` mode.

    Why a long-lived peer: the machine is noisy, so torch and brigade rounds rotate in one
    run; starting torchrun per round would cost seconds each. Commands are JSON files
    ``cmd-<n>.json`` in ``workdir`` that rank 0 picks up and broadcasts; rank 0 answers in
    ``res-<n>.json``. ``close()`` (also the context manager's exit) ends the ranks: an
    ``exit`` command, then SIGTERM and SIGKILL to the process group if they linger.
    """

    def __init__(self, workdir: Path, nproc: int = 2, timeout_s: float = 300.0,
                 env: dict[str, str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.timeout_s = timeout_s
        self._n = 0
        self.error: str | None = None  # set when a command failed; no more are sent
        self.log_path = self.workdir / "torchrun.log"
        # The ranks get the environment brigade gives its stage actors (one malloc arena),
        # so the two runners differ by their pipelines, not by their allocators.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONUNBUFFERED": "1", "TORCH_CPP_LOG_LEVEL": "ERROR", **actor_env(),
               **(env or {})}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", str(Path(__file__).resolve()),
               "--torch-worker", str(self.workdir), "--parent-pid", str(os.getpid())]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def call(self, op: str, timeout_s: float | None = None, **args: Any) -> dict:
        """Send one command and wait for rank 0's answer (or the ranks' death)."""
        n, self._n = self._n, self._n + 1
        _write_json(self.workdir / f"cmd-{n}.json", {"op": op, **args})
        answer = self.workdir / f"res-{n}.json"
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while not answer.exists():
            if self.proc.poll() is not None:
                raise TorchPeerError(f"torchrun exited with status {self.proc.returncode} "
                                     f"during {op!r}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TorchPeerError(f"torchrun gave no answer to {op!r} within "
                                     f"{timeout_s or self.timeout_s:.0f} s:\n{self.log_tail()}")
            time.sleep(0.01)
        result = json.loads(answer.read_text())
        if "error" in result:
            raise TorchPeerError(f"torch rank 0 failed in {op!r}: {result['error']}")
        return result

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])

    def close(self, grace_s: float = 20.0) -> None:
        """Ask the ranks to exit; kill the process group if they do not."""
        if self.proc.poll() is None:
            try:
                _write_json(self.workdir / f"cmd-{self._n}.json", {"op": "exit"})
                self._n += 1
                self.proc.wait(timeout=grace_s)
            except (subprocess.TimeoutExpired, OSError):
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        # torchrun starts each rank in a session of its own, so this reaches torchrun's
        # group only; a rank whose torchrun is gone exits by itself (see _next_command).
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()

    def __enter__(self) -> "TorchPeer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _write_json(path: Path, data: Any) -> None:
    """Write atomically: readers (the ranks, the driver) never see half a file."""
    atomic_write_bytes(str(path), json.dumps(data).encode())


class _TorchSide:
    """One rank's part of a split under torch.distributed.pipelining (same seed as brigade).

    Each stage's ``forward_one_chunk``, ``backward_one_chunk`` and ``backward_weight_one_chunk``
    and the optimizer step are timed (wall clock), so a torch round yields a timeline with
    the same compute spans brigade records: its bubble is read the same way.
    """

    def __init__(self, cmd: dict, rank: int, world: int) -> None:
        from torch.distributed import pipelining as pp

        cfg = BenchConfig(**cmd["config"])
        model = make_model(cfg, cmd["model"], cmd["shape"])
        pieces = split(model, cmd["balance"])
        n = len(pieces)
        mine = [s for s in range(n) if s % world == rank]
        stages = [pp.PipelineStage(pieces[s], s, n, torch.device("cpu")) for s in mine]
        self.events: list[tuple] = []
        for st in stages:
            self._time_calls(st, rank)
        self.optimizer = torch.optim.SGD([p for s in mine for p in pieces[s].parameters()], lr=LR)
        cls = getattr(pp, _TORCH_CLASSES[cmd["schedule"]])
        multi = cmd["schedule"] == "interleaved"
        self.schedule = cls(stages if multi else stages[0], cfg.microbatches,
                            loss_fn=nn.CrossEntropyLoss())
        self.first, self.last = 0 in mine, n - 1 in mine
        self.mine, self.rank, self.world = mine, rank, world
        self.x, self.y = make_batch(cfg, cmd["shape"], cfg.batch_size)

    def _time_calls(self, stage: Any, rank: int) -> None:
        """Record (rank, stage, kind, microbatch, t0, t1) for every compute call of ``stage``."""
        for method, kind in (("forward_one_chunk", "F"), ("backward_one_chunk", "B"),
                             ("backward_weight_one_chunk", "W")):
            inner = getattr(stage, method, None)
            if inner is None:
                continue

            def timed(*args: Any, _inner=inner, _kind=kind, _s=stage.stage_index, **kwargs: Any):
                t0 = time.perf_counter()
                out = _inner(*args, **kwargs)
                j = args[0] if args else next(iter(kwargs.values()), -1)
                self.events.append((rank, _s, _kind, int(j), t0, time.perf_counter()))
                return out

            setattr(stage, method, timed)

    def warm_up(self, steps: int) -> float | None:
        """Untimed steps (at least one); the first step's loss."""
        losses = self.run(max(1, steps))["losses"]
        return losses[0] if losses else None

    def close(self) -> None:
        """Nothing to stop: torch's stages use the ranks' default group."""

    def step(self, step: int) -> float | None:
        """One training step (forward, backward, SGD update); the mean loss on the last rank."""
        args = (self.x,) if self.first else ()
        losses: list[torch.Tensor] = []
        kwargs = {"target": self.y, "losses": losses} if self.last else {}
        self.schedule.step(*args, **kwargs)
        t0 = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for s in self.mine:
            self.events.append((self.rank, s, "U", step, t0, time.perf_counter()))
        return float(torch.stack(losses).mean()) if losses else None

    def run(self, steps: int) -> dict:
        """Timed steps, each between barriers: wall seconds and loss per step, and every
        rank's compute spans (seconds from this round's first barrier on that rank)."""
        import torch.distributed as dist

        walls, losses = [], []
        self.events = []
        dist.barrier()
        origin = time.perf_counter()
        for i in range(steps):
            if i:
                dist.barrier()
            t0 = time.perf_counter()
            out = self.step(i)
            if out is not None:
                losses.append(out)
            dist.barrier()
            walls.append(time.perf_counter() - t0)
        spans = [(w, s, k, j, t0 - origin, t1 - origin) for (w, s, k, j, t0, t1) in self.events]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, {"events": spans, "losses": losses})
        return {"wall": walls, "events": [e for g in gathered for e in g["events"]],
                "losses": next((g["losses"] for g in gathered if g["losses"]), [])}


class _BrigadeSide:
    """One rank's part of a split on brigade's torchrun backend (same seed, weights and batch
    as the other runners): the same launcher, process layout and allocator as the torch
    side, so the two differ by their pipelines alone."""

    def __init__(self, cmd: dict, rank: int, world: int) -> None:
        self.cfg = BenchConfig(**cmd["config"])
        self.schedule = cmd["schedule"]
        self.pipe = _brigade_pipeline(self.cfg, make_model(self.cfg, cmd["model"], cmd["shape"]),
                                      cmd["balance"], self.schedule, backend="torchrun")
        self.batch = make_batch(self.cfg, cmd["shape"], self.cfg.batch_size)

    def warm_up(self, steps: int) -> float:
        return _brigade_warmup(replace(self.cfg, warmup=steps), self.pipe, self.batch,
                               self.schedule)

    def profile(self, steps: int) -> dict:
        """An in-place profile of ``steps`` steps (``Pipeline.profile``; see ``_in_place_step``)."""
        return {"profile": self.pipe.profile(*self.batch, steps=steps).to_json()}

    def run(self, steps: int) -> dict:
        """``steps`` timed steps, each between barriers as torch's are (a decoupled schedule:
        one ``Pipeline.run`` of ``steps`` steps); wall seconds per step and the timeline."""
        import torch.distributed as dist

        self.pipe.reset_timeline()
        walls = []
        decoupled = self.schedule in schedulers.DECOUPLED
        rounds, batches = (1, [self.batch] * steps) if decoupled else (steps, [self.batch])
        for _ in range(rounds):
            dist.barrier()
            t0 = time.perf_counter()
            self.pipe.run(batches)
            dist.barrier()
            walls.append((time.perf_counter() - t0) / len(batches))
        return {"wall": walls, "timeline": self.pipe.timeline().to_json()}

    def close(self) -> None:
        self.pipe.shutdown()


_SIDES = {"torch": _TorchSide, "brigade": _BrigadeSide}


def _next_command(workdir: Path, n: int, parent: int | None, agent: int) -> dict:
    """Rank 0 waits for command ``n``; a vanished parent (the driver) or torchrun (``agent``,
    this rank's parent process: killed, it leaves the rank to init) means exit."""
    path = workdir / f"cmd-{n}.json"
    while not path.exists():
        if (parent is not None and not _alive(parent)) or os.getppid() != agent:
            return {"op": "exit"}
        time.sleep(0.005)
    return json.loads(path.read_text())


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (the parent, seen from rank 0)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def torch_worker(workdir: Path, parent: int | None = None) -> int:
    """The ``--torch-worker`` mode: one torchrun rank serving build/run/profile commands (torch's side and brigade's torchrun
    side of a split) until exit."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(minutes=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    agent = os.getppid()  # torchrun's agent
    sides: dict[str, Any] = {}  # runner ("torch" | "brigade") -> its side of the current split
    n = 0
    try:
        while True:
            box = [_next_command(workdir, n, parent, agent) if rank == 0 else None]
            dist.broadcast_object_list(box, src=0)
            cmd = box[0]
            runner = cmd.get("runner", "torch")
            if cmd["op"] == "exit":
                break
            if cmd["op"] == "build" and runner in _SIDES:
                if runner in sides:
                    sides.pop(runner).close()  # free the previous split first
                t0 = time.perf_counter()
                sides[runner] = _SIDES[runner](cmd, rank, world)
                first = sides[runner].warm_up(cmd["warmup"])
                result = {"build_s": time.perf_counter() - t0, "first_loss": first}
            elif cmd["op"] == "run" and runner in sides:
                result = sides[runner].run(cmd["steps"])
            elif cmd["op"] == "profile" and runner == "brigade" and runner in sides:
                result = sides[runner].profile(cmd["steps"])
            else:
                result = {"error": f"unknown command {cmd['op']!r} for runner {runner!r} "
                                   f"(built: {sorted(sides)})"}
            if rank == 0:
                _write_json(workdir / f"res-{n}.json", result)
            n += 1
    finally:
        for side in sides.values():
            side.close()
        dist.destroy_process_group()
    return 0


# -- measurement -------------------------------------------------------------------------------------
@dataclass
class _Tally:
    """Timed steps of one runner on one schedule, gathered over rounds."""

    step_times: list[float] = field(default_factory=list)
    span: float = 0.0  # worker-seconds of wall time
    idle: list[list[float]] = field(default_factory=list)  # per round, per worker
    busy_per_worker: list[float] = field(default_factory=list)  # seconds, summed over rounds
    steps: int = 0  # steps inside the timelines tallied
    calibrated: list[float | None] = field(default_factory=list)  # brigade: per round
    in_place: list[float | None] = field(default_factory=list)  # brigade: per round
    rounds: list[float] = field(default_factory=list)  # mean step seconds per round
    first_loss: float | None = None

    @property
    def bubble(self) -> float:
        busy = sum(self.busy_per_worker)  # worker-seconds inside compute spans
        return min(1.0, max(0.0, 1.0 - busy / self.span)) if self.span else 0.0

    def idle_per_worker(self) -> list[float]:
        if not self.idle:
            return []
        return [statistics.fmean(r[w] for r in self.idle) for w in range(len(self.idle[0]))]


def _brigade_pipeline(cfg: BenchConfig, model: nn.Sequential, balance: list[int], schedule: str,
                      backend: str = "ray"):
    """A pipeline of 2 workers x 1 CPU thread for ``schedule`` on ``balance``: Ray actors,
    or (``backend="torchrun"``, called on every rank) the torchrun ranks."""
    from brigade.engine import Pipeline

    return Pipeline(model, stages=balance, schedule=schedule,
                    method=_METHOD.get(schedule, "backprop"),
                    virtual=cfg.virtual if schedule == "interleaved" else 1,
                    microbatches=cfg.microbatches,
                    cpus_per_stage=1 if backend == "ray" else None,
                    optimizer=lambda p: torch.optim.SGD(p, lr=LR),
                    loss_fn=nn.CrossEntropyLoss(), backend=backend, timeout_s=cfg.timeout_s)


def _brigade_round(cfg: BenchConfig, pipe, batch, tally: _Tally) -> Timeline:
    """An in-place profile of ``window`` steps, then ``window`` timed steps on brigade's Ray
    backend as one run (one driver round trip, as ``brigade train`` runs it); the round's
    timeline feeds busy and idle."""
    profiled = pipe.profile(*batch, steps=cfg.window)
    pipe.reset_timeline()
    t0 = time.perf_counter()
    pipe.run([batch] * cfg.window)
    walls = [(time.perf_counter() - t0) / cfg.window]
    return _tally_brigade(cfg, pipe.timeline(), walls, tally, profiled)  # this round's steps


def _peer_brigade_round(cfg: BenchConfig, peer: TorchPeer, tally: _Tally) -> Timeline:
    """An in-place profile of ``window`` steps, then ``window`` timed steps, on brigade's
    torchrun backend, run by the peer's ranks."""
    profiled = Timeline.from_json(
        peer.call("profile", runner="brigade", steps=cfg.window)["profile"])
    res = peer.call("run", runner="brigade", steps=cfg.window)
    return _tally_brigade(cfg, Timeline.from_json(res["timeline"]), res["wall"], tally, profiled)


def _tally_brigade(cfg: BenchConfig, tl: Timeline, walls: list[float], tally: _Tally,
                   profiled: Timeline) -> Timeline:
    """Add a brigade round: its step times (``walls``: seconds per step), its timeline (busy,
    idle) and its two predictions, from the in-place profile taken right before it (with
    this round's latency) and calibrated from its own spans."""
    tl.meta["time_unit"] = "s"
    tally.step_times += walls
    tally.rounds.append(statistics.fmean(walls))
    _tally_timeline(tally, tl, cfg.window)
    tally.calibrated.append(_predicted_step(tl, cfg.window))
    tally.in_place.append(_in_place_step(tl, profiled, cfg.window))
    return tl


def _predicted_step(tl: Timeline, steps: int) -> float | None:
    """Seconds per step the simulator predicts for the round ``tl`` with the costs this round
    measured (its mean action spans and message latency): what is left between that and the
    measured step time is engine overhead outside compute (driver round trips, waits) and the
    spread of the action times."""
    return _per_step(lambda: schedulers.predict(tl), steps)


def _in_place_step(tl: Timeline, profiled: Timeline, steps: int) -> float | None:
    """Seconds per step the simulator predicts for the round ``tl`` from an in-place profile
    (``Pipeline.profile`` of as many steps: every action timed where it runs, all workers at
    once, its sends charged to it; the simulator replays each action's own time), with the
    mean message latency (the receiver's wake-up) this round measured, which a profile that
    never waits cannot see. Why a profile per round, taken right before it: on this shared
    host the speed drifts by 10% within seconds (resnet18 gpipe on torchrun, three profile
    and run pairs of 3 steps: predicted from the profile / run 1.14, 0.93, 0.87), so one
    profile per split put its moment's speed into every round's prediction (one such run:
    1.10-1.28 on all four rounds); profiles spread over the rounds sample the speed the
    runs had."""
    return _per_step(lambda: schedulers.predict_from_profile(tl, profiled), steps)


def _per_step(simulation: Callable[[], Timeline], steps: int) -> float | None:
    """The simulated makespan per step, or None where the timeline cannot be simulated."""
    try:
        return simulation().makespan / steps
    except (ScheduleError, KeyError, ValueError):
        return None


def _brigade_warmup(cfg: BenchConfig, pipe, batch, schedule: str) -> float:
    """Warm-up steps (not timed); returns the first step's loss."""
    if schedule in schedulers.DECOUPLED:
        return pipe.run([batch] * max(cfg.warmup, cfg.window))[0]["loss"]
    losses = [pipe.step(*batch)["loss"] for _ in range(max(1, cfg.warmup))]
    return losses[0]


def _torch_round(cfg: BenchConfig, peer: TorchPeer, tally: _Tally, schedule: str) -> Timeline:
    """``window`` timed steps on torch; its timed compute calls give busy and idle."""
    res = peer.call("run", steps=cfg.window)
    tally.step_times += res["wall"]
    tl = Timeline(events=[tuple(e) + ("compute",) for e in res["events"]],
                  num_workers=cfg.measure_stages, samples=cfg.batch_size * cfg.window,
                  meta={"source": "measured", "schedule": schedule, "runner": "torch",
                        "microbatches": cfg.microbatches, "time_unit": "s"})
    _tally_timeline(tally, tl, cfg.window)
    return tl


def _tally_timeline(tally: _Tally, tl: Timeline, steps: int) -> None:
    """Add a round's compute and span (worker-seconds) and its idle fractions."""
    workers = tl.num_workers
    busy = [tl.busy(w) for w in range(workers)]
    tally.span += workers * tl.makespan
    tally.idle.append([tl.idle_fraction(w) for w in range(workers)])
    tally.busy_per_worker = [a + b for a, b in zip(tally.busy_per_worker or [0.0] * workers, busy)]
    tally.steps += steps


def measure_split(cfg: BenchConfig, model_name: str, costs: dict[str, SplitCosts],
                  peer: TorchPeer | None, progress: Callable[[str], None] = lambda s: None
                  ) -> tuple[list[dict], dict[tuple[str, str], Timeline]]:
    """Measure every schedule of one split on brigade (each of ``cfg.backends``) and torch,
    round by round in rotating order.

    Returns one brigade row per backend and schedule (``backend`` says which), torch rows
    (once per torch schedule), and the last measured round of each runner for the Gantt
    picture, keyed ``(runner label, schedule)``.
    """
    shape = cfg.measure_shape
    batch = make_batch(cfg, shape, cfg.batch_size)
    rounds = max(1, math.ceil(cfg.steps / cfg.window))
    rows: list[dict] = []
    timelines: dict[tuple[str, str], Timeline] = {}
    torch_tallies: dict[str, tuple[_Tally, list[int]]] = {}
    for schedule in cfg.schedules:
        if not applies(schedule, model_name) or schedule not in costs:
            continue
        sc, tname = costs[schedule], TORCH_SCHEDULES[schedule]
        progress(f"measuring {model_name} {schedule} (brigade on {', '.join(cfg.backends)}) "
                 f"beside torch {tname}")
        tallies = {b: _Tally() for b in cfg.backends}
        theirs = _Tally()
        load = [os.getloadavg()[0]]
        ray_pipe = (_brigade_pipeline(cfg, make_model(cfg, model_name, shape), sc.balance, schedule)
                    if "ray" in tallies else nullcontext())
        with ray_pipe as pipe:
            if pipe is not None:
                tallies["ray"].first_loss = _brigade_warmup(cfg, pipe, batch, schedule)
            if "torchrun" in tallies:
                tallies["torchrun"].first_loss = _on_torch(peer, progress, lambda: _peer_build(
                    cfg, peer, "brigade", model_name, shape, schedule, sc.balance))
            theirs.first_loss = _on_torch(peer, progress, lambda: _peer_build(
                cfg, peer, "torch", model_name, shape, schedule, sc.balance))
            runs = {}  # runner label -> one round (None when the peer has failed)
            if pipe is not None:
                runs[("brigade (ray)", schedule)] = lambda: _brigade_round(
                    cfg, pipe, batch, tallies["ray"])
            if "torchrun" in tallies:
                runs[("brigade (torchrun)", schedule)] = lambda: _on_torch(
                    peer, progress, lambda: _peer_brigade_round(cfg, peer, tallies["torchrun"]))
            runs[("torch", tname)] = lambda: _on_torch(
                peer, progress, lambda: _torch_round(cfg, peer, theirs, tname))
            order = list(runs)
            for r in range(rounds):
                for label in order[r % len(order):] + order[:r % len(order)]:
                    tl = runs[label]()
                    if tl is not None:
                        timelines[label] = tl
        load.append(os.getloadavg()[0])
        for backend, tally in tallies.items():
            if not tally.step_times:  # the peer failed before this backend ran
                continue
            last = timelines[(f"brigade ({backend})", schedule)]  # peaks since the start
            rows.append(_brigade_row(cfg, model_name, schedule, backend, tally, sc.balance,
                                     last.meta.get("peak_stored_activation_bytes", []),
                                     theirs if peer and not peer.error else None))
            rows[-1]["load_avg_1min"] = load  # the machine's load at start and end (2 cores)
        if theirs.step_times and tname == schedule:
            torch_tallies[schedule] = (theirs, sc.balance)
    for schedule, (tally, balance) in torch_tallies.items():
        rows.append(_measured_row(cfg, model_name, schedule, "torch", tally, balance))
    return rows, timelines


def _brigade_row(cfg: BenchConfig, model: str, schedule: str, backend: str, tally: _Tally,
                 balance: list[int], peak: Sequence[int], theirs: _Tally | None) -> dict:
    """A measured brigade row on one backend, with torch's step time and the ratio beside."""
    row = _measured_row(cfg, model, schedule, "brigade", tally, balance, peak_per_stage=peak,
                        workers=cfg.measure_stages)
    row["backend"] = backend
    if theirs is not None and theirs.step_times:
        row.update(torch_schedule=TORCH_SCHEDULES[schedule],
                   torch_step_time_s=statistics.median(theirs.step_times),
                   torch_min_step_time_s=min(theirs.step_times),
                   torch_first_loss=theirs.first_loss)
        row["min_ratio_vs_torch"] = row["min_step_time_s"] / row["torch_min_step_time_s"]
        row["ratio_vs_torch"] = row["step_time_s"] / row["torch_step_time_s"]
    return row


def _on_torch(peer: TorchPeer | None, progress: Callable[[str], None],
              action: Callable[[], Any]) -> Any:
    """``action()`` on the torchrun peer, or None when the peer is absent or has failed; a
    failure is kept on the peer (the Ray measurements go on without it) and reported once."""
    if peer is None or peer.error is not None:
        return None
    try:
        return action()
    except TorchPeerError as err:
        peer.error = str(err)
        progress(f"torchrun peer failed; brigade on Ray goes on alone: {err}")
        return None


def _peer_build(cfg: BenchConfig, peer: TorchPeer, runner: str, model: str, shape: str,
                schedule: str, balance: list[int]) -> float | None:
    """Build ``runner``'s side of this split on the ranks (torch: ``schedule``'s torch
    companion; brigade: ``schedule`` itself) and run its warm-up steps; the first loss."""
    res = peer.call("build", runner=runner, config=_config_dict(cfg), model=model, shape=shape,
                    schedule=TORCH_SCHEDULES[schedule] if runner == "torch" else schedule,
                    balance=balance, warmup=cfg.warmup)
    return res.get("first_loss")


def _config_dict(cfg: BenchConfig) -> dict[str, Any]:
    """The config as JSON (tuples become lists; BenchConfig turns them back)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}


def _measured_row(cfg: BenchConfig, model: str, schedule: str, runner: str, tally: _Tally,
                  balance: list[int], peak_per_stage: Sequence[int] = (), workers: int = 2) -> dict:
    """A measured row: median step time, bubble and idle from the rounds' timelines."""
    step = statistics.median(tally.step_times)
    row = {**_row_base(cfg, model, cfg.measure_shape, cfg.measure_stages, schedule, runner),
           "step_time_s": step, "samples_per_s": cfg.batch_size / step,
           "min_step_time_s": min(tally.step_times),
           "bubble_fraction": tally.bubble, "idle_per_stage": tally.idle_per_worker(),
           "steps_timed": tally.steps,
           "step_times_s": tally.step_times, "balance": balance, "first_loss": tally.first_loss,
           "bubble_source": "timeline" if runner == "brigade" else "timed compute calls",
           "busy_per_step_s": [b / tally.steps for b in tally.busy_per_worker] if tally.steps else []}
    calibrated = [c for c in tally.calibrated if c]
    if calibrated:
        row["calibrated_samples_per_s"] = cfg.batch_size / statistics.median(calibrated)
    pairs = [(m, p) for m, p in zip(tally.rounds, tally.in_place) if p]
    if pairs:  # round by round (each its own profile and latency); predicted over measured
        # time of the rounds together: each round's profile-to-run noise averages out
        row["in_place_samples_per_s"] = cfg.batch_size / statistics.fmean(p for _, p in pairs)
        row["in_place_over_measured_rounds"] = [m / p for m, p in pairs]
        row["in_place_over_measured"] = sum(m for m, _ in pairs) / sum(p for _, p in pairs)
    if peak_per_stage:
        per_worker = [0.0] * workers
        for s, b in enumerate(peak_per_stage):
            per_worker[s % workers] += b
        row["peak_activation_bytes"] = max(per_worker)
        row["peak_activation_bytes_per_worker"] = per_worker
    return row


@contextmanager
def _ray_cluster(num_cpus: int = 2, env: dict[str, str] | None = None) -> Iterator[None]:
    """A private local Ray cluster for the measured runs, shut down on the way out (an
    already running one is used as it is, without ``env``)."""
    import ray

    started = not ray.is_initialized()
    if started:
        # address="local": private even where `ray start --head` runs (see ensure_ray)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 logging_level="ERROR",
                 log_to_driver=False, runtime_env={"env_vars": env} if env else None)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


# -- reports -----------------------------------------------------------------------------------------
def add_predictions(rows: list[dict]) -> None:
    """Give each measured brigade row its simulated twin's throughput and the error."""
    sims = {(r["model"], r["shape"], r["stages"], r["schedule"]): r
            for r in rows if r["runner"] == "simulated" and r.get("samples_per_s")}
    for r in rows:
        if r["runner"] != "brigade":
            continue
        sim = sims.get((r["model"], r["shape"], r["stages"], r["schedule"]))
        if sim:
            r["predicted_samples_per_s"] = sim["samples_per_s"]
            r["predicted_over_measured"] = sim["samples_per_s"] / r["samples_per_s"]
            r["predicted_bubble_fraction"] = sim["bubble_fraction"]
            r["predicted_busy_per_step_s"] = sim["busy_per_step_s"]


def target_checks(rows: list[dict]) -> list[dict]:
    """The three targets, one line per measured brigade row and target, met or not."""
    checks = []
    for r in rows:
        if r["runner"] != "brigade":
            continue
        name = f"{r['model']} {r['schedule']} (brigade on {r['backend']})"
        if r["schedule"] in _RATIO_SCHEDULES and r.get("ratio_vs_torch"):
            checks.append({"check": f"{name} / torch step time", "value": r["ratio_vs_torch"],
                           "target": f"<= {_RATIO_TARGET}",
                           "met": r["ratio_vs_torch"] <= _RATIO_TARGET})
        if r["schedule"] in schedulers.DECOUPLED and r.get("torch_step_time_s"):
            speedup = r["torch_step_time_s"] / r["step_time_s"]
            m, p = r["microbatches"], r["stages"]
            checks.append({"check": f"{name} / torch 1f1b throughput",
                           "value": speedup, "target": f">= {_SPEEDUP_TARGET}x",
                           "met": speedup >= _SPEEDUP_TARGET,
                           "note": f"no flush gains at most (m+p-1)/m = {(m + p - 1) / m:.3f}x "
                                   f"at p={p}, m={m} on balanced stages"})
        source = next((k for k in ("in_place", "predicted") if r.get(f"{k}_over_measured")), None)
        if source:  # the in-place profile's prediction where the row has one
            ratio = r[f"{source}_over_measured"]
            checks.append({"check": f"{name} simulated ({_PROFILE_LABEL[source]} profile) / "
                                    "measured throughput",
                           "value": ratio, "target": f"within {_PREDICT_TOLERANCE:.0%}",
                           "met": abs(ratio - 1) <= _PREDICT_TOLERANCE})
    return checks


_PROFILE_LABEL = {"in_place": "in-place", "predicted": "isolated"}


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def measured_table_rows(rows: list[dict]) -> list[list[str]]:
    """Measured brigade rows beside torch and the simulator, as text cells."""
    out = []
    for r in rows:
        if r["runner"] != "brigade":
            continue
        out.append([r["model"], r["schedule"], r["backend"], _ms(r["step_time_s"]),
                    f"{r['samples_per_s']:.1f}", _pct(r["bubble_fraction"]),
                    f"{r.get('torch_schedule', '-')}",
                    _ms(r.get("torch_step_time_s")),
                    f"{r['ratio_vs_torch']:.2f} ({r['min_ratio_vs_torch']:.2f})"
                    if r.get("ratio_vs_torch") else "-",
                    _ratio_cells(r, "in_place"), _ratio_cells(r, "predicted"),
                    f"{r['calibrated_samples_per_s']:.1f}" if r.get("calibrated_samples_per_s") else "-",
                    _busy_cell(r)])
    return out


MEASURED_COLUMNS = ["model", "schedule", "brigade backend", "brigade step ms",
                    "brigade samples/s", "brigade bubble", "torch schedule", "torch step ms", "brigade/torch step (of fastest steps)",
                    "simulated samples/s, in-place profile (/measured)",
                    "simulated samples/s, isolated profile (/measured)", "calibrated samples/s",
                    "compute ms/step per worker, measured (simulated)"]


def _ratio_cells(r: dict, source: str) -> str:
    """A prediction's samples/s and (its ratio to the measured), or "-"."""
    if not r.get(f"{source}_samples_per_s"):
        return "-"
    return f"{r[f'{source}_samples_per_s']:.1f} ({r[f'{source}_over_measured']:.2f})"


def _busy_cell(r: dict) -> str:
    """Per worker: compute milliseconds per step measured, and (simulated)."""
    meas, sim = r.get("busy_per_step_s", []), r.get("predicted_busy_per_step_s", [])
    return " ".join(f"{1e3 * m:.0f}" + (f" ({1e3 * sim[w]:.0f})" if w < len(sim) else "")
                    for w, m in enumerate(meas))
SIM_COLUMNS = ["model", "shape", "stages", "schedule", "step ms", "samples/s", "bubble",
               "idle per worker", "peak act. MiB", "balance", "costs"]


def sim_table_rows(rows: list[dict]) -> list[list[str]]:
    """Simulated (and torch) rows as text cells."""
    out = []
    for r in rows:
        if r["runner"] == "brigade":
            continue
        if r.get("skipped"):
            out.append([r["model"], r["shape"], str(r["stages"]), r["schedule"],
                        "-", "-", "-", f"skipped: {r['skipped']}", "-", "-", "-"])
            continue
        idle = " ".join(f"{100 * x:.0f}" for x in r.get("idle_per_stage", []))
        label = r["schedule"] + ("" if r["runner"] == "simulated" else f" ({r['runner']}, measured)")
        out.append([r["model"], r["shape"], str(r["stages"]), label, _ms(r["step_time_s"]),
                    f"{r['samples_per_s']:.1f}", _pct(r["bubble_fraction"]), idle,
                    _mib(r.get("peak_activation_bytes")),
                    str(r.get("balance", "-")).replace(" ", ""), r.get("costs", r["runner"])])
    return out


def print_report(console, cfg: BenchConfig, rows: list[dict], checks: list[dict]) -> None:
    """Rich tables: simulated splits, then measured side by side, then the targets."""
    from rich.table import Table

    t = Table(title=f"simulated splits (width {cfg.width}, batch {cfg.batch_size}, "
                    f"m={cfg.microbatches}, 1 thread per stage; idle % per worker)",
              title_justify="left")
    for col in SIM_COLUMNS:
        t.add_column(col, justify="left" if col in ("model", "schedule", "costs", "balance") else "right")
    for cells in sim_table_rows(rows):
        t.add_row(*cells)
    console.print(t)
    measured = measured_table_rows(rows)
    if measured:
        m = Table(title=f"measured: {cfg.measure_stages} stages, {cfg.measure_shape}, median of "
                        f"timed steps; brigade (Ray actors or torchrun ranks, 2 x 1 thread) and "
                        f"torch.distributed.pipelining (torchrun gloo, 2 x 1 thread) in rotation",
                  title_justify="left")
        for col in MEASURED_COLUMNS:
            m.add_column(col, justify="left" if col in ("model", "schedule", "brigade backend",
                                                        "torch schedule") else "right")
        for cells in measured:
            m.add_row(*cells)
        console.print(m)
    loads = [x for r in rows for x in r.get("load_avg_1min", [])]
    if loads:
        console.print(f"1-minute load average during the measurements: {min(loads):.1f}-"
                      f"{max(loads):.1f} on {os.cpu_count()} cores (above ~2, other processes "
                      "shared the cores and the timings carry their noise)")
    for c in checks:
        mark = "[green]met[/]" if c["met"] else "[red]not met[/]"
        note = f"; {c['note']}" if c.get("note") else ""
        console.print(f"{c['check']}: {c['value']:.2f} (target {c['target']}) {mark}{note}")


def write_markdown(path: Path, cfg: BenchConfig, rows: list[dict], checks: list[dict],
                   wall_s: float) -> None:
    """The measured and simulated tables and the targets, as GitHub markdown."""
    def table(cols: list[str], body: list[list[str]]) -> list[str]:
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        return lines + ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in body]

    loads = [x for r in rows for x in r.get("load_avg_1min", [])]
    load = (f" 1-minute load average during the measurements: {min(loads):.1f}-{max(loads):.1f} "
            f"on {os.cpu_count()} cores." if loads else "")
    out = ["# ResNet stage splits: brigade vs torch.distributed.pipelining",
           "", f"width {cfg.width}, batch {cfg.batch_size}, {cfg.microbatches} microbatches, "
               f"one CPU thread per stage; run took {wall_s:.0f} s.{load}"
               + (f" Worker environment: {' '.join(cfg.worker_env)}." if cfg.worker_env else ""),
           ""]
    measured = measured_table_rows(rows)
    if measured:
        out += [f"## Measured ({cfg.measure_stages} stages, {cfg.measure_shape}, median of timed "
                "steps, runners in rotation)", ""] + table(MEASURED_COLUMNS, measured) + [""]
    if checks:
        out += ["## Targets", ""] + [
            f"- {c['check']}: {c['value']:.2f} (target {c['target']}): "
            f"{'met' if c['met'] else 'NOT met'}" + (f" ({c['note']})" if c.get("note") else "")
            for c in checks] + [""]
    out += ["## Simulated (and torch measured)", ""] + table(SIM_COLUMNS, sim_table_rows(rows))
    path.write_text("\n".join(out) + "\n")


def write_gantt(path: Path, cfg: BenchConfig, measured: dict[tuple[str, str, str], Timeline],
                simulated: dict[tuple[str, str], Timeline]) -> Path:
    """Measured rounds (brigade, and torch's) beside brigade's simulation of the same steps,
    or, with nothing measured, the simulated schedules; one time axis in seconds."""
    panels: dict[str, Timeline] = {}
    for (model, runner, schedule), tl in measured.items():
        tl.meta["time_unit"] = "s"
        panels[f"{model} {schedule}: {runner}, measured"] = tl
        if runner.startswith("brigade") and (model, schedule) in simulated:
            panels[f"{model} {schedule}: brigade, simulated"] = simulated[(model, schedule)]
    if panels:
        title = (f"measured rounds of {cfg.window} steps and brigade's simulation of them "
                 f"({cfg.measure_stages} stages, {cfg.measure_shape}, width {cfg.width}, "
                 f"m={cfg.microbatches}, batch {cfg.batch_size})")
    else:
        panels = {f"{m} {s}: simulated": tl for (m, s), tl in simulated.items()}
        title = f"simulated schedules (width {cfg.width}, m={cfg.microbatches})"
    return schedulers.plot_gantt(panels, path, title=title, dpi=150 if len(panels) <= 12 else 80)


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


if __name__ == "__main__":
    sys.exit(main())
