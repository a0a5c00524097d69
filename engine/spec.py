"""What a worker process needs to build its stages: shipped once, at start."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from brigade.stages.dni import DNIStage
from brigade.stages.fwdpipe import ForwardGradientStage
from brigade.stages.petra import PetraStage
from brigade.stages.stage import Stage, StageSpec
from brigade.stages.stale import StaleStage

from .worker import Send, Worker

__all__ = ["WorkerSpec", "build_worker", "STAGE_CLASSES"]

# Learning rule -> (stage class, fixed options). A new method adds an entry here and, if it
# needs new action kinds, handlers in the worker's dispatch table.
STAGE_CLASSES: dict[str, tuple[type, dict[str, Any]]] = {
    "backprop": (Stage, {}),
    "stale": (StaleStage, {}),
    "dni": (DNIStage, {"conditioned": False}),
    "cdni": (DNIStage, {"conditioned": True}),
    "petra": (PetraStage, {}),
    "fwdgrad": (ForwardGradientStage, {}),
}


@dataclass
class WorkerSpec:
    """The stages one worker holds, with the pieces each stage is built from."""

    index: int
    modules: dict[int, nn.Module]  # global stage index -> its blocks (names = block indices)
    worker_of: list[int]  # global stage index -> worker index
    method: str
    optimizer_factory: Callable | None
    loss_fn: nn.Module | None
    options: dict[str, Any]  # keyword options of the method's stage class
    device: str = "cpu"
    num_threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    autocast: str | None = None  # run forward actions under torch.autocast ("bf16")


def build_worker(spec: WorkerSpec, send: Send | None) -> Worker:
    """Construct the stages of ``spec`` on its device and wrap them in a Worker."""
    if spec.num_threads > 0:
        torch.set_num_threads(spec.num_threads)
    cls, fixed = STAGE_CLASSES[spec.method]
    options = {**spec.options, **fixed}
    num_stages = len(spec.worker_of)
    stages = {}
    for s, module in sorted(spec.modules.items()):
        last = s == num_stages - 1
        stages[s] = cls(
            module,
            StageSpec(index=s, num_stages=num_stages),
            spec.optimizer_factory,
            spec.loss_fn if last else None,
            spec.device,
            **options,
        )
    return Worker(spec.index, stages, spec.worker_of, send=send,
                  conditioned=bool(options.get("conditioned")),
                  forward_gradient=spec.method == "fwdgrad", autocast=spec.autocast)
