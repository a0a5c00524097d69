"""The training job behind ``brigade train``: data, model, pipeline, epochs, report.

It builds the model for the data set it is given (MNIST into a revnet works), trains it with
a :class:`Pipeline` for the requested epochs or steps with a progress bar, evaluates test
accuracy through the pipeline, and returns the figures the README lists for ``--json``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from brigade.stages.data import Batches, load_dataset
from brigade.stages.models import build_model, shape_kwargs

from .checkpoint import Checkpoint, CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from brigade.stages.rules import get_method

from .config import check_method_schedule, check_placement
from .errors import PipelineConfigError, StageFailedError
from .pipeline import Pipeline
from .torchrun_backend import broadcast_object, is_rank0

__all__ = ["TrainConfig", "run_training", "make_optimizer", "default_optimizer", "OPTIMIZERS",
           "pipeline_accuracy"]

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
    lr: float | None = None  # default: 0.05 for pipelines, the measured default for fwdgrad
    optimizer: str | None = None  # default: see default_optimizer
    seed: int = 0
    backend: str = "ray"
    address: str | None = None
    cpus_per_stage: float | None = None  # default: a fair share of the cluster's CPUs
    gpus_per_stage: float | None = None  # default: one each where the cluster has enough
    placement: str = "pack"  # pack | spread | strict_pack | strict_spread
    placement_timeout: float = 30.0  # seconds to wait for the cluster to place the stages
    synthetic_size: int = 2048
    window: int | None = None  # steps per pipelined run; default by schedule (see window_steps)
    checkpoint: str | None = None  # folder of checkpoints
    checkpoint_every: int | None = None  # steps between saves (and one at the end)
    resume: bool = False
    max_restarts: int = 0
    guess: str = "random"  # fwdgrad: random | local
    projections: int | str = "auto"  # fwdgrad: directions per step (an integer, or auto)
    options: dict = field(default_factory=dict)  # the method's stage options (sg_lr, ...)
    schedule_options: dict = field(default_factory=dict)  # e.g. {"k": 4} for stale

    def __post_init__(self) -> None:
        for name in ("stages", "microbatches", "virtual", "batch_size", "epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise PipelineConfigError(f"--{name.replace('_', '-')} {value} must be >= 1")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise PipelineConfigError(f"--checkpoint-every {self.checkpoint_every} must be >= 1")
        if self.max_restarts < 0:
            raise PipelineConfigError(f"--max-restarts {self.max_restarts} must be >= 0")
        for flag in ("cpus_per_stage", "gpus_per_stage"):
            value = getattr(self, flag)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise PipelineConfigError(f"--{flag.replace('_', '-')} {value:g} must be >= 0")
        if not (self.placement_timeout > 0 and math.isfinite(self.placement_timeout)):
            raise PipelineConfigError(
                f"--placement-timeout {self.placement_timeout:g} must be a positive number of seconds")
        self.placement = check_placement(self.placement)
        if (self.resume or self.max_restarts or self.checkpoint_every) and not self.checkpoint:
            raise PipelineConfigError(
                "--resume, --max-restarts and --checkpoint-every need --checkpoint DIR")
        if self.window is not None and self.window < 1:
            raise PipelineConfigError(f"--window {self.window} must be >= 1")
        if self.steps is not None and self.steps < 1:
            raise PipelineConfigError(f"--steps {self.steps} must be >= 1")
        method = check_method_schedule(self.method, self.schedule)  # before data, processes
        rule = get_method(method)
        if self.lr is None:
            self.lr = rule.default_optimizer[1]  # None: the optimizer's own (fwdgrad)
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise PipelineConfigError(f"--lr {self.lr} must be a positive number")
        if self.optimizer is None:
            self.optimizer = default_optimizer(self.method)
        if rule.optimizers is None and self.optimizer.lower() not in OPTIMIZERS:
            raise PipelineConfigError(
                f"unknown optimizer {self.optimizer!r}; valid optimizers: {', '.join(OPTIMIZERS)}"
            )
        if rule.optimizers is not None and self.optimizer.lower() not in rule.optimizers:
            raise PipelineConfigError(
                f"--optimizer {self.optimizer} is not a {rule.optimizer_kind or rule.name} "
                f"optimizer; valid for {rule.name}: {', '.join(rule.optimizers)}")
        if self.batch_size < self.microbatches:
            raise PipelineConfigError(
                f"--batch-size {self.batch_size} is smaller than --microbatches "
                f"{self.microbatches}; each microbatch needs at least one sample"
            )
        if "projections" in rule.config_fields:
            self.projections = _projections(self.projections)  # fails before any process starts
        rule.make_options(**_stage_options(self), **{  # the rule's checks, before data
            k: v for k, v in self.schedule_options.items() if k in _schedule_fields(rule)})
        if self.single_process and self.checkpoint:  # --resume/--max-restarts need one
            raise PipelineConfigError(
                f"the single-process {rule.single_process} (--stages 1 --backend local) "
                "does not checkpoint; drop --checkpoint/--resume/--max-restarts, or run the "
                "pipelined form (--stages 2 or more)")
        if self.single_process:
            return
        if self.schedule is None:
            self.schedule = rule.default_schedule

    @property
    def single_process(self) -> bool:
        """One stage on the local backend of a rule with a whole-model trainer (fwdgrad's
        single-process estimator: full batches, every guess); any other run pipelines."""
        return (bool(get_method(self.method).single_process) and self.stages == 1
                and not self.balance and self.backend == "local")


def _schedule_fields(rule) -> set[str]:
    """The rule's options that belong to its schedule (stale's k, petra's accumulate)."""
    import dataclasses

    return {f.name for f in dataclasses.fields(rule.options) if f.metadata.get("schedule")}


