"""What each block costs under the learning rule that will run it: the method-aware balancer.

A backprop balance times every block's forward and backward. An unlocked rule does other
work, and not evenly over the model: a DNI stage also predicts a synthetic gradient for its
output and trains the synthesizer (work that lands on the stage BEFORE a boundary, and grows
with the activation there), and it steps its optimizer once per microbatch; PETRA runs the
forward without autograd and later rebuilds each reversible block's input (an extra forward)
before its backward; a forward-gradient stage carries tangents through the forward and runs
no backward at all. Split by backprop's times, the uniform MNIST MLP cut left DNI's stage 0
idle-free and stage 1 idle 67% of the time (issue 18).

``method_costs(method, model, sample)`` measures, on a copy of the model and one microbatch
(``sample``), per block the seconds the rule spends on it (``block_s``) and per possible cut
the seconds the rule adds to the stage that ENDS at that block (``boundary_s``: the
synthesizer's prediction and training for dni/cdni; 0 for rules without boundary work).
``balance_by_cost`` then finds the contiguous split that minimises the slowest stage's
``sum(block_s) + boundary_s[last block]`` (the last stage has no boundary), exactly, by
dynamic programming.

Each rule's declaration carries its measurement (``MethodSpec.costs.balancer``, a
``CostHook``; ``brigade.stages.rules``), so a rule brought from outside brigade brings its
own and no table here names rules; a rule without one is timed as backprop (forward +
backward). The hooks of the built-in rules are defined here (``BACKPROP_COST``,
``DNI_COST``, ``PETRA_COST``, ``FWDGRAD_COST``, ``DGL_COST``) and named in their
declarations; a rule that declares one is balanced by it by default (``Pipeline``).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from .errors import ConfigError

__all__ = ["MethodCosts", "CostHook", "cost_hook", "method_costs", "balance_by_cost",
           "stage_costs", "BACKPROP_COST", "DNI_COST", "PETRA_COST", "FWDGRAD_COST", "DGL_COST"]


@dataclass(frozen=True)
class MethodCosts:
    """Per-block and per-cut seconds of one microbatch under ``method``."""

    method: str
    block_s: list[float]
    boundary_s: list[float]  # boundary_s[i]: extra on a stage whose last block is i

    def stage_cost(self, start: int, stop: int) -> float:
        """Seconds of one microbatch on the stage of blocks ``[start, stop)``."""
        extra = self.boundary_s[stop - 1] if stop < len(self.block_s) else 0.0
        return sum(self.block_s[start:stop]) + extra


@dataclass(frozen=True)
class CostHook:
    """How a rule's per-block and per-boundary work is timed.

    ``block(block, x, options) -> (seconds, output)`` runs the rule's work for one block
    on input ``x``; ``boundary(h, labels, options) -> seconds`` the work a stage ending
    with activation ``h`` adds (None: none).
    """

    block: Callable[[nn.Module, Tensor, dict], tuple[float, Tensor]]
    boundary: Callable[[Tensor, Tensor, dict], float] | None = None


def _timed(fn: Callable[[], Tensor | None]) -> tuple[float, Tensor | None]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _backprop_block(block: nn.Module, x: Tensor, options: dict) -> tuple[float, Tensor]:
    """Forward with autograd and backward from a unit gradient (what 1F1B runs)."""
    inp = x.detach().requires_grad_(x.is_floating_point())
    t0 = time.perf_counter()
    out = block(inp)
    if out.requires_grad:
        out.backward(torch.ones_like(out))
    return time.perf_counter() - t0, out.detach()


def _step_s(block: nn.Module) -> float:
    """One plain SGD step over the block's gradients (a DNI stage steps every microbatch)."""
    params = [p for p in block.parameters() if p.grad is not None]
    if not params:
        return 0.0
    opt = torch.optim.SGD(params, lr=0.0)
    return _timed(lambda: opt.step())[0]


def _dni_block(block: nn.Module, x: Tensor, options: dict) -> tuple[float, Tensor]:
    """Forward, backward from a gradient, and an optimizer step: every microbatch."""
    seconds, out = _backprop_block(block, x, options)
    return seconds + _step_s(block), out


