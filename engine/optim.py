"""The stages' optimizer: its kind, learning rate and schedule, weight decay, clipping.

One :class:`OptimConfig` (the ``brigade train`` flags ``--optimizer --lr --weight-decay
--lr-schedule --warmup-steps --lr-step-every --lr-gamma --clip-grad-norm``) becomes one
picklable :class:`OptimizerFactory` that every stage calls on its own parameters, on the
driver for the one-process run alike: the same schedule and decay act identically on
both (tested to 1e-5).

The schedule's clock is the optimizer's own step count, kept in each parameter group
(``"updates"``), so it is saved with the optimizer's ``state_dict`` (a checkpoint resumes
the schedule where it was) and restored by an in-place profile. Schedules are given in
training steps; rules that update several times per step (dni: once per microbatch) scale
them by their ``updates_per_step``.

Clipping (``--clip-grad-norm``) scales *each stage's own* gradient to that norm before
its update: in a pipeline of several stages it is not the global norm over the whole model
that one-process ``clip_grad_norm_`` takes (that needs every stage's norm before any
update; not built). One stage: the two agree.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Iterable

import torch

from .errors import PipelineConfigError
from .flags import check_choices

__all__ = ["OptimConfig", "OptimizerFactory", "OPTIMIZERS", "LR_SCHEDULES", "make_optimizer",
           "default_optimizer", "default_lr", "ADAPTIVE", "lr_factor"]

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop")
LR_SCHEDULES = ("constant", "cosine", "step")
ADAPTIVE = ("adam", "adamw", "rmsprop")  # step size set by the rate, not the gradient's scale
ADAPTIVE_LR = 1e-3  # Adam's usual rate

# name -> (torch class, fixed keywords)
_TABLE = {
    "sgd": (torch.optim.SGD, {}),
    "momentum": (torch.optim.SGD, {"momentum": 0.9}),
    "nesterov": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    "adam": (torch.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, {}),
    "rmsprop": (torch.optim.RMSprop, {}),
}


@dataclass
class OptimConfig:
    """What every stage's optimizer is; ``None`` fields take the method's default."""

    optimizer: str | None = field(default=None, metadata={
        "help": "sgd | momentum | nesterov | adam | adamw | rmsprop (momentum: SGD with "
                "momentum 0.9)",
        "default_help": "the method's own (`brigade methods`)"})
    lr: float | None = field(default=None, metadata={
        "help": "learning rate (the peak, with a schedule)",
        "default_help": "the method's own (`brigade methods`); 1e-3 for an adaptive "
                        "optimizer (adam, adamw, rmsprop) the method does not default to"})
    weight_decay: float | None = field(default=None, metadata={
        "help": "weight decay (L2 for sgd/momentum/adam/rmsprop, decoupled for adamw)",
        "default_help": "the optimizer's own: 0, adamw 0.01"})
    lr_schedule: str | None = field(default=None, metadata={
        "help": "learning-rate schedule over the run's steps", "choices": LR_SCHEDULES,
        "default_help": "the method's own (`brigade methods`)"})
    warmup_steps: int = field(default=0, metadata={
        "help": "steps of linear warm-up from lr/warmup to lr before the schedule"})
    lr_step_every: int | None = field(default=None, metadata={
        "help": "step schedule: multiply the lr by --lr-gamma every N steps",
        "metavar": "N", "default_help": "a third of the steps"})
    lr_gamma: float = field(default=0.1, metadata={
        "help": "step schedule: the factor applied every --lr-step-every steps"})
    clip_grad_norm: float | None = field(default=None, metadata={
        "help": "clip each stage's own gradient norm to this before its update (per "
                "stage, not the global norm across stages)", "default_help": "off"})

    def __post_init__(self) -> None:
        check_choices(self)
        if self.optimizer is not None:
            self.optimizer = self.optimizer.lower()
            if self.optimizer not in OPTIMIZERS:
                raise PipelineConfigError(f"unknown optimizer {self.optimizer!r}; valid "
                                          f"optimizers: {', '.join(OPTIMIZERS)}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise PipelineConfigError(f"--lr {self.lr} must be a positive number")
        if self.weight_decay is not None and not (self.weight_decay >= 0
                                                  and math.isfinite(self.weight_decay)):
            raise PipelineConfigError(f"--weight-decay {self.weight_decay} must be >= 0")
        if self.warmup_steps < 0:
            raise PipelineConfigError(f"--warmup-steps {self.warmup_steps} must be >= 0")
        if self.lr_step_every is not None and self.lr_step_every < 1:
            raise PipelineConfigError(f"--lr-step-every {self.lr_step_every} must be >= 1")
        if not 0 < self.lr_gamma <= 1:
            raise PipelineConfigError(f"--lr-gamma {self.lr_gamma} must be in (0, 1]")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise PipelineConfigError(
                f"--clip-grad-norm {self.clip_grad_norm} must be a positive number")


def default_optimizer(method: str) -> str:
    """The optimizer a method trains best with when the user names none: its declaration's
    (measured; ``brigade methods`` lists them). Backprop: SGD with momentum 0.9 (MNIST MLP,
    1 epoch: 94.3%; plain SGD 90.4% after 5). DNI and cDNI update once per microbatch from a
    biased synthetic gradient, and momentum piles that bias up: plain SGD reached 90.6% /
    90.6% after 1 epoch where momentum 0.9 reached 45.4% / 48.3% at the same lr
    (`bench/unlocked_mnist.py`). Forward gradients: Adam (stages/fg_optim.py)."""
    from brigade.stages.rules import get_method

    return get_method(method).default_optimizer[0]


def default_lr(method, optimizer: str) -> float | None:
    """The rate when none is given, by the optimizer that will use it: the rule's declared
    rate for its own optimizer (None: the optimizer's own, fwdgrad); 1e-3 for an adaptive
    optimizer it does not declare (Adam's usual rate: a rule's SGD rate, 0.05, would move
    every weight by about 0.05 a step under Adam); for an SGD-family optimizer, the rule's
    rate if it is an SGD rate, else 0.05."""
    from brigade.stages.rules import get_method

    name, lr = get_method(method).default_optimizer
    optimizer = optimizer.lower()
    if optimizer == name or lr is None:
        return lr
    if optimizer in ADAPTIVE:
        return ADAPTIVE_LR
    return 0.05 if name in ADAPTIVE else lr


def make_optimizer(name: str, lr: float, weight_decay: float | None = None):
    """A picklable factory ``params -> torch optimizer`` with a constant rate."""
    name = name.lower()
    if name not in _TABLE:
        raise PipelineConfigError(
            f"unknown optimizer {name!r}; valid optimizers: {', '.join(_TABLE)}")
    cls, kwargs = _TABLE[name]
    if weight_decay is not None:
        kwargs = {**kwargs, "weight_decay": weight_decay}
    return functools.partial(cls, lr=lr, **kwargs)


def lr_factor(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """The multiplier of the peak rate at training step ``step`` (0-based) of
    ``total_steps``: linear warm-up over ``warmup_steps``, then the schedule over the rest."""
    warm = cfg.warmup_steps
    if warm and step < warm:
        return (step + 1) / warm
    if cfg.lr_schedule == "cosine":
        span = max(1, total_steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warm, span) / span))
    if cfg.lr_schedule == "step":
        every = cfg.lr_step_every or max(1, total_steps // 3)
        return cfg.lr_gamma ** ((step - warm) // every)
    return 1.0


@dataclass
class OptimizerFactory:
    """``params -> optimizer`` shipped to every stage (picklable: a config and numbers).

    ``total_steps`` is the run's length in training steps; ``updates_per_step`` how many
    optimizer steps a stage takes per training step under the method.
    """

    config: OptimConfig
    total_steps: int
    updates_per_step: float = 1.0

    def __call__(self, params: Iterable) -> torch.optim.Optimizer:
        cfg = self.config
        opt = make_optimizer(cfg.optimizer, cfg.lr, cfg.weight_decay)(params)
        if cfg.lr_schedule in (None, "constant") and not cfg.warmup_steps and cfg.clip_grad_norm is None:
            return opt  # nothing to do per step
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
            group["updates"] = 0
        self._set_lr(opt)
        opt.register_step_pre_hook(self._before_step)
        opt.register_step_post_hook(self._after_step)
        return opt

    def _set_lr(self, opt: torch.optim.Optimizer) -> None:
        for group in opt.param_groups:
            step = int(group["updates"] // self.updates_per_step)
            group["lr"] = group["base_lr"] * lr_factor(self.config, step, self.total_steps)

    def _before_step(self, opt, args, kwargs) -> None:
        """Clip this stage's gradient and set the rate of the coming update."""
        if self.config.clip_grad_norm is not None:
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.config.clip_grad_norm)
        self._set_lr(opt)  # after a load_state_dict, too

    def _after_step(self, opt, args, kwargs) -> None:
        for group in opt.param_groups:
            group["updates"] += 1
