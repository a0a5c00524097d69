"""What a worker process needs to build its stages: shipped once, at start."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from brigade.stages.rules import MethodSpec
from brigade.stages.stage import StageSpec

from .worker import Send, Worker

__all__ = ["WorkerSpec", "build_worker"]


@dataclass
class WorkerSpec:
    """The stages one worker holds, with the pieces each stage is built from.

    ``rule`` is the learning rule's declaration itself, not its name: a worker in another
    process then builds a rule it never imported (a user's own, registered on the driver;
    the Ray backend ships a user module's code by value)."""

    index: int
    modules: dict[int, nn.Module]  # global stage index -> its blocks (names = block indices)
    worker_of: list[int]  # global stage index -> worker index
    rule: MethodSpec
    optimizer_factory: Callable | None
    loss_fn: nn.Module | None
    options: dict[str, Any]  # keyword options of the rule's stage class (stage_kwargs)
    labels_to: frozenset[int] = field(default_factory=frozenset)  # earlier stages shown labels
    device: str = "cpu"
    num_threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    autocast: str | None = None  # run forward actions under torch.autocast ("bf16")

    @property
    def method(self) -> str:
        return self.rule.name


def build_worker(spec: WorkerSpec, send: Send | None) -> Worker:
    """Construct the stages of ``spec`` on its device and wrap them in a Worker whose
    handler table is the rule's."""
    if spec.num_threads > 0:
        torch.set_num_threads(spec.num_threads)
    num_stages = len(spec.worker_of)
    stages = {}
    for s, module in sorted(spec.modules.items()):
        last = s == num_stages - 1
        stages[s] = spec.rule.stage_class(
            module,
            StageSpec(index=s, num_stages=num_stages),
            spec.optimizer_factory,
            spec.loss_fn if last else None,
            spec.device,
            **spec.options,
        )
    return Worker(spec.index, stages, spec.worker_of, send=send,
                  handlers=dict(spec.rule.handlers), labels_to=spec.labels_to,
                  autocast=spec.autocast)
