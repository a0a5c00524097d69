"""Forward gradients: gradient estimates from forward-mode AD, no backward pass through the net.

The estimator (Baydin et al. 2022, arXiv 2202.08587). Pick a direction ``v`` (a tangent for
every parameter), push it through the network with forward-mode AD
(``torch.func.jvp`` over ``torch.func.functional_call``) and read off, in the same pass, the
loss ``L`` and the directional derivative ``d = ∇L·v``. Then ``g = d·v`` is an unbiased
estimate of ``∇L`` whenever ``E[v vᵀ] = I`` (gaussian or rademacher ``v``). With ``n``
projections the ``n`` tangents are pushed through at once with ``torch.func.vmap`` and the
``n`` estimates are averaged: the variance falls as ``1/n``.

Directions are never stored or sent: parameter ``j`` at key ``(seed, *keys)`` draws its
tangent from ``torch.Generator`` seeded by ``mix_seed(seed, *keys, j)``, so any process with
the seed regenerates the same ``v`` bit for bit (``directions``). The shared-seed
data-parallel system (``brigade.engine.fgdp``) and forward-only pipeline stages rely on it:
only the scalars ``d`` travel.

Options of ``forward_gradient``:

``guess``
    ``random``: ``v`` drawn from ``dist``. ``local`` (Fournier et al., ICML 2023,
    arXiv 2306.06968): a small auxiliary head per block (``LocalHeads``: pool + linear to the
    classes) gives a local loss ``L_k``; its gradient ``u_k`` for block ``k``'s parameters is
    found by backpropagating *inside block k only* (the block's input is detached). The
    global directional derivative along ``u_k`` then gives ``g_k = (∇_k L·u_k) u_k/|u_k|²``:
    the projection of the true gradient on the guess, never pointing uphill. The last block's
    local loss is the global loss itself, so its guess is exact and needs no jvp. The heads
    are trained on their local losses (``Estimate.head_grads``). ``projections`` has no
    effect for the local guess (the direction is deterministic).
``scope``
    ``global``: one direction over all parameters, one jvp through the whole net per
    projection (Baydin). ``block``: each block ``k`` gets its own directions and its own
    directional derivatives ``d_k``; the forward pass up to block ``k`` carries no tangent, so
    it is run once without one and each block's jvp starts at its input. The estimate of
    block ``k`` then has the variance of a ``P_k``-dimensional problem instead of a
    ``P``-dimensional one (``P`` parameters), at the cost of ``Σ_k`` suffix jvps. Default:
    ``global`` for ``random``, ``block`` for ``local``. With the block scope ``projections``
    may be one count per block, e.g. ``(1, 1, 256)`` for the MLP: the last block's jvps run
    through one small layer, so many projections there cost little and train the read-out
    well; a count of 0 leaves a block as it is.
``mode``
    ``weight``: tangents over parameters (above). ``activation`` (activity perturbation,
    Ren et al. 2022 / Fournier et al.): tangents ``z_k`` over each block's *output* ``h_k``;
    forward AD gives, per example, ``d_b = ∇_{h_k,b} ℓ_b · z_{k,b}``, so
    ``ĝ_{h_k} = d z_k / B`` estimates ``∂L/∂h_k`` (``B`` the batch, ``ℓ_b`` the per-example
    losses). Then a *local* backward through block ``k`` alone (its input detached) turns
    ``ĝ_{h_k}`` into the block's weight gradient: ``autograd.grad(h_k, θ_k, ĝ_{h_k})``. No
    gradient crosses a block boundary backwards. Activations have far fewer dimensions per
    example than the weights, so the estimate is much less noisy. Per-example derivatives need
    a loss with ``reduction='mean'`` that can be switched to ``'none'`` (``CrossEntropyLoss``,
    ``MSELoss``, ...) and examples that do not interact (BatchNorm in training mode couples
    them: pass ``per_example=False`` there, which uses the batch scalar ``d`` instead).

Buffers (BatchNorm running statistics) are passed to ``functional_call`` explicitly as
non-tangent inputs. During the jvps they are frozen: the BatchNorm layers normalise with the
batch statistics (as in training) but do not update the running ones, so ``n`` projections
do not update them ``n`` times. When ``update_stats=True`` (default) the running statistics
are updated exactly once per estimate, by the plain forward pass that the block-wise and local
paths run anyway (and, for the global random path of a model with BatchNorm, by one extra
forward without tangents), just as one training forward would update them.

``jvp_forward`` and ``set_forward_gradient`` are the per-stage building blocks: a stage
pushes its input (and the input's tangent, if any) forward with its own regenerated ``v``;
when the scalar ``d`` comes back, it regenerates ``v`` and forms its gradient.
"""

from __future__ import annotations

import contextlib
import copy
import math
import weakref
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, jvp, vmap

from .errors import ConfigError, choose

__all__ = [
    "DISTRIBUTIONS",
    "GUESSES",
    "MODES",
    "SCOPES",
    "mix_seed",
    "make_generator",
    "sample",
    "directions",
    "param_blocks",
    "LocalHeads",
    "make_head",
    "Estimate",
    "forward_gradient",
    "directional_derivatives",
    "combine",
    "jvp_forward",
    "set_forward_gradient",
    "cosine_similarity",
    "true_gradient",
    "auto_projections",
    "ForwardGradient",
    "fg_train_step",
]