def _dni_boundary(h: Tensor, labels: Tensor, options: dict) -> float:
    """The synthesizer at a cut: build it as the DNI stage would (zero last layer, its
    hidden layers, Adam with fan-in rates), then time one prediction and one regression
    step onto a target of h's shape."""
    from .synthetic import param_groups, synthesizer_for, synthesizer_optimizer

    num_classes = options.get("num_classes") if options.get("conditioned") else None
    sg = synthesizer_for(tuple(h.shape), options.get("sg_hidden_layers", 1), num_classes,
                         options.get("sg_hidden"), options.get("sg_options"))
    lr = options.get("sg_lr", 1e-3)
    kind = options.get("sg_optimizer", "adam")
    opt = synthesizer_optimizer(param_groups(sg, lr, options.get("sg_lr_scaling", True)),
                                kind if isinstance(kind, str) else "adam", lr)
    lab = labels if num_classes else None
    target = torch.randn_like(h) * 1e-3

    def work() -> None:
        with torch.no_grad():
            sg(h, lab)
        loss = sg.regression_loss(h, target, lab, options.get("sg_normalize", True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    work()  # warm-up: Adam's state, the allocator
    return _timed(work)[0]


def _petra_block(block: nn.Module, x: Tensor, options: dict) -> tuple[float, Tensor]:
    """PETRA's forward without autograd, then its reverse: a reversible block rebuilds
    its input and backpropagates (``reverse_backward``), another recomputes with autograd."""
    from .revnet import frozen_bn_stats, is_reversible

    t0 = time.perf_counter()
    with torch.no_grad():
        y = block(x)
    dy = torch.ones_like(y)
    if is_reversible(block):
        block.reverse_backward(y, dy)
    else:
        inp = x.detach().requires_grad_(x.is_floating_point())
        with frozen_bn_stats(block):
            out = block(inp)
            out.backward(dy)
    return time.perf_counter() - t0, y.detach()


def _fwdgrad_block(block: nn.Module, x: Tensor, options: dict) -> tuple[float, Tensor]:
    """One tangent-carrying forward (forward-mode AD over the parameters and the input),
    no backward: a forward-gradient stage's work per direction."""
    from torch.func import functional_call, jvp

    params = {k: v.detach() for k, v in block.named_parameters()}
    tangents = {k: torch.randn_like(v) for k, v in params.items()}
    tx = torch.randn_like(x) if x.is_floating_point() else None

    def f(p, inp):
        return functional_call(block, p, (inp,))

    t0 = time.perf_counter()
    if tx is None:
        out, _ = jvp(lambda p: f(p, x), (params,), (tangents,))
    else:
        out, _ = jvp(f, (params, x.detach()), (tangents, tx))
    return time.perf_counter() - t0, out.detach()


def _dgl_boundary(h: Tensor, labels: Tensor, options: dict) -> float:
    """The auxiliary head at a cut (DGL: each stage but the last trains its own): build it
    as the stage would (``make_head`` on h's shape), then time its forward, its loss and
    the backward through it (the stage's own blocks' backward is in their block cost)."""
    from .heads import make_head

    num_classes = int(options.get("num_classes") or int(labels.max()) + 1)
    head = make_head(tuple(h.shape[1:]), num_classes, options.get("pool", 2))
    inp = h.detach().requires_grad_(h.is_floating_point())

    def work() -> None:
        head.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(head(inp), labels).backward()

    work()  # warm-up
    return _timed(work)[0]


# The built-in rules' hooks (their declarations name them: ``costs=CostHooks(balancer=...)``).
BACKPROP_COST = CostHook(_backprop_block)  # backprop and stale; any rule without a hook
DNI_COST = CostHook(_dni_block, _dni_boundary)  # dni and cdni
PETRA_COST = CostHook(_petra_block)
FWDGRAD_COST = CostHook(_fwdgrad_block)
DGL_COST = CostHook(_backprop_block, _dgl_boundary)  # steps once per batch (U), like backprop


def cost_hook(method) -> CostHook:
    """The hook a rule (name or ``MethodSpec``) is timed by: its declaration's
    ``costs.balancer``, else backprop's (an unknown name is an error listing the rules)."""
    from .rules import get_method

    return get_method(method).costs.balancer or BACKPROP_COST


def method_costs(method, model: nn.Sequential, sample: Tensor, options: dict | None = None,
                 labels: Tensor | None = None, repeats: int = 3) -> MethodCosts:
    """Time every block of (a copy of) ``model`` on ``sample`` under ``method`` (a rule's
    name or declaration; ``options``: its stage class's keywords, ``MethodSpec.stage_kwargs``):
    the fastest of ``repeats`` passes after one warm-up (on a shared machine a pass is slowed
    by whatever else runs; the fastest is the closest to the work itself); the model itself
    is not touched."""
    if repeats < 1:
        raise ConfigError(f"repeats must be at least 1; got {repeats}")
    from .rules import get_method

    rule = get_method(method)
    hook = cost_hook(rule)
    options = dict(options or {})
    if labels is None:
        labels = torch.zeros(sample.shape[0], dtype=torch.long)
    work = copy.deepcopy(model).train()
    blocks: list[list[float]] = [[] for _ in work]
    cuts: list[list[float]] = [[] for _ in work]
    for r in range(repeats + 1):
        x = sample
        for i, block in enumerate(work):
            seconds, x = hook.block(block, x, options)
            block.zero_grad(set_to_none=True)
            extra = 0.0
            if hook.boundary is not None and i < len(work) - 1:
                extra = hook.boundary(x, labels, options)
            if r:
                blocks[i].append(seconds)
                cuts[i].append(extra)
    return MethodCosts(rule.name, [min(b) for b in blocks], [min(c) for c in cuts])


def stage_costs(costs: MethodCosts, balance: list[int]) -> list[float]:
    """Per-stage seconds of ``balance`` under the measured rule."""
    out, start = [], 0
    for count in balance:
        out.append(costs.stage_cost(start, start + count))
        start += count
    return out


def balance_by_cost(costs: MethodCosts, stages: int) -> list[int]:
    """The contiguous balance that minimises the slowest stage's cost (exact DP,
    O(stages x blocks^2)); among equal maxima, the one found first (fewest blocks early)."""
    n = len(costs.block_s)
    if not 1 <= stages <= n:
        raise ConfigError(f"cannot cut {n} blocks into {stages} stages; use 1..{n} stages")
    from .partition import min_max_split

    return min_max_split(n, stages, costs.stage_cost, later_cuts=False)
