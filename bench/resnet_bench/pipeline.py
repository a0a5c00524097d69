"""brigade's Pipeline of a split, built and warmed up as the measured runs use it (on Ray by
this process, on torchrun by every rank)."""

from __future__ import annotations

import torch
from torch import nn

from brigade import schedulers

from .config import BenchConfig, LR, _METHOD

__all__ = ["_brigade_pipeline", "_brigade_warmup"]


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


def _brigade_warmup(cfg: BenchConfig, pipe, batch, schedule: str) -> float:
    """Warm-up steps (not timed); returns the first step's loss."""
    if schedule in schedulers.DECOUPLED:
        return pipe.run([batch] * max(cfg.warmup, cfg.window))[0]["loss"]
    losses = [pipe.step(*batch)["loss"] for _ in range(max(1, cfg.warmup))]
    return losses[0]