DISTRIBUTIONS = ("rademacher", "gaussian")
GUESSES = ("random", "local")
MODES = ("weight", "activation")
SCOPES = ("global", "block")

_MASK64 = (1 << 64) - 1


# ---------------------------------------------------------------------------------------
# Directions regenerated from a seed
# ---------------------------------------------------------------------------------------
def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(seed: int, *keys: int) -> int:
    """One 63-bit generator seed from a seed and keys (step, worker, parameter, ...).

    Pure integer arithmetic (splitmix64), so every process and platform gets the same value;
    nearby keys give unrelated seeds.
    """
    h = _splitmix64(int(seed) & _MASK64)
    for k in keys:
        h = _splitmix64(h ^ (int(k) & _MASK64))
    return h >> 1


def make_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``mix_seed(seed, *keys)``."""
    return torch.Generator(device="cpu").manual_seed(mix_seed(seed, *keys))


_BITS = torch.arange(8, dtype=torch.uint8)


def sample(shape: Sequence[int], dist: str, generator: torch.Generator) -> torch.Tensor:
    """A float32 CPU tensor of ``shape`` with i.i.d. entries, ``E[v vᵀ] = I``.

    ``rademacher`` (±1) unpacks 8 signs from each random byte: 1.0-3.4x faster than
    ``torch.randn`` on CPU (one thread, 0.8M-8M entries, medians after a warm-up; four runs
    on a 2-core machine, the least gain while other jobs loaded it), which matters because
    drawing ``v`` costs more than a forward pass of an MLP. It also has the smaller variance
    (its fourth moment is 1, not 3).
    """
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    if dist == "gaussian":
        return torch.randn(shape, generator=generator)
    if dist == "rademacher":
        nbytes = (numel + 7) // 8
        r = torch.randint(0, 256, (nbytes,), generator=generator, dtype=torch.uint8)
        bits = ((r.unsqueeze(1) >> _BITS) & 1).reshape(-1)[:numel]
        return bits.to(torch.float32).mul_(2.0).sub_(1.0).reshape(shape)
    raise ConfigError(f"unknown direction distribution {dist!r}; valid: {', '.join(DISTRIBUTIONS)}")


def directions(
    tensors: Sequence[torch.Tensor],
    seed: int,
    keys: Sequence[int] = (),
    n: int | None = None,
    dist: str = "rademacher",
    indices: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """Regenerate the directions for ``tensors``: one tensor each, shape ``(n, *t.shape)``.

    Tensor ``i`` draws from ``make_generator(seed, *keys, indices[i])`` (``indices`` defaults
    to ``0..len-1``; pass a parameter's index in the whole model so that a stage holding
    parameters 7..9 draws exactly what the whole model would). ``n=None`` drops the leading
    dimension. Directions land on each tensor's device and dtype.
    """
    dist = choose("direction distribution", dist, DISTRIBUTIONS)
    idx = list(range(len(tensors))) if indices is None else list(indices)
    out = []
    for t, j in zip(tensors, idx):
        shape = tuple(t.shape) if n is None else (n, *t.shape)
        v = sample(shape, dist, make_generator(seed, *keys, j))
        out.append(v.to(device=t.device, dtype=t.dtype))
    return out


# ---------------------------------------------------------------------------------------
# Blocks and local heads
# ---------------------------------------------------------------------------------------
@dataclass
class _Block:
    module: nn.Module  # runs the block: input -> output
    names: list[str]  # parameter names inside ``module``
    params: list[nn.Parameter]
    index: list[int]  # positions of ``params`` in ``list(model.parameters())``


def param_blocks(model: nn.Module, blocks: Sequence[int] | None = None) -> list[_Block]:
    """Split ``model`` (an ``nn.Sequential``) into blocks that each hold parameters.

    Default: one block per child; a child without parameters (ReLU, Flatten, pooling) joins
    the block before it (or the first one). ``blocks`` = a list of child counts (like a
    pipeline balance ``[3, 5]``) groups children explicitly. A module that is not a
    Sequential is one block.
    """
    children = list(model.children()) if isinstance(model, nn.Sequential) else [model]
    if blocks is not None:
        if sum(blocks) != len(children) or any(b <= 0 for b in blocks):
            raise ConfigError(
                f"blocks {list(blocks)} must be positive and sum to the model's "
                f"{len(children)} children"
            )
        groups, start = [], 0
        for b in blocks:
            groups.append(children[start : start + b])
            start += b
    else:
        groups = []
        for child in children:
            has = any(True for _ in child.parameters())
            if not groups or (has and any(any(True for _ in c.parameters()) for c in groups[-1])):
                groups.append([child])
            else:
                groups[-1].append(child)
    position = {id(p): i for i, p in enumerate(model.parameters())}
    out = []
    for g in groups:
        module = g[0] if len(g) == 1 else nn.Sequential(*g)
        named = list(module.named_parameters())
        out.append(
            _Block(
                module=module,
                names=[n for n, _ in named],
                params=[p for _, p in named],
                index=[position[id(p)] for _, p in named],
            )
        )
    return out


def make_head(shape: Sequence[int], num_classes: int, pool: int = 2) -> nn.Module:
    """A small auxiliary classifier for block outputs of ``shape`` (without the batch):
    feature maps ``(C, H, W)`` are average-pooled to ``pool x pool``, flattened and mapped
    linearly to the classes; anything else is flattened and mapped linearly (the heads of
    DGL, Belilovsky et al. 2020, and of the local-guess forward gradient, Fournier et al.
    2023)."""
    shape = tuple(int(d) for d in shape)
    if len(shape) == 3:
        return nn.Sequential(nn.AdaptiveAvgPool2d(pool), nn.Flatten(1),
                             nn.Linear(shape[0] * pool * pool, num_classes))
    return nn.Sequential(nn.Flatten(1), nn.Linear(math.prod(shape), num_classes))


class LocalHeads(nn.Module):
    """One small auxiliary classifier per block except the last: pool + linear to the classes.

    For a block output of shape ``(B, C, H, W)``: adaptive average pooling to ``pool x pool``,
    flatten, linear to ``num_classes``; for ``(B, F)``: linear. The last block's output is the
    model's output, whose loss is the global loss, so it has no head.
    """

    def __init__(
        self,
        model: nn.Module,
        example_x: torch.Tensor,
        num_classes: int | None = None,
        blocks: Sequence[int] | None = None,
        pool: int = 2,
    ) -> None:
        super().__init__()
        bl = param_blocks(model, blocks)
        shapes = []
        was = model.training
        model.eval()  # a shape probe: leave the running statistics alone
        try:
            with torch.no_grad():
                h = example_x[:2]
                for b in bl:
                    h = b.module(h)
                    shapes.append(tuple(h.shape[1:]))
        finally:
            model.train(was)
        if num_classes is None:
            num_classes = int(shapes[-1][-1])
        self.heads = nn.ModuleList(make_head(shape, num_classes, pool) for shape in shapes[:-1])
        device = next(iter(model.parameters())).device
        self.to(device)

    def __len__(self) -> int:
        return len(self.heads)


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _frozen_stats(model: nn.Module):
    """BatchNorm layers in training mode normalise with batch statistics, update nothing."""
    changed = []
    if model.training:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.track_running_stats = False
                changed.append(m)
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True


def _has_running_stats(model: nn.Module) -> bool:
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules()
    )


def _buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in module.named_buffers()}


def _per_example_loss(loss_fn: Callable) -> Callable | None:
    """A copy of ``loss_fn`` that returns one loss per example, or None if it cannot."""
    if (
        isinstance(loss_fn, nn.modules.loss._Loss)
        and getattr(loss_fn, "reduction", None) == "mean"
        and getattr(loss_fn, "weight", None) is None
    ):
        f = copy.copy(loss_fn)
        f.reduction = "none"

        def per_example(out, y):
            loss = f(out, y)
            return loss.reshape(loss.shape[0], -1).mean(1) if loss.dim() > 1 else loss

        return per_example
    return None


def _run_from(bl: list[_Block], k: int, h: torch.Tensor, params_k: dict | None = None) -> torch.Tensor:
    """Blocks ``k..`` applied to ``h``; block ``k`` with ``params_k`` swapped in if given."""
    if params_k is not None:
        h = functional_call(bl[k].module, (params_k, _buffers(bl[k].module)), (h,))
    else:
        h = bl[k].module(h)
    for b in bl[k + 1 :]:
        h = b.module(h)
    return h


def cosine_similarity(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """Cosine similarity of two gradients given as lists of tensors."""
    dot = sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))
    na = math.sqrt(sum(float(x.double().pow(2).sum()) for x in a))
    nb = math.sqrt(sum(float(y.double().pow(2).sum()) for y in b))
    return dot / (na * nb) if na > 0 and nb > 0 else 0.0


def true_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable) -> list[torch.Tensor]:
    """The backprop gradient of ``loss_fn(model(x), y)``, for comparisons (no .grad touched).

    Running statistics are frozen, as during an estimate.
    """
    params = list(model.parameters())
    with _frozen_stats(model):
        loss = loss_fn(model(x), y)
    return list(torch.autograd.grad(loss, params))


# ---------------------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------------------
@dataclass
class Estimate:
    """One forward-gradient estimate.

    ``grads[i]`` belongs to ``list(model.parameters())[i]``. ``d`` holds the directional
    derivatives, one tensor per unit (the whole model for the global scope, each block for
    the block scope): shape ``(n,)``, or ``(n, B)`` for activation perturbation with
    per-example derivatives (``n = 1`` for the local guess). ``head_grads`` are the gradients of the local heads' own loss
    (local guess), to be applied by the heads' optimizer.
    """

    loss: float
    grads: list[torch.Tensor]
    d: list[torch.Tensor]
    local_losses: list[float] = field(default_factory=list)
    head_grads: list[torch.Tensor] | None = None


def _check(guess: str, mode: str, scope: str | None, dist: str, projections):
    guess = choose("guess", guess, GUESSES)
    mode = choose("perturbation mode", mode, MODES)
    dist = choose("direction distribution", dist, DISTRIBUTIONS)
    if scope is None:
        scope = "block" if guess == "local" else "global"
    scope = choose("scope", scope, SCOPES)
    if isinstance(projections, (list, tuple)):
        ns = tuple(int(p) for p in projections)
        if not ns or min(ns) < 0 or sum(ns) < 1:
            raise ConfigError(
                f"projections per block must be >= 0 (0 freezes a block) with at least one > 0; got {list(projections)}"
            )
        if len(ns) > 1 and (guess, mode, scope) != ("random", "weight", "block"):
            raise ConfigError(
                "a list of projections (one count per block) needs guess='random', "
                f"mode='weight', scope='block'; got guess={guess!r}, mode={mode!r}, scope={scope!r}"
            )
        projections = ns if len(ns) > 1 else ns[0]
    elif int(projections) < 1:
        raise ConfigError(f"projections must be at least 1; got {projections}")
    else:
        projections = int(projections)
    return guess, mode, scope, dist, projections


def _unit_counts(n, units: int) -> list[int]:
    """Projections per unit: an int for all, or one count per block."""
    if isinstance(n, tuple):
        if len(n) != units:
            raise ConfigError(f"{len(n)} projection counts for {units} blocks; give one per block or a single number")
        return list(n)
    return [int(n)] * units


def directional_derivatives(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable,
    *,
    seed: int,
    keys: Sequence[int] = (),
    projections: int | Sequence[int] = 1,
    dist: str = "rademacher",
    scope: str = "global",
    blocks: Sequence[int] | None = None,
    chunk_size: int | None = None,
    update_stats: bool = True,
) -> tuple[float, list[torch.Tensor]]:
    """Loss and the directional derivatives along the regenerated random directions.

    Returns ``(loss, d)``: ``d`` is a list with one 1-D tensor per unit (the whole model
    for ``scope='global'``, each block for ``'block'``) holding that unit's ``projections``
    derivatives. This is what a data-parallel worker sends back; ``combine`` turns
    coefficients of these back into a gradient. With ``scope='block'``, ``projections`` may
    be one count per block: a block's jvps run from its input on, so projections on the last
    blocks are cheap, and a small block needs fewer of them for the same noise. A count of 0
    leaves that block out (no direction, no update: the block stays as initialised).
    """
    _, _, scope, dist, n = _check("random", "weight", scope, dist, projections)
    loss, d, _ = _weight_random(model, x, y, loss_fn, seed, tuple(keys), n, dist, scope, blocks, chunk_size, update_stats)
    return loss, d


def _weight_random(model, x, y, loss_fn, seed, keys, n, dist, scope, blocks, chunk_size, update_stats):
    """``(loss, d, drawn)``: ``drawn`` holds per unit ``(parameter indices, directions)``,
    so a caller that also needs the estimate weighs them without drawing them again
    (drawing costs more than a forward; see :func:`sample`)."""
    params = list(model.parameters())
    if scope == "global":
        (n,) = _unit_counts(n, 1)
        names = [k for k, _ in model.named_parameters()]
        primal = {k: p.detach() for k, p in zip(names, params)}
        bufs = _buffers(model)
        vs = directions(params, seed, keys, n, dist)
        tangents = dict(zip(names, vs))

        def f(p):
            return loss_fn(functional_call(model, (p, bufs), (x,)), y)

        def one(t):
            return jvp(f, (primal,), (t,))

        with torch.no_grad():
            if update_stats and model.training and _has_running_stats(model):
                model(x)  # the running statistics move once, as in one training forward
            with _frozen_stats(model):
                loss, d = vmap(one, randomness="same", chunk_size=chunk_size)(tangents)
        return float(loss[0]), [d.reshape(n)], [(list(range(len(params))), vs)]

    bl = param_blocks(model, blocks)
    counts = _unit_counts(n, len(bl))
    ds, drawn = [], []
    with torch.no_grad():
        inputs = [x]
        # one plain forward gives every block's input and the loss, and moves the running
        # statistics once (not at all with update_stats=False)
        with contextlib.nullcontext() if update_stats else _frozen_stats(model):
            for b in bl[:-1]:
                inputs.append(b.module(inputs[-1]))
            loss = float(loss_fn(bl[-1].module(inputs[-1]), y)) if len(bl) else 0.0
        with _frozen_stats(model):
            for k, b in enumerate(bl):
                nk = counts[k]
                if not b.params or nk == 0:
                    ds.append(torch.zeros(nk))
                    drawn.append((b.index, []))
                    continue
                primal = {nm: p.detach() for nm, p in zip(b.names, b.params)}
                vs = directions(b.params, seed, keys, nk, dist, indices=b.index)
                drawn.append((b.index, vs))
                tangents = dict(zip(b.names, vs))
                h = inputs[k]

                def f(p, k=k, h=h):
                    return loss_fn(_run_from(bl, k, h, p), y)

                def one(t, f=f, primal=primal):
                    return jvp(f, (primal,), (t,))[1]

                ds.append(vmap(one, randomness="same", chunk_size=chunk_size)(tangents).reshape(nk))
    return loss, ds, drawn


def _weigh(out: list[torch.Tensor], idx: Sequence[int], coefs: torch.Tensor,
           vs: Sequence[torch.Tensor]) -> None:
    """``out[i] += Σ_k coefs[k] · vs[i][k]`` for one unit's parameters ``idx``."""
    for i, v in zip(idx, vs):
        out[i] += torch.tensordot(coefs.to(v.device), v.float(), dims=1).to(out[i].dtype)


