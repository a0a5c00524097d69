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
the single-process estimator. Not pipelined: the local guess (its directions depend on the
data, so they would have to be kept per microbatch; use the single-process estimator) and
activation perturbation. Optimizer options that look at all parameters at once (the
``clip_norm`` of ``fg_optim``) act per stage here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from torch.func import jvp, vmap

from .errors import ConfigError, choose
from .fg_directions import DISTRIBUTIONS, directions
from .fg_estimator import _check, _frozen_stats, _has_running_stats, _unit_counts, jvp_forward
from .fg_trainer import auto_projections
from .heads import param_blocks
from .stage import OptimizerFactory, StageSpec, place_stage

__all__ = ["ForwardGradientStage", "stage_options", "PIPELINE_OPTIONS"]


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
        raise ConfigError(
            "guess='local' is not pipelined (its directions depend on each microbatch's data, "
            "so stages would have to keep them); run it in one process: `brigade train "
            "--method fwdgrad --guess local --stages 1 --backend local`"
        )
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


class ForwardGradientStage:
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
    ) -> None:
        self.module, self.spec, self.loss_fn = module, spec, loss_fn
        self.device, self.optimizer = place_stage(module, spec, optimizer_factory, loss_fn, device)
        self.counts = tuple(int(c) for c in counts)
        self.row_start = [sum(self.counts[:u]) for u in range(len(self.counts))]
        self.rows = sum(self.counts)  # numbers in d: one per projection of every unit
        self.seed, self.dist = int(seed), choose("direction distribution", dist, DISTRIBUTIONS)
        self.segments = self._segments(list(param_units), list(child_params))
        self.tracks_stats = _has_running_stats(self.module)
        self.t = 0  # updates taken: the key of this step's directions
        self._coef: torch.Tensor | None = None  # Σ_j (n_j/N) d_j of this step
        self._vs: dict[int, list[torch.Tensor]] = {}  # segment -> this step's directions
        self._losses: list[float] = []
        self.peak_stored_bytes = 0  # no activations are kept for a backward

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
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Push ``x`` = ``h`` or ``(h, tangent)`` through the stage with its directions.

        Returns ``(h', tangent')`` for the next stage; on the last stage ``(loss, d)``,
        both scaled by ``weight`` (the microbatch's share of the batch): ``d`` has one
        number per row of tangent (``sum(counts)``).
        """
        h, t = x if isinstance(x, tuple) else (x, None)
        h = h.to(self.device)
        t = None if t is None else t.to(self.device)
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

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Forward-only evaluation: no tangent, nothing kept."""
        return self.module(x.to(self.device))

    # -- D ----------------------------------------------------------------------------------
    def accumulate(self, mb: int, d: torch.Tensor) -> None:
        """Add microbatch ``mb``'s scaled ``d`` to the step's coefficients."""
        d = torch.as_tensor(d).reshape(-1).to(self.device, torch.float32)
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
    def pop_losses(self) -> list[float]:
        """Scaled losses recorded by the last stage since the previous call."""
        out, self._losses = self._losses, []
        return out

    def stored_bytes(self) -> int:
        """Bytes held for pending backwards: none, there is no backward."""
        return 0

    def state_dict_extra(self) -> dict[str, Any]:
        """The step counter (the directions' key); the seed comes with the options."""
        return {"t": self.t}

    def load_state_dict_extra(self, state: dict[str, Any]) -> None:
        self.t = int(state["t"])
        self._coef, self._vs = None, {}
