"""The training job behind ``brigade train``: data, model, pipeline, epochs, report.

It builds the model for the data set it is given (MNIST into a revnet works), trains it with
a :class:`Pipeline` for the requested epochs or steps with a progress bar, evaluates test
accuracy through the pipeline, and returns the figures the README lists for ``--json``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from brigade.stages.data import Batches, load_dataset
from brigade.stages.models import build_model, shape_kwargs

from .checkpoint import Checkpoint, CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from brigade.stages.rules import flag_key, get_method, methods_taking, option_classes

from .config import PipelineConfig
from .errors import PipelineConfigError, StageFailedError, as_config_error
from .flags import flat_dict, flat_init
from .optim import (OPTIMIZERS, OptimConfig, OptimizerFactory, default_lr, default_optimizer,
                    make_optimizer)
from .phases import PhaseLog, process_age_s
from .pipeline import Pipeline
from .simulated import simulated_figures
from .torchrun_backend import broadcast_object, is_rank0

__all__ = ["TrainConfig", "run_training", "make_optimizer", "default_optimizer", "default_lr",
           "OPTIMIZERS", "pipeline_accuracy", "validate"]

DATASETS = ("synthetic", "mnist", "cifar10", "digits")


def _help(text: str, **more) -> dict:
    return {"help": text, **more}


@flat_init
@dataclass
class TrainConfig:
    """One training job; every leaf is a ``brigade train`` flag and a config-file key.

    Nested: ``pipeline`` (a :class:`PipelineConfig`, with its ``cluster``), ``optim`` (an
    :class:`OptimConfig`), ``options`` (the method's own options by key, e.g.
    ``{"sg_lr": 1e-3}``; checked against the rule's options class). Keys of the nested
    configs are keywords here too: ``TrainConfig(method="dni", lr=0.1)``.
    """

    model: str = field(default="mlp", metadata=_help("built-in model (see `brigade models`)"))
    width: int | None = field(default=None, metadata=_help(
        "base width (channels / units)", default_help="the model's own"))
    data: str = field(default="synthetic", metadata=_help(
        "synthetic | mnist | cifar10 | digits"))
    data_dir: str | None = field(default=None, metadata=_help(
        "folder holding the data set's files", metavar="DIR"))
    synthetic_size: int = field(default=2048, metadata=_help(
        "training samples of --data synthetic (test: an eighth, at least 256)"))
    batch_size: int = field(default=64, metadata=_help("samples per step"))
    epochs: int = field(default=1, metadata=_help("passes over the training set"))
    steps: int | None = field(default=None, metadata=_help(
        "stop after this many steps", default_help="--epochs worth"))
    seed: int = field(default=0, metadata=_help("seed of weights, data order and methods"))
    window: int | None = field(default=None, metadata=_help(
        "steps per pipelined run (one driver round trip each)",
        default_help="runs of about 1 s (from the last run's time a step) for schedules "
                     "that flush every step; 64 for those that do not (dni, petra, dgl)"))
    checkpoint: str | None = field(default=None, metadata=_help(
        "save checkpoints in DIR (atomically; at the end and every N steps)", metavar="DIR"))
    checkpoint_every: int | None = field(default=None, metadata=_help(
        "steps between checkpoints", metavar="N", default_help="only at the end"))
    resume: bool = field(default=False, metadata=_help(
        "continue from the latest checkpoint in --checkpoint DIR"))
    max_restarts: int = field(default=0, metadata=_help(
        "when a stage fails, restart from the last checkpoint up to K times", metavar="K"))
    eval_every_epoch: bool = field(default=True, metadata=_help(
        "evaluate test accuracy and loss after every epoch (else only at the end)"))
    tensorboard: str | None = field(default=None, metadata=_help(
        "write TensorBoard scalars (train loss, test accuracy, samples/s, idle per stage, "
        "probes) to DIR; needs the tensorboard package", metavar="DIR", default_help="off"))
    probe_every: int | None = field(default=None, metadata=_help(
        "every N steps, measure the rule's gradients against the true ones, off the clock "
        "(`brigade methods` lists the probed rules: dni/cdni cosine and norm error, petra "
        "reconstruction error, staleness)", metavar="N", default_help="off"))
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    options: dict = field(default_factory=dict, metadata={
        "keys_from": option_classes, "key_owners": methods_taking})

    def __post_init__(self) -> None:
        """Every check of a training job, once, before any data, process or bar."""
        for name in ("batch_size", "epochs", "synthetic_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PipelineConfigError(f"--{name.replace('_', '-')} {value} must be >= 1")
        for name in ("steps", "window", "checkpoint_every", "probe_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise PipelineConfigError(f"--{name.replace('_', '-')} {value} must be >= 1")
        if self.max_restarts < 0:
            raise PipelineConfigError(f"--max-restarts {self.max_restarts} must be >= 0")
        if (self.resume or self.max_restarts or self.checkpoint_every) and not self.checkpoint:
            raise PipelineConfigError(
                "--resume, --max-restarts and --checkpoint-every need --checkpoint DIR")
        pipe, optim = self.pipeline, self.optim
        rule = get_method(pipe.method)  # PipelineConfig checked the method and schedule
        if self.probe_every is not None and rule.probe is None:
            from brigade.stages.probes import probed_methods

            raise PipelineConfigError(
                f"--probe-every measures {', '.join(probed_methods())}; method {rule.name!r} "
                "has no approximate gradient to compare (or computes the true one itself): "
                "drop --probe-every")
        self.rule_options = self._rule_options(rule)
        if optim.optimizer is None:
            optim.optimizer = rule.default_optimizer[0]
        if optim.lr_schedule is None:
            optim.lr_schedule = rule.default_lr_schedule
        if optim.lr is None:  # by the optimizer chosen: Adam named with no --lr gets 1e-3
            optim.lr = default_lr(rule, optim.optimizer)  # None: the optimizer's own (fwdgrad)
        if rule.optimizers is not None and optim.optimizer not in rule.optimizers:
            raise PipelineConfigError(
                f"--optimizer {optim.optimizer} is not a {rule.optimizer_kind or rule.name} "
                f"optimizer; valid for {rule.name}: {', '.join(rule.optimizers)}")
        if self.batch_size < pipe.microbatches:
            raise PipelineConfigError(
                f"--batch-size {self.batch_size} is smaller than --microbatches "
                f"{pipe.microbatches}; each microbatch needs at least one sample"
            )
        if rule.check_training is not None:
            as_config_error(rule.check_training, self)
        pipe.options = _non_default(self.rule_options)  # the rest are the rule's defaults
        # the rule's schedule options (stale's k) on the config too, so that a resume's
        # identity check (preflight) compares what the pipeline will run
        pipe.schedule_options = rule.schedule_options(self.rule_options)

    def _rule_options(self, rule):
        """The rule's options object from ``options`` (flag keys) and the settings it takes
        from the job (``config_fields``: the seed), checked once; a key of another rule is
        refused, naming the rules it belongs to."""
        given = {k.replace("-", "_"): v for k, v in self.options.items()}
        by_key = {flag_key(f): f.name for f in fields(rule.options) if flag_key(f)}
        stray = [k for k in given if k not in by_key]
        if stray:
            flags = ", ".join("--" + k.replace("_", "-") for k in stray)
            verb = "applies" if len(stray) == 1 else "apply"
            owners = methods_taking(stray[0])
            raise PipelineConfigError(
                f"{flags} {verb} to --method {' or '.join(owners) or '(none)'}, not "
                f"{rule.name!r}")
        kwargs = {f: getattr(self, f) for f in rule.config_fields}
        kwargs.update({by_key[k]: v for k, v in given.items()})
        obj = as_config_error(rule.make_options, **kwargs)
        self.options = {k: getattr(obj, name) for k, name in by_key.items()}  # resolved
        return obj


def _non_default(options) -> dict[str, Any]:
    """An options object's fields that differ from its class's defaults (one spelling of a
    configuration however it was given: flags, a file, or keywords)."""
    out = {}
    for f in fields(options):
        value = getattr(options, f.name)
        if f.default is not dataclasses.MISSING and value == f.default:
            continue
        if f.default_factory is not dataclasses.MISSING and value == f.default_factory():
            continue
        out[f.name] = value
    return out


def validate(cfg: TrainConfig) -> TrainConfig:
    """The one place a job is checked before any side effect (cluster, bar, file): the
    config's own checks ran when it was built; what needs the outside world (the data
    folder, the model's shape, an installed tensorboard) is checked here, cheaply."""
    from brigade.stages.models import model_config

    model_config(cfg.model, **({} if cfg.width is None else {"width": cfg.width}))
    if cfg.tensorboard:
        from .tensorboard import check_available

        check_available()
    return cfg


def _optimizer_factory(cfg: TrainConfig, total_steps: int):
    """The stages' optimizer: built by the rule where it says how (fwdgrad's come from
    ``fg_optim``, with its measured defaults), else by :class:`OptimizerFactory`, whose
    schedule runs at the rule's updates per step."""
    optim = cfg.optim
    rule = get_method(cfg.pipeline.method)
    if rule.optimizer_factory is not None:
        return rule.optimizer_factory(optim.optimizer, optim.lr, cfg, total_steps)
    per_step = rule.updates_per_step(cfg.rule_options, cfg.pipeline.microbatches)
    return OptimizerFactory(optim, total_steps, per_step)


def _model_kwargs(cfg: TrainConfig, shape, num_classes) -> dict:
    kwargs = shape_kwargs(shape, num_classes)
    if cfg.width is not None:
        kwargs["width"] = cfg.width
    return kwargs


def _load(cfg: TrainConfig):
    """Train and test splits of the data set (synthetic data is made, never downloaded)."""
    from .preflight import take_checked_data

    if (checked := take_checked_data(cfg)) is not None:  # preflight read it already
        return checked
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


def run_training(cfg: TrainConfig, progress=None, log=None, announce=None,
                 phases=None) -> dict[str, Any]:
    """Train as ``cfg`` says; returns the report (the README lists the JSON fields).

    ``progress`` is an optional callable ``(done_steps, total_steps, info_dict)`` that the
    CLI turns into a progress bar; ``log`` an optional callable taking one line of text
    (the evaluation line of each epoch). With ``cfg.checkpoint`` the run saves every
    ``cfg.checkpoint_every`` steps and at the end; ``cfg.resume`` continues from the latest
    checkpoint there; ``cfg.max_restarts`` restarts the pipeline from the last checkpoint
    when a stage fails (a killed process, an exception), up to that many times.
    ``announce(partition)``, if given, gets the pipeline's cut (``Pipeline.partition``,
    with the per-stage costs it was balanced by) before training starts. ``phases`` (a
    :class:`~brigade.engine.phases.PhaseLog`, or a callable that hears each
    :class:`~brigade.engine.phases.Phase`) records the timed start-up, checkpoint,
    evaluation and shut-down phases as they end (the CLI prints a line for each).
    """
    from .preflight import has_checked_data

    validate(cfg)
    phases = phases if isinstance(phases, PhaseLog) else PhaseLog(phases)
    torch.manual_seed(cfg.seed)
    preloaded = has_checked_data(cfg)  # read by the preflight check: its line said so
    t0 = time.perf_counter()
    train, test = _load(cfg)
    if not preloaded:
        phases.record("data", time.perf_counter() - t0, data_text(cfg, train, test))
    model_kwargs = _model_kwargs(cfg, train.shape, train.num_classes)
    log = log or (lambda line: None)
    run = _Run(cfg, train, test, model_kwargs, progress, log, phases)
    restarts = 0
    while True:
        pipe = run.start_pipeline()
        if announce is not None and not restarts:
            announce(pipe.partition)
        try:
            try:
                run.train(pipe)
                report = run.report(pipe)
            finally:
                with phases.timed("stopped", _stopped_text(pipe)):
                    pipe.shutdown()
            break
        except StageFailedError as err:
            if restarts >= cfg.max_restarts or not cfg.checkpoint:
                where = f"; last checkpoint: {run.last_saved}" if run.last_saved else ""
                raise StageFailedError(err.worker, err.stages, err.cause + where) from err
            restarts += 1
            run.restarts.append({"step": run.done, "error": str(err)})
    report["config"] = flat_dict(cfg)
    report["model_kwargs"] = model_kwargs
    report["restarts"] = run.restarts
    report["restore_s"] = phases.seconds("restored")
    report["resumed_from"] = run.resumed_from
    report["train_s_total"] = run.train_s
    run.close(report)
    _time_figures(report, phases)
    return report


def data_text(cfg: TrainConfig, train, test) -> str:
    """``loaded mnist: 60,000 train / 10,000 test samples (1x28x28, 10 classes)``."""
    shape = "x".join(map(str, train.shape))
    return (f"loaded {cfg.data}: {len(train):,} train / {len(test):,} test samples "
            f"({shape}, {train.num_classes} classes)")


def _stopped_text(pipe: Pipeline) -> str:
    """What shutting the pipeline down stops: its workers, and the Ray cluster where the
    pipeline started it (a joined cluster is only left: it goes on running)."""
    workers = pipe.config.num_workers
    if pipe.config.backend != "ray":
        return f"stopped {workers} worker{'s' if workers > 1 else ''}"
    text = f"stopped {workers} stage actor{'s' if workers > 1 else ''}"
    if pipe._owns_ray:
        text += " and the Ray cluster" if pipe.started_ray else ", left the Ray cluster"
    return text


def _time_figures(report: dict[str, Any], phases: PhaseLog) -> None:
    """Where the time went: the phases, the first step's end since the command began, and
    everything outside the training steps (imports, start-up, restore, evaluation, stop)."""
    report["phases"] = phases.to_list()
    first = [p.at_s for p in phases.phases if p.name == "first step"]
    report["first_step_at_s"] = first[0] if first else None
    report["command_s"] = process_age_s()
    report["outside_training_s"] = max(0.0, report["command_s"] - report["wall_s"])

def epoch_line(rec: dict[str, Any]) -> str:
    """One epoch's evaluation as the CLI prints it."""
    tail = "" if rec["complete"] else " (part of the epoch)"
    return (f"epoch {rec['epoch']}: {rec['steps']} steps  train loss {rec['train_loss']:.4f}"
            f"  test loss {rec['test_loss']:.4f}  test accuracy {rec['test_accuracy']:.4f}"
            f"{tail}")


class _Run:
    """The state of one training job that survives pipeline restarts."""

    def __init__(self, cfg: TrainConfig, train, test, model_kwargs: dict, progress,
                 log, phases: PhaseLog | None = None) -> None:
        self.cfg = cfg
        self.test = test
        self.phases = phases if phases is not None else PhaseLog()
        self.model_kwargs = model_kwargs
        self.progress = progress
        self.log = log
        self.loader = Batches(train, cfg.batch_size, shuffle=True, seed=cfg.seed)
        self.total = cfg.steps if cfg.steps is not None else len(self.loader) * cfg.epochs
        self.sample = train.x[: cfg.batch_size]
        self.done = 0
        self.train_s = 0.0  # all training seconds, from before a resume too (checkpointed)
        self.run_train_s = 0.0  # this pipeline's training seconds: what its timeline covers
        self.longest_run = 0  # the most steps one pipelined run took (the report's window)
        self.resumed_from: str | None = None  # the checkpoint the first pipeline went on from
        self.epoch_losses: dict[int, list[float]] = {}
        self.epochs: list[dict[str, Any]] = []  # one evaluation per finished epoch
        self.last_saved: str | None = None
        self.restarts: list[dict] = []
        self.resume = cfg.resume
        self.balance: list[int] | None = None  # the cut of the first pipeline (see start_pipeline)
        from .tensorboard import open_writer

        self.writer = open_writer(cfg.tensorboard, "") if is_rank0() else None
        self.probes = None
        if cfg.probe_every:
            from .probes import Prober

            self.probes = Prober(cfg.method, cfg.probe_every, self.writer,
                                 functools.partial(build_model, cfg.model, **model_kwargs))

    def start_pipeline(self) -> Pipeline:
        """A fresh pipeline, restored from the latest checkpoint when resuming/restarting."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, **self.model_kwargs)
        pipeline = cfg.pipeline
        measured = None if cfg.balance else self._measured_balance()
        if measured is not None:  # the job's first cut, not a new measurement
            pipeline = dataclasses.replace(pipeline, balance=measured)
        pipe = Pipeline(model, config=pipeline, optimizer=_optimizer_factory(cfg, self.total),
                        loss_fn=nn.CrossEntropyLoss(), sample=self.sample, phases=self.phases)
        self.balance = list(pipe.balance)
        self.run_train_s = 0.0
        if cfg.checkpoint and (self.resume or self.restarts):
            try:
                t0 = time.perf_counter()
                self._restore(pipe)
                if self.last_saved:
                    self.phases.record("restored", time.perf_counter() - t0,
                                       f"resumed from {self.last_saved}", label="restore",
                                       path=self.last_saved, step=self.done)
                    if self.resumed_from is None and not self.restarts:
                        self.resumed_from = self.last_saved
            except BaseException:
                pipe.shutdown()
                raise
            if self.restarts:  # the step it went on from (0: no checkpoint yet), so a report
                self.restarts[-1]["resumed_from"] = self.done  # tells the two apart
        return pipe

    def _measured_balance(self) -> list[int] | None:
        """A measured cut is kept for the whole job: a restart reuses the first pipeline's,
        a resume the checkpoint's (a new profile on a busy machine may cut elsewhere, and
        the checkpoint's weights fit only its own cut)."""
        if self.balance is not None:
            return self.balance
        if self.cfg.checkpoint and self.resume:
            from .checkpoint import read_manifest

            path = latest_checkpoint(Path(self.cfg.checkpoint))
            if path is not None:
                saved = list(read_manifest(path)["identity"]["balance"])
                if len(saved) == self.cfg.pipeline.num_model_stages:  # else: identity says
                    return saved
        return None

    def identity(self, pipe: Pipeline) -> dict[str, Any]:
        return {**pipe.identity(), "model": self.cfg.model, "model_kwargs": self.model_kwargs,
                "optimizer": self.cfg.optim.optimizer, "batch_size": self.cfg.batch_size,
                "seed": self.cfg.seed, "data": self.cfg.data}

    def _restore(self, pipe: Pipeline) -> None:
        """Load the latest checkpoint (none yet: start from the beginning)."""
        root = Path(self.cfg.checkpoint)
        if latest_checkpoint(root) is None:
            if self.resume and not self.restarts:
                raise CheckpointError(f"--resume: no checkpoint under {str(root)!r} yet; run "
                                      "without --resume to start")
            self.done, self.train_s, self.epoch_losses, self.epochs = 0, 0.0, {}, []
            self.loader.load_state_dict({"epoch": 0, "index": 0})
            return
        ckpt = load_checkpoint(root, identity=_jsonable(self.identity(pipe)))
        pipe.load_checkpoint_state(ckpt.stages, step=ckpt.step)
        d = ckpt.driver
        self.loader.load_state_dict(d["loader"])
        self.done, self.train_s = ckpt.step, float(d["train_s"])
        self.epoch_losses = {int(k): list(v) for k, v in d["epoch_losses"].items()}
        self.epochs = list(d.get("epochs", []))
        torch.set_rng_state(d["rng"])
        self.last_saved = str(ckpt.path)

    def save(self, pipe: Pipeline) -> None:
        driver = {"loader": self.loader.state_dict(), "train_s": self.train_s,
                  "epoch_losses": {str(k): v for k, v in self.epoch_losses.items()},
                  "epochs": self.epochs, "rng": torch.get_rng_state()}
        t0 = time.perf_counter()
        ckpt = Checkpoint(self.done, _jsonable(self.identity(pipe)), pipe.checkpoint_state(),
                          driver)  # checkpoint_state is collective under torchrun: all ranks
        if is_rank0():
            self.last_saved = str(save_checkpoint(self.cfg.checkpoint, ckpt))
        self.last_saved = broadcast_object(self.last_saved)
        self.phases.record("checkpoint", time.perf_counter() - t0,
                           f"checkpoint written {self.last_saved}",
                           path=self.last_saved, step=self.done)

    def train(self, pipe: Pipeline) -> None:
        """Pipelined runs of ``window`` steps (never across an epoch's end, nor past a
        checkpoint step, so both land where they are asked) until the step budget is
        spent; an evaluation after every epoch. A flush schedule's first run is one step:
        its line tells the user the pipeline works, and when (the same weights as one run:
        a flush schedule's steps do not overlap); its second is drawn before a step is
        timed (``window_steps``' untimed length). A decoupled schedule keeps its windows
        whole: where its runs are cut changes what it computes. Where nothing happens on
        the driver between two runs (no evaluation, checkpoint or probe), the next run's
        batches are drawn before this one starts and ship while it trains (``then``), the
        first run included."""
        first = None if pipe.decoupled else 1  # None: the window, as every later run
        step_s = None
        ahead = None  # (the next run's batches, whether they end an epoch), drawn already
        while self.done < self.total:
            chunk, ends_epoch = ahead or self._draw(self._run_length(
                pipe, self.done, step_s, None if self.run_train_s else first))
            ahead = None
            if self._may_draw_ahead(chunk, ends_epoch):
                ahead = self._draw(self._run_length(pipe, self.done + len(chunk), step_s))
            t0 = time.perf_counter()
            outs = pipe.run([(x, y) for _, x, y in chunk],
                            then=[(x, y) for _, x, y in ahead[0]] if ahead else None)
            spent = time.perf_counter() - t0
            if self.run_train_s == 0.0:
                self.phases.record("first step", spent,
                                   f"first step done (step {self.done + 1} of {self.total}, "
                                   f"loss {outs[0]['loss']:.4f})")
            self.train_s += spent
            self.run_train_s += spent
            step_s = spent / len(outs)
            self.longest_run = max(self.longest_run, len(outs))
            if self.writer is not None:
                self.writer.scalar("train_loss", outs[-1]["loss"], self.done + len(outs), self.train_s)
                self.writer.scalar("samples_per_s", sum(len(y) for _, _, y in chunk) / spent,
                                   self.done + len(outs), self.train_s)
            if self.probes is not None and self.probes.due(self.done + len(outs)):
                self.probes.probe(pipe, chunk[-1][1], chunk[-1][2], self.done + len(outs),
                                  self.cfg.microbatches)
            for (epoch, _, _), out in zip(chunk, outs):
                _check_finite(out["loss"], self.done, pipe)
                self.epoch_losses.setdefault(epoch, []).append(out["loss"])
                self.done += 1
            epoch = chunk[-1][0]
            if ends_epoch and self.cfg.eval_every_epoch:
                self._evaluate(pipe, epoch, complete=True)
            if ((self.cfg.checkpoint and self.done == self.total)
                    or self._saves_between(self.done - len(outs), self.done)):
                self.save(pipe)
            if self.progress:
                self.progress(self.done, self.total, {"epoch": epoch + 1, "loss": outs[-1]["loss"]})

    def _run_length(self, pipe: Pipeline, done: int, step_s: float | None,
                    first: int | None = None) -> int:
        """Steps in the run that starts after ``done`` steps: a window (the first run:
        ``first``), cut at the budget's end, the next checkpoint step and the next probe."""
        n = window_steps(self.cfg, pipe, step_s) if first is None else first
        n = min(n, self.total - done)
        every = self.cfg.checkpoint_every
        if self.cfg.checkpoint and every:
            n = min(n, every - done % every)
        if self.probes is not None:  # a probed step ends its window: weights as they were
            n = min(n, self.probes.steps_to_next(done))
        return n

    def _draw(self, n: int) -> tuple[list, bool]:
        """The next ``n`` batches (:meth:`_next_batches`) and whether their epoch ends with
        them (known now: the loader may have moved on by the time they train)."""
        chunk = self._next_batches(n)
        return chunk, self.loader.epoch > chunk[-1][0]

    def _may_draw_ahead(self, chunk: list, ends_epoch: bool) -> bool:
        """Whether the batches after ``chunk`` can be drawn before it trains: no step
        budget's end, evaluation (an epoch ends with it), checkpoint (it saves the
        loader's position) or probe between the two runs."""
        after = self.done + len(chunk)
        if after >= self.total:
            return False
        if ends_epoch and self.cfg.eval_every_epoch:
            return False
        if self._saves_between(self.done, after):
            return False
        return self.probes is None or not self.probes.due(after)

    def _saves_between(self, before: int, after: int) -> bool:
        """Whether a ``--checkpoint-every`` step lies in (before, after]."""
        every = self.cfg.checkpoint_every
        return bool(self.cfg.checkpoint and every and after // every > before // every)

    def _evaluate(self, pipe: Pipeline, epoch: int, complete: bool) -> dict[str, Any]:
        """Test loss and accuracy now, as the record of ``epoch`` (logged)."""
        losses = self.epoch_losses.get(epoch, [])
        with self.phases.timed("evaluated", f"evaluated {len(self.test):,} test samples "
                                            "through the pipeline"):
            figures = pipeline_evaluate(pipe, self.test)
        rec = {"epoch": epoch + 1, "steps": self.done, "complete": complete,
               "train_loss": sum(losses) / len(losses) if losses else float("nan"),
               **figures}
        self.epochs.append(rec)
        self.log(epoch_line(rec))
        if self.writer is not None:
            for key in ("test_accuracy", "test_loss"):
                self.writer.scalar(key, rec[key], self.done, self.train_s)
        return rec

    def _next_batches(self, n: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """The next ``n`` batches big enough to split, with the epoch each belongs to; fewer
        where the epoch ends first (so that its evaluation comes right after it)."""
        out: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        while len(out) < n:
            epoch = self.loader.epoch
            for x, y in self.loader:
                if x.shape[0] >= self.cfg.microbatches:  # too small to split: skipped
                    out.append((epoch, x, y))
                if len(out) == n:
                    break
            if out and self.loader.epoch > epoch:
                break
        return out

    def report(self, pipe: Pipeline) -> dict[str, Any]:
        losses = [sum(v) / len(v) for _, v in sorted(self.epoch_losses.items()) if v]
        samples = pipe.timeline().samples
        last = self.epochs[-1] if self.epochs else None
        if last is None or last["steps"] != self.done:  # the last epoch is not evaluated yet
            epoch = max(self.epoch_losses) if self.epoch_losses else 0
            last = self._evaluate(pipe, epoch, complete=self.loader.position == (epoch + 1, 0))
        report = {
            "train_loss": losses,
            "steps": self.done,
            # this pipeline's steps only: not a restore, nor the steps before a resume
            # (``train_s_total`` counts those), so samples/s is what training ran at
            "wall_s": self.run_train_s,
            "samples_per_s": samples / self.run_train_s if self.run_train_s > 0 else 0.0,
            "final_test_accuracy": last["test_accuracy"],
            "final_test_loss": last["test_loss"],
            "epochs": list(self.epochs),
            "checkpoint": self.last_saved,
        }
        report.update(_timeline_figures(pipe))
        report["microbatches"] = self.cfg.microbatches
        report["batch_size"] = self.cfg.batch_size
        report["window"] = self.longest_run
        report["simulated"] = (simulated_figures(report["timeline"])
                               if report["stages"] and len(report["stages"]) > 1 else None)
        report["state_dict"] = pipe.state_dict()
        report["partition"] = _partition_figures(pipe)
        if self.probes is not None:
            report["probes"] = self.probes.figures()
            report["timeline"].meta["probes"] = {**report["probes"],
                                                 "heatmap": self.probes.heatmap_lists()}
        return report

    def close(self, report: dict[str, Any]) -> None:
        """The run's last TensorBoard scalars (idle per stage), the probe picture, and close
        (test accuracy went in at each evaluation)."""
        if self.writer is None:
            return
        for row in report.get("stages", []):
            self.writer.scalar(f"idle_fraction/stage{row['worker']}", row["idle_fraction"],
                               self.done, self.train_s)
        if self.probes is not None:
            self.probes.write_figures(self.done)
        self.writer.close()


def _partition_figures(pipe: Pipeline) -> dict[str, Any] | None:
    """The cut and what it was balanced by: per-stage cost of one microbatch under the
    method (None where the balance was given or not measured)."""
    part = getattr(pipe, "partition", None)
    if part is None:
        return None
    return {"by": part.by, "method": part.method, "balance": list(part.balance),
            "cost_s": [r.cost_s for r in part.rows]}


def _jsonable(obj: Any) -> Any:
    """Tuples become lists, so an identity compares equal after a JSON round trip."""
    return json.loads(json.dumps(obj))


RUN_S = 1.0  # a flush schedule's default run: about this many seconds of training
MAX_AUTO_WINDOW = 1024  # and at most this many steps
DECOUPLED_WINDOW = 64  # a decoupled schedule's run: a fixed count, so its cuts reproduce


def window_steps(cfg: TrainConfig, pipe: Pipeline, step_s: float | None = None) -> int:
    """Steps in the next pipelined run. Decoupled schedules fill and drain once per run and
    what they compute depends on where runs are cut, so their runs are a fixed
    ``DECOUPLED_WINDOW`` steps: 64, where 32 left PETRA's idler stage (RevNet-18 width 16,
    MNIST, 2 Ray stages, 1 epoch) idle 5.5-5.8% of its run, 3.9-6.5% (median 5.3%) at 64:
    fill, drain and a driver round trip per run; the same accuracy, +7% samples/s.
    Flush schedules give the same weights in one run of many steps as step by step and
    lose a driver round trip (7-22 ms: results, events; the next run's data ships while
    this one trains, ``Pipeline.run(then=...)``, where nothing happens between them) per run, so
    their runs last about ``RUN_S`` at ``step_s`` seconds a step (the last run's), capped
    at 1,024 steps; 16 before a step has been timed. Measured, the README's main job (2
    Ray stages, 1F1B, m=4, batch 64, 110 steps, quiet 2 cores): measured bubble 0.435 in
    runs of 16 steps against 0.338 simulated, 0.397 against 0.349 in runs of 109."""
    if cfg.window is not None:
        return cfg.window
    if pipe.decoupled:
        return DECOUPLED_WINDOW
    if step_s is None or step_s <= 0:
        return 16
    return max(1, min(MAX_AUTO_WINDOW, int(RUN_S / step_s)))



def _check_finite(loss: float, step: int, pipe: Pipeline | None) -> None:
    if not math.isfinite(loss):
        last = len(pipe.balance) - 1 if pipe is not None else 0
        raise PipelineConfigError(
            f"loss became {loss} at step {step + 1} (computed on stage {last}, the last); "
            "lower --lr, or check the data"
        )


def pipeline_accuracy(pipe: Pipeline, test, batch_size: int = 500) -> float:
    """Top-1 accuracy on a data set, forward-only through the pipeline, in chunks."""
    return pipeline_evaluate(pipe, test, batch_size)["test_accuracy"]


def pipeline_evaluate(pipe: Pipeline, test, batch_size: int = 500) -> dict[str, float]:
    """Test accuracy and mean cross-entropy loss, forward-only through the pipeline."""
    return _evaluate(pipe.predict, test, batch_size)


@torch.no_grad()
def model_evaluate(model: nn.Module, test, batch_size: int = 500) -> dict[str, float]:
    """The same figures for a model in this process (eval mode, then back to train)."""
    model.eval()
    try:
        return _evaluate(model, test, batch_size)
    finally:
        model.train()


def _evaluate(forward, test, batch_size: int) -> dict[str, float]:
    correct, loss_sum = 0, 0.0
    for i in range(0, len(test), batch_size):
        x, y = test.x[i : i + batch_size], test.y[i : i + batch_size]
        logits = forward(x).float()
        correct += int((logits.argmax(1) == y).sum())
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
    n = max(1, len(test))
    return {"test_accuracy": correct / n, "test_loss": loss_sum / n}


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
    return {"bubble_fraction": tl.bubble_fraction if tl.num_workers > 1 else None,
            "bubble_note": bubble_note(pipe.config.backend, tl.num_workers),
            "stages": stages, "timeline": tl, "balance": pipe.balance, "pid": os.getpid()}


def bubble_note(backend: str, workers: int) -> str | None:
    """What the bubble figure means where it is not a pipeline's (None where it is)."""
    if workers == 1:
        return "one worker: nothing runs beside it, so there is no bubble"
    if backend == "local":
        return ("local backend: the stages take turns in one thread, so each one's idle "
                "time is the others' compute, not a pipeline bubble (no measured bubble; "
                "bubble_fraction in --json is that idle share); the simulated figures are "
                "what parallel workers would do with these costs")
    return None