def combine(
    model_or_params: nn.Module | Sequence[torch.Tensor],
    coefs: Sequence,
    seed: int,
    keys: Sequence[int] = (),
    dist: str = "rademacher",
    scope: str = "global",
    blocks: Sequence[int] | None = None,
    out: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """``g = Σ_u Σ_k coefs[u][k] · v[u, k]``: regenerate the directions and weigh them.

    ``coefs`` is laid out like ``d`` from ``directional_derivatives``: one sequence per unit
    (the whole model, or each block). Pass ``d[u] / n_u`` to get the averaged estimate.
    Accumulates into ``out`` if given (so that the directions of many workers can be summed
    without keeping them all).
    """
    if isinstance(model_or_params, nn.Module):
        params = list(model_or_params.parameters())
        units = [list(range(len(params)))] if scope == "global" else [b.index for b in param_blocks(model_or_params, blocks)]
    else:
        params = list(model_or_params)
        if scope != "global":
            raise ConfigError("combine with scope='block' needs the model, to find its blocks")
        units = [list(range(len(params)))]
    cs = [
        (c.detach().float() if isinstance(c, torch.Tensor) else torch.tensor(np.asarray(c, dtype=np.float32))).reshape(-1)
        for c in coefs
    ]
    if len(cs) != len(units):
        raise ConfigError(f"combine got coefficients for {len(cs)} units; the {scope} scope has {len(units)}")
    if out is None:
        out = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for idx, cu in zip(units, cs):
        if not idx or not cu.numel():
            continue
        _weigh(out, idx, cu, directions([params[i] for i in idx], seed, keys, cu.numel(), dist, indices=idx))
    return out


def forward_gradient(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable,
    *,
    projections: int | Sequence[int] = 1,
    dist: str = "rademacher",
    guess: str = "random",
    mode: str = "weight",
    scope: str | None = None,
    seed: int = 0,
    keys: Sequence[int] = (),
    heads: LocalHeads | None = None,
    blocks: Sequence[int] | None = None,
    chunk_size: int | None = None,
    update_stats: bool = True,
    per_example: bool = True,
) -> Estimate:
    """Estimate ``∇L`` of ``loss_fn(model(x), y)`` by forward-mode AD (see the module doc).

    ``seed`` and ``keys`` (e.g. the step) fix the random directions. ``heads`` is required
    for ``guess='local'``. No ``.grad`` is touched: the estimate is returned.
    """
    guess, mode, scope, dist, n = _check(guess, mode, scope, dist, projections)
    keys = tuple(int(k) for k in keys)
    params = list(model.parameters())
    if guess == "local" and heads is None:
        raise ConfigError("guess='local' needs heads=LocalHeads(model, example_x)")
    if mode == "weight" and guess == "random":
        loss, d, drawn = _weight_random(model, x, y, loss_fn, seed, keys, n, dist, scope, blocks, chunk_size, update_stats)
        grads = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        for (idx, vs), du in zip(drawn, d):  # what combine(d / n) gives, without redrawing
            if vs:
                _weigh(grads, idx, du.detach().float() / du.numel(), vs)
        grads = [g.to(p.dtype) for g, p in zip(grads, params)]
        return Estimate(loss=loss, grads=grads, d=d)
    stats = contextlib.nullcontext() if update_stats else _frozen_stats(model)
    with stats:  # the plain block-by-block forward of these paths moves the statistics once
        if mode == "weight":
            return _weight_local(model, x, y, loss_fn, heads, scope, blocks)
        return _activation(model, x, y, loss_fn, guess, heads, scope, blocks, seed, keys, n, dist, chunk_size, per_example)


def _local_forward(model, x, y, loss_fn, heads, bl):
    """Forward block by block, each block's input detached; returns outputs and local losses.

    Block k < last is scored by its head; the last block by the real loss.
    """
    if heads is not None and len(heads) != len(bl) - 1:
        raise ConfigError(f"LocalHeads has {len(heads)} heads for {len(bl)} blocks; need {len(bl) - 1}")
    inputs, outs, losses = [x], [], []
    for k, b in enumerate(bl):
        h = b.module(inputs[-1].detach())
        outs.append(h)
        if k < len(bl) - 1:
            inputs.append(h.detach())
            if heads is not None:
                losses.append(loss_fn(heads.heads[k](h), y))
        else:
            losses.append(loss_fn(h, y))
    return inputs, outs, losses


def _weight_local(model, x, y, loss_fn, heads, scope, blocks):
    bl = param_blocks(model, blocks)
    params = list(model.parameters())
    head_params = list(heads.parameters())
    inputs, outs, losses = _local_forward(model, x, y, loss_fn, heads, bl)
    us = torch.autograd.grad(sum(losses), params + head_params, allow_unused=True)
    u = [torch.zeros_like(p) if g is None else g for g, p in zip(us[: len(params)], params)]
    head_grads = [torch.zeros_like(p) if g is None else g for g, p in zip(us[len(params) :], head_params)]
    loss = losses[-1].item()
    grads = [torch.zeros_like(p) for p in params]
    with torch.no_grad(), _frozen_stats(model):
        if scope == "global":
            names = [k for k, _ in model.named_parameters()]
            primal = {k: p.detach() for k, p in zip(names, params)}
            bufs = _buffers(model)
            _, dd = jvp(lambda p: loss_fn(functional_call(model, (p, bufs), (x,)), y), (primal,), (dict(zip(names, u)),))
            unorm2 = sum(float(t.double().pow(2).sum()) for t in u)
            scale = float(dd) / unorm2 if unorm2 > 0 else 0.0
            grads = [t * scale for t in u]
            d = [torch.tensor([float(dd)])]
        else:
            ds = []
            for k, b in enumerate(bl):
                uk = [u[i] for i in b.index]
                unorm2 = sum(float(t.double().pow(2).sum()) for t in uk)
                if k == len(bl) - 1:
                    dk = unorm2  # the last block's guess is its exact gradient: ∇L·u = |u|²
                elif unorm2 == 0:
                    dk = 0.0
                else:
                    primal = {nm: p.detach() for nm, p in zip(b.names, b.params)}
                    h = inputs[k]
                    _, dd = jvp(lambda p: loss_fn(_run_from(bl, k, h, p), y), (primal,), (dict(zip(b.names, uk)),))
                    dk = float(dd)
                ds.append(dk)
                scale = dk / unorm2 if unorm2 > 0 else 0.0
                for i, t in zip(b.index, uk):
                    grads[i] = t * scale
            d = [torch.tensor([v]) for v in ds]
    return Estimate(loss=loss, grads=grads, d=d, local_losses=[l.item() for l in losses[:-1]], head_grads=head_grads)


def _activation(model, x, y, loss_fn, guess, heads, scope, blocks, seed, keys, n, dist, chunk_size, per_example):
    bl = param_blocks(model, blocks)
    params = list(model.parameters())
    pel = _per_example_loss(loss_fn) if per_example else None
    inputs, outs, losses = _local_forward(model, x, y, loss_fn, heads if guess == "local" else None, bl)
    loss = losses[-1].item()
    K = len(bl)
    head_grads = None
    if guess == "local":
        head_params = list(heads.parameters())
        us, head_grads = [], []
        if K > 1:
            # u_k = ∂L_k/∂h_k: the local loss's gradient at the block output
            gs = torch.autograd.grad(
                sum(losses[:-1]), outs[:-1] + head_params, allow_unused=True, retain_graph=True
            )
            us = [g if g is not None else torch.zeros_like(o) for g, o in zip(gs[: K - 1], outs[:-1])]
            head_grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(gs[K - 1 :], head_params)]
        # the last block's output: the global loss is local there, its gradient is exact
        us.append(torch.autograd.grad(losses[-1], outs[-1], retain_graph=True)[0])
    B = x.shape[0]
    target = pel if pel is not None else loss_fn
    ghat: list[torch.Tensor] = []
    dlist = []
    with torch.no_grad(), _frozen_stats(model):
        prim = [o.detach() for o in outs]
        if guess == "random":
            zs = [sample((n, *o.shape), dist, make_generator(seed, *keys, k)).to(o) for k, o in enumerate(prim)]
        if scope == "global":
            # perturb every block output at once: F(ε) = ℓ(net with h_k + ε_k)
            def F(eps):
                h = inputs[0]
                for k, b in enumerate(bl):
                    h = b.module(h) + eps[k]
                return target(h, y)

            zero = tuple(torch.zeros_like(o) for o in prim)
            if guess == "random":
                dd = vmap(lambda t: jvp(F, (zero,), (t,))[1], randomness="same", chunk_size=chunk_size)(tuple(zs))
                # dd: (n,) or (n, B)
                for k in range(K):
                    ghat.append(_act_estimate(dd, zs[k], pel is not None, B))
                dlist = [dd]
            else:
                _, dd = jvp(F, (zero,), (tuple(us),))
                dlist = [dd.reshape(1, *dd.shape)]
                unorm = _row_norm2(us, pel is not None)
                for k in range(K):
                    ghat.append(_proj_estimate(dd, us[k], unorm, pel is not None, B))
        else:
            for k in range(K):
                h0 = prim[k]

                def f(h, k=k):
                    for b in bl[k + 1 :]:
                        h = b.module(h)
                    return target(h, y)

                if guess == "random":
                    dd = vmap(lambda t, f=f, h0=h0: jvp(f, (h0,), (t,))[1], randomness="same", chunk_size=chunk_size)(zs[k])
                    ghat.append(_act_estimate(dd, zs[k], pel is not None, B))
                    dlist.append(dd)
                else:
                    _, dd = jvp(f, (h0,), (us[k],))
                    unorm = _row_norm2([us[k]], pel is not None)
                    ghat.append(_proj_estimate(dd, us[k], unorm, pel is not None, B))
                    dlist.append(dd.reshape(1, *dd.shape))
    # local backward: block k's estimated output gradient into block k's weights only
    grads = [torch.zeros_like(p) for p in params]
    for k, b in enumerate(bl):
        if not b.params:
            continue
        gk = torch.autograd.grad(outs[k], b.params, ghat[k], allow_unused=True, retain_graph=True)
        for i, g in zip(b.index, gk):
            if g is not None:
                grads[i] = g
    d = list(dlist)  # per unit: (n,) or, per example, (n, B)
    local = [l.item() for l in losses[:-1]] if guess == "local" else []
    return Estimate(loss=loss, grads=grads, d=d, local_losses=local, head_grads=head_grads)


