"""DGL stages: decoupled greedy learning, every stage trained by its own auxiliary head.

Decoupled greedy learning (Belilovsky, Eickenberg, Oyallon, ICML 2020, arXiv 1901.08164):
each stage s < p-1 ends in a small auxiliary classifier (``make_head``: for a feature map
average pooling to 2x2 and a linear layer, for features a linear layer, the paper's CNN and
MLP heads, the same heads the local-guess forward gradient uses) and trains its blocks and
its head on that head's loss alone; the last stage trains on the real loss. A stage's input
is detached: no gradient ever crosses a stage boundary, so activations travel forward only
and nothing travels backward. One action, ``F`` of the ``dgl`` schedule, does for
microbatch ``mb``::

    h = module(x.detach())                         (with autograd)
    loss = CE(head(h), label) * weight             (last stage: loss_fn(h, target) * weight)
    loss.backward()                                -> the stage's and the head's gradients
    send h.detach() on

and ``U`` steps the stage's optimizer and the head's (the same factory builds both). With
``weight`` = the microbatch's share n_j / N, a step's accumulated gradients are those of the
batch mean, so a pipelined run equals, to float rounding, one process training the stages
one after another on whole batches (tested). Every stage sees the labels (its head's
targets); only the first sees the inputs; no stage receives a gradient from another.

The head is created at the first forward (its input shape is known only then) from a seed
of its own, so creating it does not disturb the global random stream;
``state_dict_extra`` / ``load_state_dict_extra`` carry it and its optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import handlers
from .base import OptimizerFactory, StageBase
from .errors import ConfigError
from .heads import make_head
from .method_cost import DGL_COST
from .rules import (CostHooks, Exposure, Message, MethodSpec, activation_size, batch_size,
                    num_classes_of, register_method)

__all__ = ["DGLStage", "DGLOptions"]


class DGLStage(StageBase):
    """A slice of the model trained greedily on its own auxiliary head's loss."""

    def __init__(
        self,
        module: nn.Module,
        spec: Any,
        optimizer_factory: OptimizerFactory | None = None,
        loss_fn: nn.Module | None = None,
        device: torch.device | str = "cpu",
        *,
        num_classes: int,
        pool: int = 2,
        seed: int = 0,
    ) -> None:
        self._setup(module, spec, optimizer_factory, loss_fn, device)
        if not (isinstance(num_classes, int) and num_classes > 0):
            raise ConfigError(f"DGL needs num_classes, a positive integer; got {num_classes!r}")
        self.num_classes, self.pool, self.seed = num_classes, int(pool), int(seed)
        self._factory = optimizer_factory
        self.head_loss = nn.CrossEntropyLoss()
        self.head: nn.Module | None = None
        self.head_optimizer: torch.optim.Optimizer | None = None
        self._head_shape: tuple[int, ...] | None = None
        self._local_losses: list[float] = []

    def _build_head(self, shape: tuple[int, ...]) -> None:
        """The auxiliary head for outputs of ``shape`` (no batch), from this stage's seed."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + self.spec.index + 1)
            self.head = make_head(shape, self.num_classes, self.pool).to(self.device)
        self._head_shape = tuple(shape)
        self.head_optimizer = self._factory(self.head.parameters()) if self._factory else None

    def forward(self, mb: int, x: torch.Tensor, target: torch.Tensor | None = None,
                weight: float = 1.0, label: torch.Tensor | None = None) -> torch.Tensor:
        """Forward, the local (last stage: the real) loss times ``weight``, its backward.

        Returns the detached output to send on (last stage: the scaled loss, 0-d)."""
        x = x.to(self.device).detach()
        with torch.enable_grad():
            h = self.module(x)
            if self.spec.is_last:
                if target is None:
                    raise ConfigError(f"stage {self.spec.index}: last stage forward needs a target")
                loss = self.loss_fn(h, target.to(self.device)) * weight
                loss.backward()
                self._losses.append(float(loss.detach()))
                return loss.detach()
            if label is None:
                raise ConfigError(f"stage {self.spec.index}: a DGL stage trains on its head's "
                                  "loss and needs the microbatch's labels (label=...)")
            if self.head is None:
                self._build_head(tuple(h.shape[1:]))
            local = self.head_loss(self.head(h), label.to(self.device)) * weight
            local.backward()
        self._local_losses.append(float(local.detach()))
        return h.detach()

    def update(self) -> None:
        """One step of the stage's optimizer and of its head's."""
        for opt in (self.optimizer, self.head_optimizer):
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)

    def pop_local_losses(self) -> list[float]:
        """The auxiliary heads' (weighted) losses since the previous call."""
        out, self._local_losses = self._local_losses, []
        return out

    def state_dict_extra(self) -> dict[str, Any]:
        """The head and its optimizer (None before the first forward / on the last stage)."""
        if self.head is None:
            return {"head_shape": None, "head": None, "head_optimizer": None}
        return {"head_shape": self._head_shape, "head": self.head.state_dict(),
                "head_optimizer": None if self.head_optimizer is None
                else self.head_optimizer.state_dict()}

    def load_state_dict_extra(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict_extra`` returned (building the head if needed)."""
        if state.get("head") is None:
            return
        if self.head is None:
            self._build_head(tuple(state["head_shape"]))
        self.head.load_state_dict(state["head"])
        if state["head_optimizer"] is not None and self.head_optimizer is not None:
            self.head_optimizer.load_state_dict(state["head_optimizer"])


# -- the declaration of dgl (brigade.stages.rules) ---------------------------------------------
@dataclass(frozen=True)
class DGLOptions:
    """dgl's options (``Pipeline(method="dgl", pool=2)``), checked once on the driver."""

    pool: int = field(default=2, metadata={
        "help": "the heads' average pooling of feature maps, pool x pool (default 2)"})
    seed: int = field(default=0, metadata={"help": "seed of the heads' initialisation"})
    num_classes: int | None = field(default=None, metadata={
        "help": "classes of the heads (default: the model's last Linear width)"})

    def __post_init__(self) -> None:
        if isinstance(self.pool, bool) or not isinstance(self.pool, int) or self.pool < 1:
            raise ConfigError(f"dgl pool={self.pool!r} must be a positive integer (2: the paper's)")
        if self.num_classes is not None and not (
                isinstance(self.num_classes, int) and self.num_classes > 0):
            raise ConfigError(f"dgl num_classes={self.num_classes!r} must be a positive integer")


def _prepare(options: DGLOptions, model: nn.Module, schedule: Any) -> dict[str, Any]:
    """The heads' class count, read off the model unless given."""
    n = options.num_classes or num_classes_of(model, "dgl")
    return {"num_classes": n, "pool": options.pool, "seed": options.seed}


def _run_f(port: handlers.Port, a) -> None:
    """F: train on the local loss, send the detached output on (evaluation: ``infer``)."""
    if not port.training:
        handlers.evaluate(port, a)
        return
    s, j = a.stage, a.microbatch
    x = port.take(("x", s, j))
    if s == port.num_stages - 1:
        target, weight = port.take(("y", j))
        port.loss(j, float(port.stage(s).forward(j, x, target, weight)))
        return
    label, weight = handlers.take_label(port, s, j)
    port.send(a, ("x", s + 1, j), port.stage(s).forward(j, x, None, weight, label=label))


def _exposure(stage: int, stages: int, options: Any) -> Exposure:
    """Every stage sees the labels (its head's targets); no gradient crosses a boundary."""
    return Exposure(inputs=stage == 0, labels=True, true_gradients=False)


register_method(MethodSpec(
    name="dgl", order=60, stage_class=DGLStage, schedules=("dgl",),
    handlers={"F": handlers.Handler(_run_f, handlers.forward.needs), "U": handlers.update},
    options=DGLOptions, prepare=_prepare, default_optimizer=("momentum", 0.05),
    forward=(Message("activation h (detached)", "B·F", activation_size),
             Message("labels (driver -> every stage)", "B", batch_size)),
    backward=(), exposure=_exposure,
    costs=CostHooks(balancer=DGL_COST),  # each stage but the last also trains its head
    summary="decoupled greedy learning: each stage trains on its own auxiliary head; "
            "nothing travels backward",
    reference="Belilovsky, Eickenberg, Oyallon, ICML 2020 (arXiv 1901.08164)"))