def default_optimizer(method: str) -> str:
    """The optimizer a method trains best with when the user names none (measured).

    Backprop: SGD with momentum 0.9 (MNIST MLP, 1 epoch: 94.3%; plain SGD 90.4% after 5).
    DNI and cDNI update once per microbatch from a biased synthetic gradient, and momentum
    piles that bias up: plain SGD reached 90.6% / 90.6% after 1 epoch where momentum 0.9
    reached 45.4% / 48.3% at the same lr (`bench/unlocked_mnist.py` compares all methods
    with one shared optimizer). Forward gradients: Adam (stages/fg_optim.py).
    """
    return get_method(method).default_optimizer[0]


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


def _optimizer_factory(cfg: TrainConfig):
    """The stages' optimizer: built by the rule where it says how (fwdgrad's come from
    ``fg_optim``, with its measured defaults), else by ``make_optimizer``."""
    rule = get_method(cfg.method)
    if rule.optimizer_factory is not None:
        return rule.optimizer_factory(cfg.optimizer, cfg.lr, cfg)
    return make_optimizer(cfg.optimizer, cfg.lr)


def _stage_options(cfg: TrainConfig) -> dict[str, Any]:
    """The rule's options: the ``brigade train`` settings it takes (``config_fields``:
    fwdgrad's projections, seed, guess), then the method flags given."""
    rule = get_method(cfg.method)
    return {**{f: getattr(cfg, f) for f in rule.config_fields}, **cfg.options}


def _projections(value: str) -> int | str:
    """``--projections``: a positive integer, or ``"auto"``."""
    text = str(value).strip().lower()
    if text == "auto":
        return text
    if not (text.isdigit() and int(text) >= 1):
        raise PipelineConfigError(f"--projections {value} must be a positive integer or auto")
    return int(text)


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
    """Train as ``cfg`` says; returns the report (the README lists the JSON fields).

    ``progress`` is an optional callable ``(done_steps, total_steps, info_dict)`` that the
    CLI turns into a progress bar. With ``cfg.checkpoint`` the run saves every
    ``cfg.checkpoint_every`` steps and at the end; ``cfg.resume`` continues from the latest
    checkpoint there; ``cfg.max_restarts`` restarts the pipeline from the last checkpoint
    when a stage fails (a killed process, an exception), up to that many times.
    """
    torch.manual_seed(cfg.seed)
    train, test = _load(cfg)
    model_kwargs = _model_kwargs(cfg, train.shape, train.num_classes)
    if cfg.single_process:
        report = _train_forward_gradient(cfg, train, test, model_kwargs, progress)
        report["config"] = asdict(cfg)
        report["model_kwargs"] = model_kwargs
        return report
    run = _Run(cfg, train, model_kwargs, progress)
    restarts = 0
    while True:
        pipe = run.start_pipeline()
        try:
            with pipe:
                run.train(pipe)
                report = run.report(pipe, test)
            break
        except StageFailedError as err:
            if restarts >= cfg.max_restarts or not cfg.checkpoint:
                where = f"; last checkpoint: {run.last_saved}" if run.last_saved else ""
                raise StageFailedError(err.worker, err.stages, err.cause + where) from err
            restarts += 1
            run.restarts.append({"step": run.done, "error": str(err)})
    report["config"] = asdict(cfg)
    report["model_kwargs"] = model_kwargs
    report["restarts"] = run.restarts
    return report


