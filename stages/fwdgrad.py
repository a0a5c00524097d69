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

The code lives in one module per concept: ``fg_directions`` (directions from a seed),
``heads`` (blocks and auxiliary heads), ``fg_estimator`` (the estimate, ``combine``, the
per-stage pieces) and ``fg_trainer`` (the trainer). This module re-exports them under the
names they always had.
"""

from __future__ import annotations

from .fg_directions import DISTRIBUTIONS, directions, make_generator, mix_seed, sample
from .fg_estimator import (  # noqa: F401 - private names kept for code written against them
    GUESSES,
    MODES,
    SCOPES,
    Estimate,
    _check,
    _frozen_stats,
    _has_running_stats,
    _unit_counts,
    combine,
    cosine_similarity,
    directional_derivatives,
    forward_gradient,
    jvp_forward,
    set_forward_gradient,
    true_gradient,
)
from .fg_trainer import _TRAINERS, ForwardGradient, auto_projections, fg_train_step  # noqa: F401
from .heads import Block, LocalHeads, make_head, param_blocks

__all__ = [
    "DISTRIBUTIONS",
    "GUESSES",
    "MODES",
    "SCOPES",
    "mix_seed",
    "make_generator",
    "sample",
    "directions",
    "Block",
    "param_blocks",
    "make_head",
    "LocalHeads",
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
