"""Every check of a training job that needs no cluster, run before any cluster starts or
progress bar is drawn; and the warnings where a rule cannot do what it is for.

Why: a bad value found after side effects costs the user a Ray start (``--resume`` on a
folder without a checkpoint used to start a cluster for 13 s before refusing) and leaves a
progress bar above the error. :func:`preflight` runs, in order, what each later step would
fail on: the data set, the model, the pipeline's configuration, the split, the schedule,
the checkpoint to resume from, and the cluster address (a TCP probe, a second at most);
each failure is the same one-line error the later step would have raised.

The data set it loads is handed to :func:`brigade.engine.train.run_training` (one load, not
two: MNIST takes seconds to read) through :func:`take_checked_data`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import PipelineConfigError

__all__ = ["preflight", "preflight_text", "rule_warnings", "take_checked_data",
           "has_checked_data"]

_CHECKED: dict[int, tuple] = {}  # id(cfg) -> (train, test), taken once by run_training


def take_checked_data(cfg) -> tuple | None:
    """The data sets :func:`preflight` loaded for this config (once; None otherwise)."""
    return _CHECKED.pop(id(cfg), None)


def has_checked_data(cfg) -> bool:
    """Whether :func:`preflight` holds the data sets of this config (read, not yet taken)."""
    return id(cfg) in _CHECKED


def preflight_text(cfg) -> str:
    """The start-up line of the check: what it read (the data set) and what it checked."""
    from .train import data_text

    data = _CHECKED.get(id(cfg))
    read = data_text(cfg, *data) if data is not None else f"{cfg.data} data made"
    checked = "model, split, schedule"
    if cfg.resume:
        checked += ", checkpoint to resume"
    return f"checked the job before starting anything: {read}; {checked}"


def preflight(cfg) -> list[str]:
    """Check ``cfg`` (a TrainConfig) without starting anything; returns warning lines.

    Raises the configuration error a later step would raise (exit status 2 on the command
    line), before any process, cluster or progress bar exists.
    """
    from brigade.stages.models import build_model

    from .train import _load, _model_kwargs

    train, test = _load(cfg)
    if cfg.data.lower() != "synthetic":
        _CHECKED.clear()
        _CHECKED[id(cfg)] = (train, test)
    model_kwargs = _model_kwargs(cfg, train.shape, train.num_classes)
    model = build_model(cfg.model, **model_kwargs)
    balance = _check_pipeline(cfg, model)
    if cfg.resume:
        _check_resume(cfg, model_kwargs, balance)
    if cfg.backend == "ray":
        address = cfg.address or os.environ.get("RAY_ADDRESS")
        if address:
            from .ray_cluster import probe_address

            probe_address(address)
    return rule_warnings(cfg.method, model, balance, cfg.model)


def _check_pipeline(cfg, model) -> list[int] | None:
    """The Pipeline's own checks, the split and the schedule; the balance (None where it
    is measured at start: ``--balance-by time`` or ``method``, the default of the rules
    that declare a balancer cost)."""
    from brigade import schedulers
    from brigade.stages.partition import partition

    pc = cfg.pipeline  # checked when the TrainConfig was built
    n = pc.num_model_stages
    if cfg.balance:
        if sum(cfg.balance) != len(model):
            raise PipelineConfigError(
                f"balance {cfg.balance} sums to {sum(cfg.balance)} but the model has "
                f"{len(model)} blocks")
        balance = list(cfg.balance)
    elif pc.balancer() in ("time", "method"):  # train always has a sample batch
        if n > len(model):
            raise PipelineConfigError(
                f"{n} stages for a model of {len(model)} blocks; use --stages {len(model)} "
                "or fewer")
        balance = None
    else:
        balance = partition(model, n, by=pc.balancer()).balance
    schedulers.build(pc.schedule, stages=pc.num_workers, microbatches=pc.microbatches,
                     virtual=pc.virtual, steps=1, **pc.schedule_options)
    return balance


def _check_resume(cfg, model_kwargs: dict, balance: list[int] | None) -> None:
    """``--resume``: a checkpoint must exist, be readable, and be of this run (the fields
    known without a pipeline; the stage files' checksums are verified when they load)."""
    from .checkpoint import CheckpointError, latest_checkpoint, read_manifest
    from .train import _jsonable

    root = Path(cfg.checkpoint)
    found = latest_checkpoint(root)
    if found is None:
        raise CheckpointError(f"--resume: no checkpoint under {str(root)!r} yet; run "
                              "without --resume to start")
    saved = read_manifest(found)["identity"]
    workers = len(cfg.balance) // cfg.virtual if cfg.balance else cfg.stages
    mine: dict[str, Any] = {
        "model": cfg.model, "model_kwargs": model_kwargs, "optimizer": cfg.optimizer,
        "batch_size": cfg.batch_size, "seed": cfg.seed, "data": cfg.data,
        "schedule": cfg.schedule, "method": cfg.method, "microbatches": cfg.microbatches,
        "virtual": cfg.virtual, "workers": workers,
        "schedule_options": dict(cfg.pipeline.schedule_options),
    }
    if balance is not None:
        mine["balance"] = list(balance)
    mine = _jsonable(mine)
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, this run {v!r}"
             for k, v in sorted(mine.items()) if k in saved and saved[k] != v]
    if diffs:
        raise CheckpointError(f"{found} is from another run ({'; '.join(diffs)}); resume "
                              "with the same model, split, schedule and method, or start fresh")


def rule_warnings(method: str, model, balance: list[int] | None, name: str = "the model"
                  ) -> list[str]:
    """One line per way the rule cannot do what it is for on this model and split.

    PETRA saves memory by rebuilding each reversible block's input from its output: with no
    reversible block every stage stores its inputs as backprop does; with every reversible
    block on one stage, the other stages store theirs.
    """
    if method.lower() != "petra":
        return []
    from brigade.stages.revnet import is_reversible

    flags = [is_reversible(b) for b in model]
    if not any(flags):
        return [f"--method petra: {name} has no reversible block, so every stage stores its "
                "inputs as under backprop and PETRA saves no memory; use a revnet model "
                "(revnet18, revnet34, revnet50)"]
    if balance is None or len(balance) < 2:
        return []
    starts = [sum(balance[:i]) for i in range(len(balance))]
    holding = [s for s, (a, b) in enumerate(zip(starts, balance)) if any(flags[a:a + b])]
    if len(holding) == 1:
        return [f"--method petra: the split {balance} puts all {sum(flags)} reversible "
                f"blocks of {name} on stage {holding[0]}, so the other stages store their "
                "inputs as under backprop; pass a --balance that gives every stage "
                "reversible blocks"]
    return []