class _Run:
    """The state of one training job that survives pipeline restarts."""

    def __init__(self, cfg: TrainConfig, train, model_kwargs: dict, progress) -> None:
        self.cfg = cfg
        self.model_kwargs = model_kwargs
        self.progress = progress
        self.loader = Batches(train, cfg.batch_size, shuffle=True, seed=cfg.seed)
        self.total = cfg.steps if cfg.steps is not None else len(self.loader) * cfg.epochs
        self.sample = train.x[: cfg.batch_size]
        self.done = 0
        self.train_s = 0.0
        self.epoch_losses: dict[int, list[float]] = {}
        self.last_saved: str | None = None
        self.restarts: list[dict] = []
        self.resume = cfg.resume

    def start_pipeline(self) -> Pipeline:
        """A fresh pipeline, restored from the latest checkpoint when resuming/restarting."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, **self.model_kwargs)
        pipe = Pipeline(
            model, stages=cfg.balance or cfg.stages, schedule=cfg.schedule, method=cfg.method,
            microbatches=cfg.microbatches, virtual=cfg.virtual,
            optimizer=_optimizer_factory(cfg), loss_fn=nn.CrossEntropyLoss(),
            backend=cfg.backend, balance_by=cfg.balance_by, address=cfg.address,
            cpus_per_stage=cfg.cpus_per_stage, gpus_per_stage=cfg.gpus_per_stage,
            placement=cfg.placement, placement_timeout_s=cfg.placement_timeout,
            sample=self.sample, schedule_options=cfg.schedule_options, **_stage_options(cfg),
        )
        if cfg.checkpoint and (self.resume or self.restarts):
            try:
                self._restore(pipe)
            except BaseException:
                pipe.shutdown()
                raise
            if self.restarts:  # the step it went on from (0: no checkpoint yet), so a report
                self.restarts[-1]["resumed_from"] = self.done  # tells the two apart
        return pipe

    def identity(self, pipe: Pipeline) -> dict[str, Any]:
        return {**pipe.identity(), "model": self.cfg.model, "model_kwargs": self.model_kwargs,
                "optimizer": self.cfg.optimizer, "batch_size": self.cfg.batch_size,
                "seed": self.cfg.seed, "data": self.cfg.data}

    def _restore(self, pipe: Pipeline) -> None:
        """Load the latest checkpoint (none yet: start from the beginning)."""
        root = Path(self.cfg.checkpoint)
        if latest_checkpoint(root) is None:
            if self.resume and not self.restarts:
                raise CheckpointError(f"--resume: no checkpoint under {str(root)!r} yet; run "
                                      "without --resume to start")
            self.done, self.train_s, self.epoch_losses = 0, 0.0, {}
            self.loader.load_state_dict({"epoch": 0, "index": 0})
            return
        ckpt = load_checkpoint(root, identity=_jsonable(self.identity(pipe)))
        pipe.load_checkpoint_state(ckpt.stages, step=ckpt.step)
        d = ckpt.driver
        self.loader.load_state_dict(d["loader"])
        self.done, self.train_s = ckpt.step, float(d["train_s"])
        self.epoch_losses = {int(k): list(v) for k, v in d["epoch_losses"].items()}
        torch.set_rng_state(d["rng"])
        self.last_saved = str(ckpt.path)

    def save(self, pipe: Pipeline) -> None:
        driver = {"loader": self.loader.state_dict(), "train_s": self.train_s,
                  "epoch_losses": {str(k): v for k, v in self.epoch_losses.items()},
                  "rng": torch.get_rng_state()}
        ckpt = Checkpoint(self.done, _jsonable(self.identity(pipe)), pipe.checkpoint_state(),
                          driver)  # checkpoint_state is collective under torchrun: all ranks
        if is_rank0():
            self.last_saved = str(save_checkpoint(self.cfg.checkpoint, ckpt))
        self.last_saved = broadcast_object(self.last_saved)

    def train(self, pipe: Pipeline) -> None:
        """Pipelined runs of ``window`` steps until the step budget is spent."""
        window = window_steps(self.cfg, pipe)
        every = self.cfg.checkpoint_every
        while self.done < self.total:
            chunk = self._next_batches(min(window, self.total - self.done))
            t0 = time.perf_counter()
            outs = pipe.run([(x, y) for _, x, y in chunk])
            self.train_s += time.perf_counter() - t0
            for (epoch, _, _), out in zip(chunk, outs):
                _check_finite(out["loss"], self.done, pipe)
                self.epoch_losses.setdefault(epoch, []).append(out["loss"])
                self.done += 1
            if self.cfg.checkpoint and (self.done == self.total or
                                        (every and self.done // every > (self.done - len(outs)) // every)):
                self.save(pipe)
            if self.progress:
                self.progress(self.done, self.total,
                              {"epoch": chunk[-1][0] + 1, "loss": outs[-1]["loss"]})

    def _next_batches(self, n: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """The next ``n`` batches big enough to split, with the epoch each belongs to."""
        out = []
        while len(out) < n:
            epoch = self.loader.epoch
            for x, y in self.loader:
                if x.shape[0] >= self.cfg.microbatches:  # too small to split: skipped
                    out.append((epoch, x, y))
                if len(out) == n:
                    break
        return out

    def report(self, pipe: Pipeline, test) -> dict[str, Any]:
        losses = [sum(v) / len(v) for _, v in sorted(self.epoch_losses.items()) if v]
        samples = pipe.timeline().samples
        report = {
            "train_loss": losses,
            "steps": self.done,
            "wall_s": self.train_s,
            "samples_per_s": samples / self.train_s if self.train_s > 0 else 0.0,
            "final_test_accuracy": pipeline_accuracy(pipe, test),
            "checkpoint": self.last_saved,
        }
        report.update(_timeline_figures(pipe))
        report["state_dict"] = pipe.state_dict()
        return report


def _train_forward_gradient(cfg, train, test, model_kwargs, progress) -> dict[str, Any]:
    """Single-process forward-gradient training (no backward pass): the baseline that the
    data-parallel ``brigade fwdgrad`` and the pipelined form are compared with (the rule's
    ``single_process`` trainer)."""
    from brigade.stages.fwdgrad import ForwardGradient

    model = build_model(cfg.model, **model_kwargs)
    fg = ForwardGradient(model, nn.CrossEntropyLoss(), guess=cfg.guess,
                         projections=cfg.projections, seed=cfg.seed)
    opt = _optimizer_factory(cfg)(model.parameters())
    loader = Batches(train, cfg.batch_size, shuffle=True, seed=cfg.seed)
    total = cfg.steps if cfg.steps is not None else len(loader) * cfg.epochs
    done, samples, train_s, epoch_losses = 0, 0, 0.0, {}
    while done < total:
        epoch = loader.epoch
        for x, y in loader:
            t0 = time.perf_counter()
            loss = float(fg.step(x, y, opt)["loss"])
            train_s += time.perf_counter() - t0
            _check_finite(loss, done, None)
            epoch_losses.setdefault(epoch, []).append(loss)
            done += 1
            samples += len(y)  # an epoch's last batch may be short
            if progress:
                progress(done, total, {"epoch": epoch + 1, "loss": loss})
            if done == total:
                break
    from brigade.stages.trainer import evaluate

    return {
        "train_loss": [sum(v) / len(v) for _, v in sorted(epoch_losses.items())],
        "steps": done, "wall_s": train_s,
        "samples_per_s": samples / train_s if train_s else 0.0,
        "final_test_accuracy": evaluate(model, test.x, test.y),
        "bubble_fraction": 0.0, "balance": [len(model)], "timeline": None,
        "stages": [{"worker": 0, "stages": [0], "busy_s": train_s, "idle_fraction": 0.0,
                    "peak_stored_activation_bytes": 0}],
        "state_dict": model.state_dict(), "restarts": [], "checkpoint": None,
    }


def _jsonable(obj: Any) -> Any:
    """Tuples become lists, so an identity compares equal after a JSON round trip."""
    return json.loads(json.dumps(obj))


def window_steps(cfg: TrainConfig, pipe: Pipeline) -> int:
    """Steps per pipelined run: decoupled schedules fill and drain once per run, so they
    get long runs (32 steps); flush schedules lose nothing by running step by step."""
    if cfg.window is not None:
        return cfg.window
    return 32 if pipe.decoupled else 1


def _check_finite(loss: float, step: int, pipe: Pipeline | None) -> None:
    if not math.isfinite(loss):
        last = len(pipe.balance) - 1 if pipe is not None else 0
        raise PipelineConfigError(
            f"loss became {loss} at step {step + 1} (computed on stage {last}, the last); "
            "lower --lr, or check the data"
        )


def pipeline_accuracy(pipe: Pipeline, test, batch_size: int = 500) -> float:
    """Top-1 accuracy on a data set, forward-only through the pipeline, in chunks."""
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