def _act_estimate(dd, z, per_ex, B):
    """Average over projections of d·z; per example, ``∂L/∂h_b ≈ d_b z_b / B``."""
    if per_ex:
        w = dd.reshape(*dd.shape, *([1] * (z.dim() - 2)))
        return (w * z).mean(0) / B
    w = dd.reshape(-1, *([1] * (z.dim() - 1)))
    return (w * z).mean(0)


def _row_norm2(us, per_ex):
    if per_ex:
        return sum(u.reshape(u.shape[0], -1).pow(2).sum(1) for u in us)
    return sum(u.pow(2).sum() for u in us)


def _proj_estimate(dd, u, unorm, per_ex, B):
    """``d u / |u|²``, per example (rows of u) when ``per_ex``."""
    if per_ex:
        s = torch.where(unorm > 0, dd / unorm.clamp_min(1e-30), torch.zeros_like(dd)) / B
        return u * s.reshape(-1, *([1] * (u.dim() - 1)))
    s = dd / unorm if float(unorm) > 0 else torch.zeros_like(dd)
    return u * s


# ---------------------------------------------------------------------------------------
# Per-stage building blocks (forward-only pipeline)
# ---------------------------------------------------------------------------------------
def jvp_forward(
    module: nn.Module,
    x: torch.Tensor,
    tangent_in: torch.Tensor | None = None,
    seed: int = 0,
    *,
    keys: Sequence[int] = (),
    n: int | None = None,
    dist: str = "rademacher",
    indices: Sequence[int] | None = None,
    perturb: bool = True,
    vs: Sequence[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Push ``x`` (and its tangent) through ``module`` with the module's own direction ``v``.

    Returns ``(out, out_tangent)``: ``out_tangent = J_x·tangent_in + J_θ·v``. ``v`` is
    regenerated from ``(seed, keys)`` by ``directions`` (with ``indices`` the parameters'
    positions in the whole model, so stages draw what the whole model would), or given as
    ``vs`` (what ``directions`` returned: a pipeline stage draws them once per step and
    reuses them for every microbatch, since drawing costs more than an MLP's forward). With
    ``n`` projections the tangents carry a leading ``n`` dimension (``tangent_in`` of shape
    ``(n, *x.shape)`` or None) and the ``n`` jvps run batched under ``vmap``; ``out`` is the
    same for all of them and is returned once. ``perturb=False`` propagates ``tangent_in``
    only (no parameter tangents are made). Running statistics are frozen (see the module
    doc). After the last stage has turned the tangent into ``d``, ``set_forward_gradient``
    gives each stage its estimate.
    """
    names = [k for k, _ in module.named_parameters()]
    params = [p.detach() for _, p in module.named_parameters()]
    primal = dict(zip(names, params))
    bufs = _buffers(module)
    perturb = perturb and bool(params)
    if perturb and vs is None:
        vs = directions(params, seed, keys, n, dist, indices)
    if tangent_in is None and not perturb:
        tangent_in = torch.zeros((n, *x.shape) if n else x.shape, dtype=x.dtype, device=x.device)

    def f(p, inp):
        return functional_call(module, (p, bufs), (inp,))

    if perturb and tangent_in is None:  # no input tangent: J_θ·v alone, x a constant
        def one(tv):
            return jvp(lambda p: f(p, x), (primal,), (dict(zip(names, tv)),))

        args = (list(vs),)
    elif perturb:
        def one(tv, tx):
            return jvp(f, (primal, x), (dict(zip(names, tv)), tx))

        args = (list(vs), tangent_in)
    else:
        def one(tx):
            return jvp(lambda inp: f(primal, inp), (x,), (tx,))

        args = (tangent_in,)
    with torch.no_grad(), _frozen_stats(module):
        if n is None:
            return one(*args)
        out, tan = vmap(one, randomness="same")(*args)
    return out[0], tan


def set_forward_gradient(
    module: nn.Module,
    d: torch.Tensor | float | Sequence[float],
    seed: int,
    *,
    keys: Sequence[int] = (),
    dist: str = "rademacher",
    indices: Sequence[int] | None = None,
    accumulate: bool = False,
) -> None:
    """Set ``p.grad = mean_k d_k v_k`` for the module's parameters (``v`` regenerated)."""
    params = list(module.parameters())
    c = torch.as_tensor(d, dtype=torch.float32).reshape(-1)
    n = c.numel()
    vs = directions(params, seed, keys, n, dist, indices)
    for p, v in zip(params, vs):
        g = torch.tensordot(c.to(v.device), v.float(), dims=1).div_(n).to(p.dtype)
        if accumulate and p.grad is not None:
            p.grad += g
        else:
            p.grad = g


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------
def auto_projections(model: nn.Module, blocks: Sequence[int] | None = None, last: int = 256) -> tuple[int, ...]:
    """Projections per block that work with a random guess: 1 per block, ``last`` on the last.

    The last block's jvps run through that block alone, so its many projections cost little;
    they train the read-out (measured on the MNIST MLP: 0.87 after 10 epochs, against 0.32
    for one global direction). Use with ``scope='block'``.
    """
    n = len(param_blocks(model, blocks))
    return (int(last),) if n == 1 else (1,) * (n - 1) + (int(last),)


class ForwardGradient:
    """A model trained by forward gradients: estimator options, local heads, step counter.

    ``step(x, y, optimizer)`` estimates the gradient, writes it to the parameters' ``.grad``
    and calls ``optimizer.step()`` (any ``torch.optim`` optimizer or
    ``brigade.stages.fg_optim.FGOptimizer``); the local heads, if any, take a step of their
    own optimizer (Adam, ``head_lr``) on their local losses. Directions of step ``t`` use
    keys ``(t,)``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        *,
        guess: str = "random",
        projections: int = 1,
        dist: str = "rademacher",
        mode: str = "weight",
        scope: str | None = None,
        seed: int = 0,
        blocks: Sequence[int] | None = None,
        heads: LocalHeads | None = None,
        head_lr: float = 1e-3,
        num_classes: int | None = None,
        chunk_size: int | None = None,
        per_example: bool = True,
    ) -> None:
        if isinstance(projections, str):
            if projections.strip().lower() != "auto":
                raise ConfigError(f"projections must be a number, one number per block, or 'auto'; got {projections!r}")
            if choose("guess", guess, GUESSES) == "random" and choose("perturbation mode", mode, MODES) == "weight":
                projections, scope = auto_projections(model, blocks), scope or "block"
            else:
                projections = 1
        self.guess, self.mode, self.scope, self.dist, self.projections = _check(guess, mode, scope, dist, projections)
        self.model, self.loss_fn, self.seed, self.blocks = model, loss_fn, int(seed), blocks
        self.heads, self.head_lr, self.num_classes = heads, head_lr, num_classes
        self.chunk_size, self.per_example = chunk_size, per_example
        self.head_optimizer = None
        self.t = 0

    def _ensure_heads(self, x: torch.Tensor) -> None:
        if self.guess == "local" and self.heads is None:
            self.heads = LocalHeads(self.model, x, self.num_classes, self.blocks)
        if self.heads is not None and self.head_optimizer is None:
            self.head_optimizer = torch.optim.Adam(self.heads.parameters(), lr=self.head_lr)

    def estimate(self, x: torch.Tensor, y: torch.Tensor, step: int | None = None) -> Estimate:
        self._ensure_heads(x)
        t = self.t if step is None else int(step)
        return forward_gradient(
            self.model, x, y, self.loss_fn,
            projections=self.projections, dist=self.dist, guess=self.guess, mode=self.mode,
            scope=self.scope, seed=self.seed, keys=(t,), heads=self.heads, blocks=self.blocks,
            chunk_size=self.chunk_size, per_example=self.per_example,
        )

    def step(self, x: torch.Tensor, y: torch.Tensor, optimizer, step: int | None = None) -> dict:
        if step is not None:
            self.t = int(step)
        est = self.estimate(x, y)
        for p, g in zip(self.model.parameters(), est.grads):
            p.grad = g
        optimizer.step()
        if est.head_grads is not None and self.head_optimizer is not None:
            for p, g in zip(self.heads.parameters(), est.head_grads):
                p.grad = g
            self.head_optimizer.step()
        self.t += 1
        out = {"loss": est.loss, "d_abs": float(torch.cat([t.reshape(-1) for t in est.d]).abs().mean())}
        if est.local_losses:
            out["local_loss"] = sum(est.local_losses) / len(est.local_losses)
        return out


_TRAINERS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, ForwardGradient]]" = weakref.WeakKeyDictionary()


def fg_train_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable,
    optimizer,
    guess: str = "random",
    projections: int | Sequence[int] | str = 1,
    seed: int = 0,
    *,
    step: int | None = None,
    dist: str = "rademacher",
    mode: str = "weight",
    scope: str | None = None,
    blocks: Sequence[int] | None = None,
    head_lr: float = 1e-3,
) -> dict:
    """One forward-gradient training step of ``model`` on ``(x, y)``; returns ``{"loss": ...}``.

    Keeps a ``ForwardGradient`` per model (its local heads and step counter) between calls;
    a call with different options starts a fresh one. ``step`` overrides the counter (the
    directions of step t are fixed by ``(seed, t)``). ``projections='auto'`` picks
    ``auto_projections`` (block scope) for the random guess, the setting measured to work;
    pair it with ``fg_optim.make_optimizer('adam', params, guess=guess)``.
    """
    cfg = (guess, tuple(projections) if isinstance(projections, (list, tuple)) else projections, int(seed), dist, mode, scope, tuple(blocks) if blocks else None, head_lr, id(loss_fn))
    entry = _TRAINERS.get(model)
    if entry is None or entry[0] != cfg:
        entry = (cfg, ForwardGradient(
            model, loss_fn, guess=guess, projections=projections, dist=dist, mode=mode,
            scope=scope, seed=seed, blocks=blocks, head_lr=head_lr,
        ))
        _TRAINERS[model] = entry
    return entry[1].step(x, y, optimizer, step=step)
