"""The training job behind ``brigade train``: data, model, pipeline, epochs, report.

It builds the model for the data set it is given (MNIST into a revnet works), trains it with
a :class:`Pipeline` for the requested epochs or steps with a progress bar, evaluates test
accuracy through the pipeline, and returns the figures DESIGN.md lists for ``--json``.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from brigade.stages.data import batches, load_dataset
from brigade.stages.models import build_model, shape_kwargs

from .config import METHOD_SCHEDULES
from .errors import PipelineConfigError
from .pipeline import Pipeline

__all__ = ["TrainConfig", "run_training", "make_optimizer", "OPTIMIZERS"]

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop")


@dataclass
class TrainConfig:
    """One training job; every field is a ``brigade train`` flag."""

    model: str = "mlp"
    width: int | None = None
    data: str = "synthetic"
    data_dir: str | None = None
    stages: int = 2
    balance: list[int] | None = None
    balance_by: str = "uniform"
    schedule: str | None = None
    method: str = "backprop"
    microbatches: int = 4
    virtual: int = 1
    batch_size: int = 64
    epochs: int = 1
    steps: int | None = None
    lr: float = 0.05
    optimizer: str = "sgd"
    seed: int = 0
    backend: str = "ray"
    address: str | None = None
    synthetic_size: int = 2048
    window: int | None = None  # steps per pipelined run; default by schedule (see window_steps)
    options: dict = field(default_factory=dict)  # the method's stage options (sg_lr, ...)
    schedule_options: dict = field(default_factory=dict)  # e.g. {"k": 4} for stale

    def __post_init__(self) -> None:
        for name in ("stages", "microbatches", "virtual", "batch_size", "epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise PipelineConfigError(f"--{name.replace('_', '-')} {value} must be >= 1")
        if self.window is not None and self.window < 1:
            raise PipelineConfigError(f"--window {self.window} must be >= 1")
        if self.steps is not None and self.steps < 1:
            raise PipelineConfigError(f"--steps {self.steps} must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise PipelineConfigError(f"--lr {self.lr} must be a positive number")
        if self.optimizer.lower() not in OPTIMIZERS:
            raise PipelineConfigError(
                f"unknown optimizer {self.optimizer!r}; valid optimizers: {', '.join(OPTIMIZERS)}"
            )
        if self.batch_size < self.microbatches:
            raise PipelineConfigError(
                f"--batch-size {self.batch_size} is smaller than --microbatches "
                f"{self.microbatches}; each microbatch needs at least one sample"
            )
        if self.schedule is None:
            valid = METHOD_SCHEDULES.get(self.method.lower())
            self.schedule = valid[0] if valid else "1f1b"


def make_optimizer(name: str, lr: float):
    """A picklable factory ``params -> torch optimizer`` (shipped to every stage actor)."""
    name = name.lower()
    table = {
        "sgd": (torch.optim.SGD, {}),
        "momentum": (torch.optim.SGD, {"momentum": 0.9}),
        "nesterov": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
        "adam": (torch.optim.Adam, {}),
        "adamw": (torch.optim.AdamW, {}),
        "rmsprop": (torch.optim.RMSprop, {}),
    }
    if name not in table:
        raise PipelineConfigError(
            f"unknown optimizer {name!r}; valid optimizers: {', '.join(table)}"
        )
    cls, kwargs = table[name]
    return functools.partial(cls, lr=lr, **kwargs)


def _model_kwargs(cfg: TrainConfig, shape, num_classes) -> dict:
    kwargs = shape_kwargs(shape, num_classes)
    if cfg.width is not None:
        kwargs["width"] = cfg.width
    return kwargs


def _load(cfg: TrainConfig):
    """Train and test splits of the data set (synthetic data is made, never downloaded)."""
    extra: dict[str, Any] = {}
    if cfg.data.lower() == "synthetic":
        like = "cifar10" if cfg.model.lower().startswith(("resnet", "revnet")) else "mnist"
        extra = {"like": like, "seed": cfg.seed}
        train = load_dataset("synthetic", split="train", size=cfg.synthetic_size, **extra)
        test = load_dataset("synthetic", split="test", size=max(256, cfg.synthetic_size // 8),
                            **extra)
        return train, test
    train = load_dataset(cfg.data, data_dir=cfg.data_dir, split="train")
    test = load_dataset(cfg.data, data_dir=cfg.data_dir, split="test")
    return train, test


def run_training(cfg: TrainConfig, progress=None) -> dict[str, Any]:
    """Train as ``cfg`` says; returns the report (see DESIGN.md for the JSON fields).

    ``progress`` is an optional callable ``(done_steps, total_steps, info_dict)`` that the
    CLI turns into a progress bar.
    """
    torch.manual_seed(cfg.seed)
    train, test = _load(cfg)
    model_kwargs = _model_kwargs(cfg, train.shape, train.num_classes)
    model = build_model(cfg.model, **model_kwargs)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = cfg.steps if cfg.steps is not None else steps_per_epoch * cfg.epochs
    epochs = math.ceil(total_steps / steps_per_epoch)
    pipe = Pipeline(
        model, stages=cfg.balance or cfg.stages, schedule=cfg.schedule, method=cfg.method,
        microbatches=cfg.microbatches, virtual=cfg.virtual,
        optimizer=make_optimizer(cfg.optimizer, cfg.lr), loss_fn=nn.CrossEntropyLoss(),
        backend=cfg.backend, balance_by=cfg.balance_by, address=cfg.address,
        sample=train.x[: cfg.batch_size], schedule_options=cfg.schedule_options,
        **cfg.options,
    )
    with pipe:
        report = _train_loop(cfg, pipe, train, total_steps, epochs, progress)
        report["final_test_accuracy"] = _accuracy(pipe, test)
        report.update(_timeline_figures(pipe))
        report["state_dict"] = pipe.state_dict()
    report["config"] = asdict(cfg)
    report["model_kwargs"] = model_kwargs
    return report


def window_steps(cfg: TrainConfig, pipe: Pipeline) -> int:
    """Steps per pipelined run: decoupled schedules fill and drain once per run, so they
    get long runs (32 steps); flush schedules lose nothing by running step by step."""
    if cfg.window is not None:
        return cfg.window
    return 32 if pipe.decoupled else 1


def _train_loop(cfg, pipe, train, total_steps, epochs, progress) -> dict[str, Any]:
    """Epochs of pipelined runs; wall time counts training only (not evaluation)."""
    done, train_s, losses = 0, 0.0, []
    window = window_steps(cfg, pipe)
    for epoch in range(epochs):
        epoch_losses: list[float] = []
        pending: list = []
        stream = batches(train, cfg.batch_size, shuffle=True, seed=cfg.seed + epoch)
        for x, y in stream:
            if done + len(pending) >= total_steps:
                break
            if x.shape[0] < cfg.microbatches:
                continue  # a last batch too small to split; skipped, as drop_last would
            pending.append((x, y))
            if len(pending) == window:
                done, train_s = _run_window(pipe, pending, done, train_s, epoch_losses)
                _report(progress, done, total_steps, epoch, epoch_losses)
                pending = []
        if pending:
            done, train_s = _run_window(pipe, pending, done, train_s, epoch_losses)
            _report(progress, done, total_steps, epoch, epoch_losses)
        if epoch_losses:
            losses.append(sum(epoch_losses) / len(epoch_losses))
    samples = pipe.timeline().samples
    return {
        "train_loss": losses,
        "steps": done,
        "wall_s": train_s,
        "samples_per_s": samples / train_s if train_s > 0 else 0.0,
    }


def _run_window(pipe, pending, done, train_s, epoch_losses):
    """One pipelined run over ``pending`` batches; returns the updated counters."""
    t0 = time.perf_counter()
    outs = pipe.run(pending)
    train_s += time.perf_counter() - t0
    for i, out in enumerate(outs):
        _check_finite(out["loss"], done + i)
        epoch_losses.append(out["loss"])
    return done + len(outs), train_s


def _report(progress, done, total, epoch, epoch_losses) -> None:
    if progress:
        progress(done, total, {"epoch": epoch + 1, "loss": epoch_losses[-1]})


def _check_finite(loss: float, step: int) -> None:
    if not math.isfinite(loss):
        raise PipelineConfigError(
            f"loss became {loss} at step {step}; lower --lr or check the data"
        )


def _accuracy(pipe: Pipeline, test, batch_size: int = 500) -> float:
    correct = 0
    for i in range(0, len(test), batch_size):
        x, y = test.x[i : i + batch_size], test.y[i : i + batch_size]
        correct += int((pipe.predict(x).argmax(1) == y).sum())
    return correct / max(1, len(test))


def _timeline_figures(pipe: Pipeline) -> dict[str, Any]:
    """Bubble and per-stage figures of the measured run (all steps)."""
    tl = pipe.timeline()
    peaks = tl.meta["peak_stored_activation_bytes"]
    stages = []
    for w in range(tl.num_workers):
        held = [s for s in range(len(peaks)) if pipe.schedule.worker_of(s) == w]
        stages.append({
            "worker": w,
            "stages": held,
            "busy_s": tl.busy(w),
            "idle_fraction": tl.idle_fraction(w),
            "peak_stored_activation_bytes": sum(peaks[s] for s in held),
        })
    return {"bubble_fraction": tl.bubble_fraction, "stages": stages, "timeline": tl,
            "balance": pipe.balance, "pid": os.getpid()}
