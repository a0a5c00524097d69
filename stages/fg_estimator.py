"""The forward-gradient estimate: loss and directional derivatives by forward-mode AD.

See ``brigade.stages.fwdgrad`` for the method and its options (guess, scope, mode). This
module computes one estimate (``forward_gradient``), the scalars a data-parallel worker
sends (``directional_derivatives``), the gradient a replica rebuilds from scalars
(``combine``), and the per-stage pieces of the forward-only pipeline (``jvp_forward``,
``set_forward_gradient``).
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, jvp, vmap

from .errors import ConfigError, choose
from .fg_directions import DISTRIBUTIONS, directions, make_generator, sample
from .heads import Block, LocalHeads, param_blocks

__all__ = [
    "GUESSES",
    "MODES",
    "SCOPES",
    "Estimate",
    "forward_gradient",
    "directional_derivatives",
    "Drawn",
    "draw",
    "weigh",
    "combine",
    "jvp_forward",
    "set_forward_gradient",
    "cosine_similarity",
    "true_gradient",
]

GUESSES = ("random", "local")
MODES = ("weight", "activation")
SCOPES = ("global", "block")


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


def _run_from(bl: list[Block], k: int, h: torch.Tensor, params_k: dict | None = None) -> torch.Tensor:
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
    drawn: "Drawn | None" = None,
) -> tuple[float, list[torch.Tensor]]:
    """Loss and the directional derivatives along the regenerated random directions.

    Returns ``(loss, d)``: ``d`` is a list with one 1-D tensor per unit (the whole model
    for ``scope='global'``, each block for ``'block'``) holding that unit's ``projections``
    derivatives. This is what a data-parallel worker sends back; ``combine`` turns
    coefficients of these back into a gradient. With ``scope='block'``, ``projections`` may
    be one count per block: a block's jvps run from its input on, so projections on the last
    blocks are cheap, and a small block needs fewer of them for the same noise. A count of 0
    leaves that block out (no direction, no update: the block stays as initialised).
    ``drawn`` (from :func:`draw` with the same seed, keys and settings) skips drawing the
    directions again: several batches along the same directions cost one draw.
    """
    _, _, scope, dist, n = _check("random", "weight", scope, dist, projections)
    loss, d, _ = _weight_random(model, x, y, loss_fn, seed, tuple(keys), n, dist, scope, blocks, chunk_size,
                                update_stats, drawn)
    return loss, d


# Directions of one key, per unit (the whole model, or each block): (parameter indices, one
# tensor (n, *shape) per parameter).
Drawn = list[tuple[list[int], list[torch.Tensor]]]


def draw(
    model: nn.Module,
    *,
    seed: int,
    keys: Sequence[int] = (),
    projections: int | Sequence[int] = 1,
    dist: str = "rademacher",
    scope: str = "global",
    blocks: Sequence[int] | None = None,
) -> Drawn:
    """The directions ``directional_derivatives`` and ``combine`` use for these settings.

    Drawing costs more than a forward pass of an MLP (see :func:`sample`): a process that
    measures several batches along the same directions and then applies the update made of
    them draws once and passes the result around (``drawn=``, :func:`weigh`).
    """
    _, _, scope, dist, n = _check("random", "weight", scope, dist, projections)
    params = list(model.parameters())
    if scope == "global":
        (n,) = _unit_counts(n, 1)
        return [(list(range(len(params))), directions(params, seed, tuple(keys), n, dist))]
    bl = param_blocks(model, blocks)
    counts = _unit_counts(n, len(bl))
    return [
        (b.index, directions(b.params, seed, tuple(keys), nk, dist, indices=b.index) if b.params and nk else [])
        for b, nk in zip(bl, counts)
    ]


def weigh(out: list[torch.Tensor], drawn: Drawn, coefs: Sequence) -> list[torch.Tensor]:
    """``out[i] += Σ_k coefs[u][k] · v[u, k]`` over the units of ``drawn``: ``combine``
    without drawing again. ``coefs`` is laid out like ``d`` (one sequence per unit)."""
    if len(coefs) != len(drawn):
        raise ConfigError(f"weigh got coefficients for {len(coefs)} units; the directions have {len(drawn)}")
    for (idx, vs), c in zip(drawn, coefs):
        c = c.detach().float() if isinstance(c, torch.Tensor) else torch.tensor(np.asarray(c, dtype=np.float32))
        if vs and c.numel():
            _weigh(out, idx, c.reshape(-1), vs)
    return out


def _weight_random(model, x, y, loss_fn, seed, keys, n, dist, scope, blocks, chunk_size, update_stats, drawn=None):
    """``(loss, d, drawn)``: ``drawn`` holds per unit ``(parameter indices, directions)``,
    so a caller that also needs the estimate weighs them without drawing them again
    (drawing costs more than a forward; see :func:`sample`). Directions passed in as
    ``drawn`` are used instead of drawing."""
    params = list(model.parameters())
    if scope == "global":
        (n,) = _unit_counts(n, 1)
        names = [k for k, _ in model.named_parameters()]
        primal = {k: p.detach() for k, p in zip(names, params)}
        bufs = _buffers(model)
        vs = drawn[0][1] if drawn is not None else directions(params, seed, keys, n, dist)
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
    given = drawn
    if given is not None and len(given) != len(bl):
        raise ConfigError(f"drawn directions for {len(given)} units; the model has {len(bl)} blocks")
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
                vs = given[k][1] if given is not None else directions(b.params, seed, keys, nk, dist, indices=b.index)
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

