"""The stale-gradient baseline: backprop every k-th step, reuse that gradient in between.

The synthetic-gradients blog (seed 002) compares DNI with this: both backpropagate at the
same rate, once every k steps, but here the steps in between simply apply the last real
gradient again, at the current weights. The ``stale`` schedule runs, per step t::

    t % k == 0:  F (storing activations) for every microbatch, B for every one, U
    otherwise:   F (forward only: the loss, nothing stored) for every microbatch, U

``StaleStage`` is the backprop ``Stage`` with two changes:

- ``update()``: if a backward ran since the previous update, remember the accumulated
  gradients and step with them; if none ran, put the remembered gradients back and step
  again (nothing happens before the first backward).
- ``forward_only(mb, x, target, weight)``: no graph, nothing stored; the last stage still
  records the (scaled) loss. When the stage is built with ``k`` and ``microbatches``,
  ``forward`` itself calls ``forward_only`` on the in-between steps (step ``mb //
  microbatches`` not a multiple of ``k``), so an executor can send every ``F`` to ``forward``.

With SGD, step t+1 moves the weights by exactly ``-lr * g_t``. With a stateful optimizer
(momentum, Adam) the reused gradient still goes through the optimizer's state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import handlers
from .errors import ConfigError
from .method_cost import BACKPROP_COST
from .probes import SCHEDULE_STALENESS_PROBE
from .rules import CostHooks, Message, MethodSpec, activation_size, register_method
from .stage import Stage

__all__ = ["StaleStage", "StaleOptions"]


@dataclass
class StaleStage(Stage):
    """Backprop every k-th step; ``update`` reuses the last gradient on the steps between."""

    k: int | None = None  # with ``microbatches``: forward() skips storing on in-between steps
    microbatches: int | None = None
    _grads: list[torch.Tensor | None] | None = field(default=None, init=False, repr=False)
    _fresh: bool = field(default=False, init=False, repr=False)
    stale_updates: int = field(default=0, init=False)  # updates that reused an old gradient

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("k", "microbatches"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"StaleStage option {name} must be a positive integer; got {value!r}")
        if (self.k is None) != (self.microbatches is None):
            raise ConfigError("StaleStage: give both k and microbatches (to route forwards by step), or neither")

    # -- forward --------------------------------------------------------------------------
    def is_backprop_step(self, mb: int) -> bool:
        """Whether microbatch ``mb`` belongs to a backprop step (True when k is not set)."""
        if self.k is None:
            return True
        return (mb // self.microbatches) % self.k == 0

    def forward(
        self,
        mb: int,
        x: torch.Tensor,
        target: torch.Tensor | None = None,
        weight: float = 1.0,
        label: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``Stage.forward`` on backprop steps, ``forward_only`` on the steps between."""
        if self.is_backprop_step(mb):
            return super().forward(mb, x, target, weight)
        return self.forward_only(mb, x, target, weight)

    @torch.no_grad()
    def forward_only(
        self,
        mb: int,
        x: torch.Tensor,
        target: torch.Tensor | None = None,
        weight: float = 1.0,
    ) -> torch.Tensor:
        """Forward without a graph, storing nothing; the last stage records and returns the
        scaled loss, the others return the detached output."""
        out = self.module(x.to(self.device))
        if self.spec.is_last:
            if target is None:
                raise ConfigError(f"stage {self.spec.index}: last stage forward needs a target")
            out = self.loss_fn(out, target.to(self.device)) * weight
            self._losses.append(float(out))
        return out.detach()

    # -- backward: note that a fresh gradient is on its way ------------------------------
    def backward(self, mb: int, grad_out: torch.Tensor | None = None) -> torch.Tensor | None:
        self._fresh = True
        return super().backward(mb, grad_out)

    def backward_weight(self, mb: int) -> None:
        self._fresh = True
        super().backward_weight(mb)

    # -- update ---------------------------------------------------------------------------
    def update(self) -> None:
        """Step with the fresh gradient (and remember it), or with the remembered one."""
        if self.optimizer is None:
            self._fresh = False
            return
        params = [p for p in self.module.parameters() if p.requires_grad]
        if self._fresh:
            self._grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
        elif self._grads is not None:
            for p, g in zip(params, self._grads):
                p.grad = None if g is None else g.clone()
            self.stale_updates += 1
        else:
            return  # no gradient yet: nothing to apply
        self._fresh = False
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict_extra(self) -> dict:
        """The remembered gradient: a run stopped between two backprop steps resumes by
        reusing it (without it the steps up to the next backprop step applied nothing)."""
        return {"grads": None if self._grads is None else
                [None if g is None else g.detach().cpu() for g in self._grads],
                "stale_updates": self.stale_updates}

    def load_state_dict_extra(self, state: dict) -> None:
        """Restore what :meth:`state_dict_extra` returned."""
        grads = state.get("grads")
        self._grads = None if grads is None else [
            None if g is None else g.to(self.device) for g in grads]
        self.stale_updates = int(state.get("stale_updates", 0))


# -- the declaration of stale (brigade.stages.rules) -------------------------------------------
@dataclass(frozen=True)
class StaleOptions:
    """stale's option: its schedule's period."""

    k: int | None = field(default=None, metadata={
        "flag": "--stale-k", "schedule": True, "default_help": "4",
        "help": "one backprop step every k steps"})

    def __post_init__(self) -> None:
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int)
                                   or self.k < 1):
            raise ConfigError(f"stale k={self.k!r} must be a positive integer (--stale-k 4)")


register_method(MethodSpec(
    name="stale", order=10, stage_class=StaleStage, schedules=("stale",),
    handlers=handlers.BACKPROP_HANDLERS, options=StaleOptions,
    default_optimizer=("momentum", 0.05),
    costs=CostHooks(balancer=BACKPROP_COST),  # timed as backprop, balanced by it by default
    probe=SCHEDULE_STALENESS_PROBE,
    forward=(Message("activation h", "B·F", activation_size),),
    backward=(Message("gradient dL/dh, on every k-th step only", "B·F", activation_size),),
    summary="backprop every k-th step; the steps between reuse that gradient",
    reference="the synthetic-gradients blog's baseline (Jaderberg et al. 2016)"))
