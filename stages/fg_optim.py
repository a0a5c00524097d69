"""Optimizers for noisy gradient estimates (forward gradients).

A forward-gradient estimate ``g = d·v`` is unbiased but its noise dwarfs the signal: with a
random guess over ``P`` parameters and ``n`` projections, ``E|g|² ≈ (P/n)|∇L|²`` while
``E[g] = ∇L``. The optimizers here are the usual rules, written so that they take such an
estimate either as the parameters' ``.grad`` (``step()``) or as an explicit list of tensors
(``step(grads=[...])``), with the step-size adjustments these estimates need:

``clip_norm``
    Clip the estimate to this global L2 norm before the rule sees it. One unlucky direction
    with a large ``|d|`` otherwise throws the weights far off; clipping bounds every step.
``decay`` (``constant`` | ``inverse`` | ``sqrt`` | ``cosine``) and ``warmup``
    Noise does not average out under a constant step: the iterate keeps bouncing in a ball
    whose radius grows with ``lr × noise``. Decaying the rate (``inverse``:
    ``lr/(1+t/decay_steps)``, Robbins-Monro; ``sqrt``: ``lr/sqrt(1+t/decay_steps)``;
    ``cosine`` to zero over ``total_steps``) shrinks the ball. ``warmup`` ramps the rate up
    linearly over the first steps, while the moment estimates are still poor.
``weight_decay``
    Decoupled (``p ← p(1 − lr·wd)``). Random directions also push the weights along
    directions the loss does not care about; the weights then random-walk and grow. Weight
    decay pulls them back.
averaging over projections
    Done by the estimator (``projections=n`` averages ``n`` estimates), so the learning rate
    here always refers to one averaged estimate: the variance falls as ``1/n`` and the rate
    that works grows roughly with ``n`` for plain SGD.

The rules (``kind``):

``sgd``       ``p ← p − lr·g``. For a random guess the stable rate is roughly the backprop
              rate times ``n/P_eff`` (``P_eff`` the effective dimension: the trace of the
              Hessian over its top eigenvalue), so much smaller.
``momentum``  heavy ball: ``b ← μb + g``, ``p ← p − lr·b``. Averages the noise of the last
              ``1/(1−μ)`` estimates; the effective rate is ``lr/(1−μ)``.
``nesterov``  ``b ← μb + g``, ``p ← p − lr·(g + μb)``.
``adam``      ``m ← β1 m + (1−β1)g``, ``s ← β2 s + (1−β2)g²``, ``p ← p − lr·m̂/(√ŝ + ε)``.
              Scale-free: the step is about ``lr`` per coordinate whatever the noise level,
              so the same rate works for random and local guesses; with a random guess the
              sign of ``m̂`` is mostly noise and progress is slow.
``rmsprop``   ``s ← α s + (1−α)g²``, ``p ← p − lr·g/(√s + ε)``.

``DEFAULTS`` holds the rates measured on the MNIST MLP (table below, and
``bench/fwdgrad_mnist.py``); ``make_optimizer(kind, params, guess=...)`` starts from them.
For a random guess use ``adam`` or ``rmsprop``; for the local guess any rule works.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

from .errors import ConfigError, choose

__all__ = ["OPTIMIZERS", "DECAYS", "DEFAULTS", "FGOptimizer", "make_optimizer", "clip_by_norm"]

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "rmsprop")
DECAYS = ("constant", "inverse", "sqrt", "cosine")

# Measured defaults: MNIST MLP (784-1024-1024-10), 7,000 training images, batch 64, test
# accuracy after 3 epochs (one-off sweeps with the bench's setup, not kept: the bench runs
# adam, and sgd for global-scope fg-baydin, only; bench/fwdgrad_mnist.py gives the 10-epoch
# adam figures):
#
#   rule       random guess (block scope, projections 1,1,256)   local guess
#   sgd        5e-4   -> 0.305 (1e-3 with global scope diverged)   0.05 -> 0.918
#   momentum   1e-4   -> 0.551                                     0.01 -> 0.934
#   nesterov   1e-4   -> 0.572                                     0.01 -> 0.935
#   adam       1e-3   -> 0.819 (0.870 after 10 epochs)             1e-3 -> 0.924 (0.974 after 10, cosine)
#   rmsprop    1e-3   -> 0.842                                     1e-3 -> 0.873
#
# With a random guess the normalised rules (adam, rmsprop) win by far: the estimate's scale
# differs by orders of magnitude between blocks (its noise grows with the block's size), and
# they give every coordinate a step of about ``lr`` regardless. The plain rules need a rate
# small enough for the noisiest block, which starves the others. With the local guess every
# rule works; momentum/nesterov are best at 3 epochs.
DEFAULTS: dict[str, dict[str, dict]] = {
    "random": {
        "sgd": {"lr": 5e-4},
        "momentum": {"lr": 1e-4, "momentum": 0.9},
        "nesterov": {"lr": 1e-4, "momentum": 0.9},
        "adam": {"lr": 1e-3},
        "rmsprop": {"lr": 1e-3},
    },
    "local": {
        "sgd": {"lr": 0.05},
        "momentum": {"lr": 0.01, "momentum": 0.9},
        "nesterov": {"lr": 0.01, "momentum": 0.9},
        "adam": {"lr": 1e-3},
        "rmsprop": {"lr": 1e-3},
    },
}


@torch.no_grad()
def clip_by_norm(grads: Sequence[torch.Tensor], max_norm: float) -> float:
    """Scale ``grads`` in place to global L2 norm at most ``max_norm``; returns the old norm."""
    total = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
    if total > max_norm > 0:
        s = max_norm / total
        for g in grads:
            g.mul_(s)
    return total


class FGOptimizer(torch.optim.Optimizer):
    """SGD / momentum / Nesterov / Adam / RMSprop for forward-gradient estimates.

    ``step(grads=None)``: ``grads`` is a list matching the parameters (all groups, in
    order); without it each parameter's ``.grad`` is used (parameters with no ``.grad`` are
    skipped). Deterministic: the same estimates on the same parameters give bit-identical
    updates in every process that runs with the same thread count.
    """

    def __init__(
        self,
        params: Iterable,
        kind: str = "sgd",
        lr: float = 1e-3,
        *,
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        clip_norm: float | None = None,
        decay: str = "constant",
        decay_steps: int = 1000,
        total_steps: int | None = None,
        warmup: int = 0,
    ) -> None:
        kind = choose("optimizer", kind, OPTIMIZERS)
        decay = choose("learning-rate decay", decay, DECAYS)
        if not lr > 0:
            raise ConfigError(f"learning rate must be positive; got {lr}")
        if clip_norm is not None and not clip_norm > 0:
            raise ConfigError(f"clip_norm must be positive or None; got {clip_norm}")
        if decay == "cosine" and not total_steps:
            raise ConfigError("decay='cosine' needs total_steps (the number of optimizer steps)")
        if decay_steps <= 0:
            raise ConfigError(f"decay_steps must be positive; got {decay_steps}")
        defaults = dict(lr=lr, momentum=momentum, betas=betas, alpha=alpha, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.kind, self.clip_norm, self.decay = kind, clip_norm, decay
        self.decay_steps, self.total_steps, self.warmup = int(decay_steps), total_steps, int(warmup)
        self.t = 0
        self.last_norm: float | None = None

    def lr_factor(self, t: int | None = None) -> float:
        """The multiplier of the base rate at step ``t`` (warmup times decay)."""
        t = self.t if t is None else t
        f = 1.0
        if self.warmup and t < self.warmup:
            f = (t + 1) / self.warmup
        if self.decay == "inverse":
            f /= 1.0 + t / self.decay_steps
        elif self.decay == "sqrt":
            f /= math.sqrt(1.0 + t / self.decay_steps)
        elif self.decay == "cosine":
            f *= 0.5 * (1.0 + math.cos(math.pi * min(t, self.total_steps) / self.total_steps))
        return f

    def state_dict(self):
        sd = super().state_dict()
        sd["fg"] = {"t": self.t}
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        fg = state_dict.pop("fg", {"t": 0})
        super().load_state_dict(state_dict)
        self.t = int(fg["t"])

    @torch.no_grad()
    def step(self, closure=None, grads: Sequence[torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for g in self.param_groups for p in g["params"]]
        if grads is not None:
            grads = list(grads)
            if len(grads) != len(params):
                raise ConfigError(f"step got {len(grads)} gradients for {len(params)} parameters")
        else:
            grads = [p.grad for p in params]
        # the update rules only read the gradients; clipping scales them in place, so only
        # then are they copied (the caller's tensors and .grad stay as they were)
        copy = self.clip_norm is not None
        gs = [None if g is None else (g.detach().clone() if copy else g.detach()) for g in grads]
        if self.clip_norm is not None:
            self.last_norm = clip_by_norm([g for g in gs if g is not None], self.clip_norm)
        factor = self.lr_factor()
        i = 0
        for group in self.param_groups:
            lr = group["lr"] * factor
            for p in group["params"]:
                g = gs[i]
                i += 1
                if g is None:
                    continue
                self._update(p, g.to(p.dtype), group, lr)
        self.t += 1
        return loss

    def _update(self, p: torch.Tensor, g: torch.Tensor, group: dict, lr: float) -> None:
        wd = group["weight_decay"]
        if wd:
            p.mul_(1.0 - lr * wd)
        kind = self.kind
        if kind == "sgd":
            p.add_(g, alpha=-lr)
            return
        state = self.state[p]
        if kind in ("momentum", "nesterov"):
            mu = group["momentum"]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = g.clone()
            else:
                buf.mul_(mu).add_(g)
            p.add_(g.add(buf, alpha=mu) if kind == "nesterov" else buf, alpha=-lr)
        elif kind == "adam":
            b1, b2 = group["betas"]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            k = state["step"]
            m, s = state["exp_avg"], state["exp_avg_sq"]
            m.mul_(b1).add_(g, alpha=1 - b1)
            s.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (s / (1 - b2**k)).sqrt_().add_(group["eps"])
            p.addcdiv_(m, denom, value=-lr / (1 - b1**k))
        elif kind == "rmsprop":
            a = group["alpha"]
            if not state:
                state["square_avg"] = torch.zeros_like(p)
            s = state["square_avg"]
            s.mul_(a).addcmul_(g, g, value=1 - a)
            p.addcdiv_(g, s.sqrt().add_(group["eps"]), value=-lr)


def make_optimizer(
    kind: str,
    params: Iterable,
    lr: float | None = None,
    *,
    guess: str = "random",
    **kwargs,
) -> FGOptimizer:
    """An ``FGOptimizer`` of ``kind`` starting from the measured ``DEFAULTS[guess][kind]``.

    Explicit ``lr`` and keyword arguments override the defaults.
    """
    kind = choose("optimizer", kind, OPTIMIZERS)
    guess = choose("guess", guess, tuple(DEFAULTS))
    cfg = dict(DEFAULTS[guess][kind])
    cfg.update({k: v for k, v in kwargs.items()})
    if lr is not None:
        cfg["lr"] = lr
    return FGOptimizer(params, kind, **cfg)
