"""Configuration: the models, shapes and schedules measured, the flags, and the checked
BenchConfig."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from brigade.stages.errors import ConfigError, choose

# The benchmark in one line (its entry point's docstring says the rest).
DESCRIPTION = ("ResNet and RevNet stage splits: brigade beside torch.distributed.pipelining, "
               "and the simulator.")

__all__ = [
    "BACKENDS", "BenchConfig", "BenchError", "LR", "MODELS", "QUICK", "SCHEDULES", "SHAPES",
    "TORCH_SCHEDULES", "build_parser", "parse_config",
]


# the MNIST MLP (the README's main job) beside the convolutional nets: where a microbatch's
# compute is a few milliseconds, so the messages' fixed costs show
CONV_MODELS = ("resnet18", "resnet34", "resnet50", "revnet18", "revnet34", "revnet50")
MODELS = (*CONV_MODELS, "mlp")
# name -> ((channels, height, width), classes, stem: None for the MLP, which has none)
SHAPES: dict[str, tuple[tuple[int, int, int], int, str | None]] = {
    "cifar": ((3, 32, 32), 10, "cifar"),
    "imagenet": ((3, 224, 224), 1000, "imagenet"),
    "mnist": ((1, 28, 28), 10, None),
}
SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb1p", "dni", "petra", "dgl")
# brigade schedule -> the torch.distributed.pipelining schedule measured beside it
TORCH_SCHEDULES = {"gpipe": "gpipe", "1f1b": "1f1b", "interleaved": "interleaved",
                   "zb1p": "1f1b", "dni": "1f1b", "petra": "1f1b", "dgl": "1f1b"}
BACKENDS = ("ray", "torchrun")  # brigade's backends the measured splits run on
_TORCH_CLASSES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B",
                  "interleaved": "ScheduleInterleaved1F1B"}
_METHOD = {"dni": "dni", "petra": "petra", "dgl": "dgl"}  # schedule -> learning rule (else backprop)
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

    models: tuple[str, ...] = CONV_MODELS  # the MLP on request (bench/unlocked_regime.py)
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
    p = _Parser(prog="resnet_splits.py", description=DESCRIPTION)
    d = BenchConfig()
    p.add_argument("--models", type=_csv(str), default=d.models, help="comma list (%(default)s)")
    p.add_argument("--shapes", type=_csv(str), default=d.shapes, help="cifar,imagenet")
    p.add_argument("--stages", type=_csv(int), default=d.stages, help="stage counts (2,4,8)")
    p.add_argument("--schedules", type=_csv(str), default=d.schedules,
                   help="gpipe,1f1b,interleaved,zb1p,dni,petra,dgl (petra: revnets only)")
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
