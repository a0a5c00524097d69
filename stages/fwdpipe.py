"""Forward-only pipeline stages: forward gradients with only scalars travelling backward.

The single-process estimator (``brigade.stages.fwdgrad``) pushes a random direction ``v``
through the whole model with forward-mode AD and reads ``d = ∇L·v``; ``g = d·v``. Cut the
model into stages and the same computation pipelines (the ``fwdgrad`` schedule):

- ``F`` (``forward``): the stage receives ``(h, t)``, the activation and its tangent, and
  sends on ``(h', t') = (f(h), J_h·t + J_θ·v)``, with ``v`` its own parameters' directions,
  drawn from the shared seed at the parameters' positions in the *whole* model. The last
  stage then reads the loss and ``d = ∇_out L·t'``, one number per projection.
- ``D`` (``accumulate``): ``d`` (times the microbatch's share ``n_j / N`` of the batch)
  comes back to every stage, a tensor of ``projections`` numbers whatever the model size,
  and is added to the step's coefficients.
- ``U`` (``update``): ``g = mean_k c_k v_k`` with ``v`` regenerated, then the optimizer
  steps. Directions of step ``t`` use keys ``(t,)``, ``t`` the number of updates so far.

So the stages draw exactly the directions the whole-model estimator draws, and ``d`` is the
whole model's directional derivative: with one microbatch a pipelined step equals
``ForwardGradient.step`` with the same seed, projections, distribution and scope (to float
rounding); with several, ``d`` is the batch mean's, accumulated over microbatches.

Units and tangent rows. ``scope='global'`` has one unit (every parameter, ``n`` rows of
tangent from the first stage on). ``scope='block'`` (the default with
``projections='auto'``) gives each block of ``param_blocks(model)`` its own ``n_k``
directions: block k's rows start at block k (zero tangent before it) and ride along to the
loss, so the tangent entering a stage holds the rows of every unit that has begun, in unit
order. A stage runs one jvp per run of its children that belong to one unit: the unit's own
rows with its directions, and the earlier units' rows with the input tangent alone.

What a stage keeps: no activations. Between its first forward of a step and its update it
holds that step's directions (drawn once, reused for every microbatch: drawing costs more
than an MLP's forward) and the accumulated coefficients; both are parameter-sized or
smaller, and could be regenerated from ``(seed, t)`` at any time.

BatchNorm: each microbatch's forward moves the running statistics once (a plain forward of
the stage), and the jvps normalise with the batch statistics without moving them, as in
the single-process estimator. Optimizer options that look at all parameters at once (the
``clip_norm`` of ``fg_optim``) act per stage here. Not pipelined: activation perturbation.

The local guess (``guess='local'``, Fournier et al. 2023) pipelines by *units*: a unit is
a group of consecutive blocks scored by one auxiliary head (``make_head``). ``F`` computes
each unit's guess ``u``, the gradient of its head's loss (backprop inside the unit only, its
input detached), and sends on ``(h', [J_h·t ; J_θ·u])``: the earlier units' rows pushed
through, plus one row per unit of its own. The model's last unit has an exact gradient (the
real loss is local there); the last stage sends back ``d``, one number per earlier unit (∇L
along that unit's guess, times ``n_j / N``), and ``D`` adds ``(d / |u|²) u`` to each unit's
gradient: the projection of the true gradient on the guess. ``u`` depends on the
microbatch, so a stage keeps it (parameter-sized) from F to D. The units: ``blocks``
(children per unit, cut by the stages), or by default one per stage; a pipeline of one
stage, where that one unit would get the exact gradient (plain backprop), takes one unit
per block (``param_blocks``), as the single-process estimator does. With one microbatch a
step equals ``ForwardGradient(guess='local', blocks=...)`` with the same units (the heads
trained alike, Adam at ``head_lr``); with several, each microbatch's estimate is its own
guess's projection, weighted by its share.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from torch.func import jvp, vmap

from .errors import ConfigError, choose
from . import handlers
from .base import StageBase
from .fg_directions import DISTRIBUTIONS, directions
from .fg_estimator import _check, _frozen_stats, _has_running_stats, _unit_counts, jvp_forward
from .fg_trainer import auto_projections
from .heads import make_head, param_blocks
from .method_cost import FWDGRAD_COST
from .rules import CostHooks, Exposure, Message, MethodSpec, activation_size, register_method
from .stage import OptimizerFactory, StageSpec

__all__ = ["ForwardGradientStage", "ForwardGradientOptions", "stage_options", "PIPELINE_OPTIONS"]


# What a user may set for the pipelined estimator (Pipeline(..., method="fwdgrad", **these)).
PIPELINE_OPTIONS = ("projections", "scope", "blocks", "dist", "seed", "guess")


def stage_options(
    model: nn.Module,
    projections: int | Sequence[int] | str = 1,
    scope: str | None = None,
    blocks: Sequence[int] | None = None,
    dist: str = "rademacher",
    seed: int = 0,
    guess: str = "random",
    **unknown: Any,
) -> dict[str, Any]:
    """The options every ``ForwardGradientStage`` of ``model`` is built with.

    Takes the single-process estimator's options (``ForwardGradient``: ``projections`` an
    integer, one count per block, or ``'auto'``; ``scope``; ``blocks``; ``dist``; ``seed``)
    and resolves them on the whole model, once, so that every stage agrees on the units,
    their projections and each parameter's position.
    """
    if unknown:
        raise ConfigError(
            f"method fwdgrad takes no option {', '.join(sorted(unknown))}; its options: "
            f"{', '.join(PIPELINE_OPTIONS)}"
        )
    if choose("guess", guess, ("random", "local")) == "local":
        from .rules import num_classes_of

        # each unit's guess is its own head's gradient: nothing to resolve on the whole
        # model but the heads' class count and, with ``blocks``, each child's unit
        if blocks is not None:
            param_blocks(model, blocks)  # checks that they cover the model's children
        units = None if blocks is None else [k for k, b in enumerate(blocks) for _ in range(b)]
        return {"counts": (), "param_units": [], "child_params": [], "seed": int(seed),
                "dist": dist, "guess": "local", "num_classes": num_classes_of(model, "fwdgrad"),
                "child_units": units, "num_units": None if blocks is None else len(blocks)}
    if isinstance(projections, str):
        if projections.strip().lower() != "auto":
            raise ConfigError(
                f"projections must be a number, one number per block, or 'auto'; got {projections!r}"
            )
        projections, scope = auto_projections(model, blocks), scope or "block"
    _, _, scope, dist, n = _check("random", "weight", scope, dist, projections)
    params = list(model.parameters())
    if scope == "global":
        counts, units = (n,), [0] * len(params)  # _check gives one int for the global scope
    else:
        bl = param_blocks(model, blocks)
        counts = tuple(_unit_counts(n, len(bl)))
        units = [0] * len(params)
        for k, b in enumerate(bl):
            for i in b.index:
                units[i] = k
    children = list(model.children()) if isinstance(model, nn.Sequential) else [model]
    return {
        "counts": counts,
        "param_units": units,
        "child_params": [sum(1 for _ in c.parameters()) for c in children],
        "seed": int(seed),
        "dist": dist,
    }


@dataclass
class _Segment:
    """Consecutive children of a stage whose parameters belong to one unit."""

    module: nn.Module
    unit: int | None  # None: no parameters (yet)
    index: list[int]  # the parameters' positions in the whole model


@dataclass
class _LocalUnit:
    """Consecutive children of a stage scored by one head (the local guess's unit)."""

    module: nn.Module
    unit: int  # its number in the whole model: its row of tangent, its entry of d
    index: list[int]  # the parameters' positions in the stage


class ForwardGradientStage(StageBase):
    """A slice of the model trained by forward gradients, driven by ``F``, ``D`` and ``U``."""

    def __init__(
        self,
        module: nn.Module,
        spec: StageSpec,
        optimizer_factory: OptimizerFactory | None = None,
        loss_fn: nn.Module | None = None,
        device: torch.device | str = "cpu",
        *,
        counts: Sequence[int],
        param_units: Sequence[int],
        child_params: Sequence[int],
        seed: int = 0,
        dist: str = "rademacher",
        guess: str = "random",
        num_classes: int | None = None,
        pool: int = 2,
        head_lr: float = 1e-3,
        child_units: Sequence[int] | None = None,
        num_units: int | None = None,
    ) -> None:
        self._setup(module, spec, optimizer_factory, loss_fn, device)
        self.guess = choose("guess", guess, ("random", "local"))
        if self.guess == "local":
            self._init_local(num_classes, pool, head_lr, child_units, num_units)
        self.counts = tuple(int(c) for c in counts)
        self.row_start = [sum(self.counts[:u]) for u in range(len(self.counts))]
        self.rows = sum(self.counts)  # numbers in d: one per projection of every unit
        self.seed, self.dist = int(seed), choose("direction distribution", dist, DISTRIBUTIONS)
        self.segments = [] if self.guess == "local" else self._segments(list(param_units),
                                                                         list(child_params))
        self.tracks_stats = _has_running_stats(self.module)
        self.t = 0  # updates taken: the key of this step's directions
        self._coef: torch.Tensor | None = None  # Σ_j (n_j/N) d_j of this step
        self._vs: dict[int, list[torch.Tensor]] = {}  # segment -> this step's directions

    def _segments(self, param_units: list[int], child_params: list[int]) -> list[_Segment]:
        """Group the stage's children into runs of one unit each (see the module doc)."""
        named = list(self.module.named_children()) if isinstance(self.module, nn.Sequential) \
            else [("0", self.module)]
        try:
            first = int(named[0][0]) if named else 0
        except ValueError:
            raise ConfigError(
                f"stage {self.spec.index}: children must be named by their index in the whole "
                f"model (make_stage_module), got {named[0][0]!r}"
            ) from None
        offset = sum(child_params[:first])
        groups: list[tuple[int | None, list[nn.Module], list[int]]] = []
        for name, child in named:
            k = sum(1 for _ in child.parameters())
            if k != child_params[int(name)]:
                raise ConfigError(
                    f"stage {self.spec.index}: block {name} has {k} parameter tensors, the "
                    f"whole model's block {name} {child_params[int(name)]}; build the stages "
                    "from the model the options were made for"
                )
            index = list(range(offset, offset + k))
            offset += k
            units = {param_units[i] for i in index}
            if len(units) > 1:
                raise ConfigError(f"stage {self.spec.index}: block {name} spans units "
                                  f"{sorted(units)}; give blocks as whole children")
            unit = units.pop() if units else None
            if groups and (unit is None or groups[-1][0] in (None, unit)):
                u, mods, idx = groups[-1]
                groups[-1] = (unit if u is None else u, mods + [child], idx + index)
            else:
                groups.append((unit, [child], index))
        return [
            _Segment(mods[0] if len(mods) == 1 else nn.Sequential(*mods), unit, idx)
            for unit, mods, idx in groups
        ]

    # -- F ----------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(
        self,
        mb: int,
        x: torch.Tensor | tuple[torch.Tensor, torch.Tensor | None],
        target: torch.Tensor | None = None,
        weight: float = 1.0,
        label: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Push ``x`` = ``h`` or ``(h, tangent)`` through the stage with its directions.

        Returns ``(h', tangent')`` for the next stage; on the last stage ``(loss, d)``,
        both scaled by ``weight`` (the microbatch's share of the batch): ``d`` has one
        number per row of tangent (``sum(counts)``).
        """
        h, t = x if isinstance(x, tuple) else (x, None)
        h = h.to(self.device)
        t = None if t is None else t.to(self.device)
        if self.guess == "local":
            return self._forward_local(mb, h, t, target, weight, label)
        if self.module.training and self.tracks_stats:
            self.module(h)  # the running statistics move once per microbatch
        for i, seg in enumerate(self.segments):
            h, t = self._push(i, seg, h, t)
        if not self.spec.is_last:
            return h, t
        if target is None:
            raise ConfigError(f"stage {self.spec.index}: last stage forward needs a target")
        loss, d = self._loss_and_d(h, t, target.to(self.device))
        loss, d = loss * weight, d * weight
        self._losses.append(float(loss))
        return loss, d

    def _push(self, i: int, seg: _Segment, h: torch.Tensor, t: torch.Tensor | None):
        """One segment: its unit's rows get its directions, earlier units' rows ride along."""
        n = self.counts[seg.unit] if seg.unit is not None else 0
        present = 0 if t is None else t.shape[0]
        if n == 0:
            if t is None:
                with _frozen_stats(seg.module):
                    return seg.module(h), None
            return jvp_forward(seg.module, h, t, n=present, perturb=False)
        start = self.row_start[seg.unit]
        if present == start:
            other, mine = t, None
        elif present == start + n:
            other, mine = (t[:start] if start else None), t[start:]
        else:
            raise ConfigError(
                f"stage {self.spec.index}: the tangent entering unit {seg.unit} has {present} "
                f"rows, expected {start} or {start + n}; every stage must be built with the "
                "same projections"
            )
        out, tan = jvp_forward(seg.module, h, mine, n=n, vs=self._directions(i, seg))
        if other is not None and other.shape[0]:
            _, before = jvp_forward(seg.module, h, other, n=other.shape[0], perturb=False)
            tan = torch.cat([before, tan])
        return out, tan

    def _loss_and_d(self, out: torch.Tensor, t: torch.Tensor | None, y: torch.Tensor):
        """The mean loss and its directional derivative along every row of tangent."""

        def loss(o):
            return self.loss_fn(o, y)

        value = loss(out)
        if t is None or t.shape[0] == 0:
            return value, torch.zeros(0, device=out.device)
        d = vmap(lambda tt: jvp(loss, (out,), (tt,))[1], randomness="same")(t)
        return value, d.reshape(-1)

    def _directions(self, i: int, seg: _Segment) -> list[torch.Tensor]:
        """This step's directions of segment ``i``, drawn on first use and kept until U."""
        if i not in self._vs:
            params = list(seg.module.parameters())
            self._vs[i] = directions(params, self.seed, (self.t,), self.counts[seg.unit],
                                     self.dist, indices=seg.index)
        return self._vs[i]

    # -- D ----------------------------------------------------------------------------------
    def accumulate(self, mb: int, d: torch.Tensor) -> None:
        """Add microbatch ``mb``'s scaled ``d`` to the step's coefficients."""
        d = torch.as_tensor(d).reshape(-1).to(self.device, torch.float32)
        if self.guess == "local":
            self._accumulate_local(mb, d)
            return
        if d.numel() != self.rows:
            raise ConfigError(
                f"stage {self.spec.index}: d of microbatch {mb} has {d.numel()} numbers, "
                f"expected {self.rows} (projections per unit {list(self.counts)})"
            )
        if self._coef is None:
            self._coef = torch.zeros(self.rows, device=self.device)
        self._coef.add_(d)

    # -- U ----------------------------------------------------------------------------------
    def update(self) -> None:
        """``p.grad = mean_k c_k v_k`` for every parameter, then one optimizer step."""
        if self.guess == "local":
            self._update_local()
            return
        coef = self._coef if self._coef is not None else torch.zeros(self.rows, device=self.device)
        for i, seg in enumerate(self.segments):
            if seg.unit is None:
                continue
            params = list(seg.module.parameters())
            n = self.counts[seg.unit]
            if n == 0:  # a frozen unit: a zero gradient, as the single-process estimate
                for p in params:
                    p.grad = torch.zeros_like(p)
                continue
            c = coef[self.row_start[seg.unit]: self.row_start[seg.unit] + n] / n
            for p, v in zip(params, self._directions(i, seg)):
                p.grad = torch.tensordot(c.to(v.device), v.float(), dims=1).to(p.dtype)
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.t += 1
        self._coef, self._vs = None, {}

    # -- bookkeeping --------------------------------------------------------------------------
    def state_dict_extra(self) -> dict[str, Any]:
        """The step counter (the directions' key; the seed comes with the options); with
        the local guess also each unit's head and its optimizer."""
        if self.guess != "local":
            return {"t": self.t}
        return {"t": self.t,
                "heads": {u: {"shape": shape, "head": self.heads[u].state_dict(),
                              "optimizer": self.head_optimizers[u].state_dict()}
                          for u, shape in self._head_shapes.items()}}

    def load_state_dict_extra(self, state: dict[str, Any]) -> None:
        self.t = int(state["t"])
        self._coef, self._vs = None, {}
        for u, saved in state.get("heads", {}).items():
            u = int(u)
            if u not in self.heads:
                self._build_head(u, tuple(saved["shape"]))
            self.heads[u].load_state_dict(saved["head"])
            self.head_optimizers[u].load_state_dict(saved["optimizer"])

    # -- the local guess (Fournier et al. 2023), one unit per block group ---------------------
    def _init_local(self, num_classes: int | None, pool: int, head_lr: float,
                    child_units: Sequence[int] | None, num_units: int | None) -> None:
        """Each unit's guess is its own head's gradient (the model's last unit's: the true
        one). The units are the stage's blocks of ``child_units`` (the ``blocks`` option);
        without it one unit per stage, or, on a pipeline of one stage (where one unit would
        be the exact gradient: backprop), one per block of ``param_blocks``, as the
        single-process estimator."""
        self.units, self.num_units = self._local_units(child_units, num_units)
        if any(u.unit < self.num_units - 1 for u in self.units) and not (
                isinstance(num_classes, int) and num_classes > 0):
            raise ConfigError(f"stage {self.spec.index}: the local guess needs num_classes, "
                              f"a positive integer; got {num_classes!r}")
        self.num_classes, self.pool, self.head_lr = num_classes, int(pool), float(head_lr)
        self.head_loss = nn.CrossEntropyLoss()
        self.heads: dict[int, nn.Module] = {}  # unit -> its auxiliary head
        self.head_optimizers: dict[int, torch.optim.Optimizer] = {}
        self._head_shapes: dict[int, tuple[int, ...]] = {}
        self._guesses: dict[tuple[int, int], tuple[list[torch.Tensor], float]] = {}
        self._grad: list[torch.Tensor] | None = None  # Σ_j (w_j d_j / |u_j|²) u_j per unit

    def _local_units(self, child_units: Sequence[int] | None,
                     num_units: int | None) -> tuple[list[_LocalUnit], int]:
        """The stage's units (consecutive children of one block) and the model's unit count."""
        position = {id(p): i for i, p in enumerate(self.module.parameters())}

        def unit(module: nn.Module, k: int) -> _LocalUnit:
            return _LocalUnit(module, k, [position[id(p)] for p in module.parameters()])

        if child_units is None:
            if self.spec.num_stages > 1:
                return [unit(self.module, self.spec.index)], self.spec.num_stages
            blocks = param_blocks(self.module)
            return [unit(b.module, k) for k, b in enumerate(blocks)], len(blocks)
        named = list(self.module.named_children()) if isinstance(self.module, nn.Sequential) \
            else [("0", self.module)]
        first, last = int(named[0][0]), int(named[-1][0])
        for i, j in ((first - 1, first), (last, last + 1)):
            if 0 <= i and j < len(child_units) and child_units[i] == child_units[j]:
                raise ConfigError(
                    f"stage {self.spec.index}: local-guess block {child_units[j]} spans "
                    f"children {i} and {j}, which are on different stages; give blocks that "
                    "the stage cut does not split (blocks=..., balance=...)")
        groups: list[tuple[int, list[nn.Module]]] = []
        for name, child in named:
            k = child_units[int(name)]
            if groups and groups[-1][0] == k:
                groups[-1][1].append(child)
            else:
                groups.append((k, [child]))
        return ([unit(mods[0] if len(mods) == 1 else nn.Sequential(*mods), k)
                 for k, mods in groups], int(num_units))

    def _build_head(self, unit: int, shape: tuple[int, ...]) -> None:
        """Unit ``unit``'s auxiliary head (``make_head``), from a seed of its own; Adam at
        ``head_lr`` trains it on its local loss, as the single-process estimator does."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + unit + 1)
            self.heads[unit] = make_head(shape, self.num_classes, self.pool).to(self.device)
        self._head_shapes[unit] = tuple(shape)
        self.head_optimizers[unit] = torch.optim.Adam(self.heads[unit].parameters(),
                                                      lr=self.head_lr)

    def _forward_local(self, mb: int, h: torch.Tensor, t: torch.Tensor | None,
                       target: torch.Tensor | None, weight: float,
                       label: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit by unit: its local loss and that loss's gradient u (input detached:
        backprop inside the unit only), then the tangent: the earlier units' rows pushed
        through, and the unit's own row ``J_θ·u``. The model's last unit has an exact
        gradient (the real loss is local there); the last stage returns ``(loss, d)``, d
        holding ∇L along each earlier unit's guess, times ``weight`` (the share)."""
        if self.spec.is_last and target is None:
            raise ConfigError(f"stage {self.spec.index}: last stage forward needs a target")
        label = target if label is None else label  # the last stage's heads score the target
        for unit in self.units:
            exact = unit.unit == self.num_units - 1
            if not exact and label is None:
                raise ConfigError(f"stage {self.spec.index}: the local guess needs the "
                                  "microbatch's labels (label=...)")
            h, t = self._push_local(mb, unit, h, t, weight, target if exact else None, label)
        if not self.spec.is_last:
            return h, t
        loss, d = self._loss_and_d(h, t, target.to(self.device))
        self._losses.append(float(loss * weight))
        return loss * weight, d * weight

    def _push_local(self, mb: int, unit: _LocalUnit, h: torch.Tensor, t: torch.Tensor | None,
                    weight: float, target: torch.Tensor | None, label: torch.Tensor | None):
        """One unit: its gradient (exact with ``target``, else its head's guess, kept
        until D), and ``(h', tangent')``."""
        params = list(unit.module.parameters())
        inp = h.detach()
        with torch.enable_grad():
            out = unit.module(inp)  # the running statistics move once, here
            if target is not None:
                loss = self.loss_fn(out, target.to(self.device)) * weight
                grads = torch.autograd.grad(loss, params, allow_unused=True) if params else ()
            else:
                if unit.unit not in self.heads:
                    self._build_head(unit.unit, tuple(out.shape[1:]))
                heads = list(self.heads[unit.unit].parameters())
                grads = torch.autograd.grad(
                    self.head_loss(self.heads[unit.unit](out), label.to(self.device)),
                    params + heads, allow_unused=True)
        before = None
        if t is not None and t.shape[0]:
            _, before = jvp_forward(unit.module, inp, t, n=t.shape[0], perturb=False)
        out = out.detach()
        if target is not None:
            self._add(unit, [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)])
            return out, before
        u = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params)]
        for p, g in zip(heads, grads[len(params):]):  # the head learns its local loss
            if g is not None:
                p.grad = g * weight if p.grad is None else p.grad + g * weight
        self._guesses[(mb, unit.unit)] = (u, sum(float(x.double().pow(2).sum()) for x in u))
        self.peak_stored_bytes = max(self.peak_stored_bytes, self.stored_bytes())
        if params:
            _, own = jvp_forward(unit.module, inp, None, n=1, vs=[x.unsqueeze(0) for x in u])
        else:
            own = torch.zeros((1, *out.shape), dtype=out.dtype, device=out.device)
        return out, own if before is None else torch.cat([before, own])

    def _add(self, unit: _LocalUnit, grads: list[torch.Tensor]) -> None:
        """Add a unit's gradient estimate into the stage's sum over the step."""
        if self._grad is None:
            self._grad = [torch.zeros_like(p) for p in self.module.parameters()]
        for i, g in zip(unit.index, grads):
            self._grad[i].add_(g)

    def _accumulate_local(self, mb: int, d: torch.Tensor) -> None:
        """D: ``g += (w_j d_j / |u_j|²) u_j`` for each of the stage's guessed units, d_j
        the last stage's derivative along that unit's guess (the exact unit is done)."""
        if d.numel() != self.num_units - 1:
            raise ConfigError(f"stage {self.spec.index}: d of microbatch {mb} has {d.numel()} "
                              f"numbers, expected {self.num_units - 1} (one per unit but the "
                              "last)")
        for unit in self.units:
            if unit.unit == self.num_units - 1:
                continue
            u, norm2 = self._guesses.pop((mb, unit.unit))
            scale = float(d[unit.unit]) / norm2 if norm2 > 0 else 0.0
            self._add(unit, [x * scale for x in u])

    def _update_local(self) -> None:
        """Step the stage with its accumulated estimate, and the heads with their gradients."""
        params = list(self.module.parameters())
        grads = self._grad or [torch.zeros_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.to(p.dtype)
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        for opt in self.head_optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        self._grad = None
        self.t += 1

    def stored_bytes(self) -> int:
        """Bytes held for pending D actions: the local guess keeps each in-flight
        microbatch's u (parameter-sized) until its d comes back; the random guess nothing."""
        if self.guess != "local":
            return 0
        return sum(x.numel() * x.element_size() for u, _ in self._guesses.values() for x in u)


# -- the declaration of fwdgrad (brigade.stages.rules) -----------------------------------------
@dataclass(frozen=True)
class ForwardGradientOptions:
    """The pipelined estimator's options (``Pipeline(method="fwdgrad", projections=...)``);
    ``stage_options`` resolves them on the whole model."""

    projections: Any = field(default="auto", metadata={
        "flag": "--projections", "default_help": "auto",
        "help": "directions per step: an integer, or auto (one per block, many on the last)"})
    guess: str = field(default="random", metadata={
        "flag": "--guess", "choices": ("random", "local"), "plural": "guesses",
        "help": "direction guesses: random, or from local auxiliary losses (a head per "
                "stage; per block on one stage)"})
    scope: str | None = field(default=None, metadata={"help": "global or block"})
    blocks: tuple[int, ...] | None = field(default=None,
                                           metadata={"help": "children per block"})
    dist: str = field(default="rademacher", metadata={"help": "rademacher or gaussian"})
    seed: int = field(default=0, metadata={"help": "seed of the shared directions"})

    def __post_init__(self) -> None:
        """``projections``: a positive integer, one count per block, or ``"auto"``."""
        object.__setattr__(self, "guess", choose("guess", self.guess, ("random", "local")))
        n = self.projections
        if isinstance(n, str):
            text = n.strip().lower()
            if text != "auto" and not (text.isdigit() and int(text) >= 1):
                raise ConfigError(f"projections must be a number, one number per block, or "
                                  f"'auto'; got {n!r} (--projections 8, or auto)")
            object.__setattr__(self, "projections", text if text == "auto" else int(text))
        elif isinstance(n, bool) or (isinstance(n, int) and n < 1):
            raise ConfigError(f"projections must be a number >= 1, one number per block, or "
                              f"'auto'; got {n!r} (--projections 8, or auto)")


def _prepare(options: ForwardGradientOptions, model: nn.Module, schedule: Any) -> dict[str, Any]:
    """Units, projections and parameter positions, resolved once on the whole model."""
    return stage_options(model, **{f: getattr(options, f) for f in PIPELINE_OPTIONS})


def _optimizer_factory(name: str, lr: float | None, config: Any, total_steps: int):
    """Forward gradients' optimizers come from ``fg_optim`` (their measured defaults), with
    the job's weight decay, clipping, cosine schedule and warm-up."""
    from . import fg_optim

    optim = config.optim
    extra: dict[str, Any] = {}
    if optim.weight_decay is not None:
        extra["weight_decay"] = optim.weight_decay
    if optim.clip_grad_norm is not None:
        extra["clip_norm"] = optim.clip_grad_norm
    if optim.lr_schedule == "cosine":
        extra.update(decay="cosine", total_steps=total_steps)
    if optim.warmup_steps:
        extra["warmup"] = optim.warmup_steps
    return functools.partial(fg_optim.make_optimizer, name, lr=lr,
                             guess=config.rule_options.guess, **extra)


def _check_training(config: Any) -> None:
    """fg_optim's schedules are constant and cosine: refuse the step schedule up front."""
    if config.optim.lr_schedule == "step":
        raise ConfigError("--lr-schedule step is not a forward-gradient schedule; use "
                          "constant or cosine with fwdgrad")


def _fg_names() -> tuple[str, ...]:
    from .fg_optim import OPTIMIZERS

    return tuple(OPTIMIZERS)


def _run_f(port: handlers.Port, a) -> None:
    """F: push (h, tangent) on; the last stage sends d to every stage.

    Evaluation runs the plain forward. d is already scaled by the microbatch's share
    n_j / N, so the stages' sums over a step are the batch mean's derivative.
    """
    if not port.training:
        handlers.evaluate(port, a)
        return
    s, j = a.stage, a.microbatch
    x = port.take(("x", s, j))
    if s < port.num_stages - 1:
        label, weight = handlers.take_label(port, s, j)  # the local guess's heads
        port.send(a, ("x", s + 1, j), port.stage(s).forward(j, x, None, weight, label=label))
        return
    target, weight = port.take(("y", j))
    loss, d = port.stage(s).forward(j, x, target, weight)
    port.loss(j, float(loss))
    for dest in range(port.num_stages):
        port.send(a, ("d", dest, j), d)


def _needs_d(port: handlers.Port, a) -> list:
    return [("d", a.stage, a.microbatch)]


def _run_d(port: handlers.Port, a) -> None:
    """D: add the scalars d of this microbatch to the step's sum."""
    port.stage(a.stage).accumulate(a.microbatch, port.take(("d", a.stage, a.microbatch)))


def _tangent_size(shape: tuple[int, ...], options: Any) -> int | None:
    """h and its r rows of tangent; r = the projections of the units begun so far (an
    integer count: that many; per block or 'auto': depends on the model)."""
    n = getattr(options, "projections", 1)
    return (1 + n) * activation_size(shape) if isinstance(n, int) else None


def _d_size(shape: tuple[int, ...], options: Any) -> int | None:
    n = getattr(options, "projections", 1)
    return n if isinstance(n, int) else None


def _exposure(stage: int, stages: int, options: Any) -> Exposure:
    """Only d = ∇L·v, a projection of the gradient on the directions, comes back: no stage
    is shown dL/dh. The local guess shows every stage the labels (its head's targets)."""
    local = getattr(options, "guess", "random") == "local"
    return Exposure(inputs=stage == 0, labels=local or stage == stages - 1,
                    true_gradients=False)


register_method(MethodSpec(
    name="fwdgrad", order=50, stage_class=ForwardGradientStage, schedules=("fwdgrad",),
    handlers={"F": handlers.Handler(_run_f, handlers.forward.needs),
              "D": handlers.Handler(_run_d, _needs_d, frees=True), "U": handlers.update},
    options=ForwardGradientOptions, prepare=_prepare, default_optimizer=("adam", None),
    default_lr_schedule="cosine",  # a constant Adam step random-walks the noisy blocks
    optimizers=_fg_names(), optimizer_kind="forward-gradient",
    optimizer_factory=_optimizer_factory, check_training=_check_training,
    forward=(Message("(h, tangent rows)", "(1+r)·B·F", _tangent_size),),
    backward=(Message("d = ∇L·v, last stage -> every stage", "R", _d_size),),
    exposure=_exposure, config_fields=("seed",), costs=CostHooks(balancer=FWDGRAD_COST),
    no_autocast="its forward is a torch.func.jvp",
    summary="forward gradients: tangents ride forward, only d = ∇L·v comes back",
    reference="Baydin et al. 2022 (arXiv 2202.08587); local guess: Fournier et al. 2023"))
