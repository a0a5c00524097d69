"""PETRA stages: delayed backward through reversible blocks, one weight version, no stash.

PETRA (Rivaud et al., ICLR 2025) decouples the forward and backward passes of a pipeline
of reversible stages. Each tick a stage runs the forward of a new microbatch and the
backward (``reverse``, the schedule's ``R``) of an older one; the backward does not use
stored activations or stashed weights:

- forward (``F``): run the blocks without autograd; a REVERSIBLE block keeps nothing; a
  non-reversible block (stem, ``Downsample``, head) keeps its input for ``mb`` until the
  reverse. The last stage also keeps the target and loss weight, and returns the loss.
- reverse (``R``): receive ``(y, dL/dy)`` from the next stage, ``y`` being this stage's
  output as the next stage rebuilt it. Walk the blocks backwards: a reversible block rebuilds
  its input from its output with the CURRENT weights and backpropagates through that
  recomputation (``RevBlock.reverse_backward``); a non-reversible block pops its stored input,
  recomputes its forward with autograd and backpropagates. Parameter gradients accumulate;
  ``(x, dL/dx)`` goes to the previous stage. The last stage starts from the loss recomputed
  from its stored input and target (``reverse(mb, None, None)``).
- every ``accumulate`` reverses the optimizer steps (``update`` flushes a partial count).

There is one version of the weights: whatever they are when ``reverse`` runs is what
rebuilds and differentiates. Because weights may have changed since the forward, the
rebuilt input and the gradients are approximations of backprop's; with no update in
between they are exact up to float rounding (tested to 1e-5).

BatchNorm statistics. The forward runs in the module's mode; in train mode each BatchNorm
normalises with the microbatch's own statistics and updates its running statistics ONCE,
there. Every recomputation in ``reverse`` (the inverse of a reversible block and the
forward recomputed for the gradient, in reversible and non-reversible blocks alike) runs
inside ``frozen_bn_stats``: it normalises with the batch statistics of the input it is
given, the reconstructed input for a reversible block (the same values the forward saw, up
to rounding, when the weights have not moved) or the stored input for a non-reversible one,
and never updates the running statistics (momentum 0, ``num_batches_tracked`` restored).
So each microbatch moves the running statistics exactly once, as in ordinary training.
Layers with randomness (dropout) would recompute differently; the built-in models have none.

Memory: ``stored_bytes`` counts the stored inputs of non-reversible blocks (and, on a last
stage that ends with a reversible block, its output); an all-reversible stage holds 0
bytes. A non-reversible block holds at most ``d + 1`` microbatches when the stage's
forward runs ``d`` microbatches ahead of its reverse (``max_buffered``; for stage s of p
in the ``petra`` schedule, ``d = 2(p - 1 - s)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import handlers
from .dni import tensor_bytes
from .method_cost import PETRA_COST
from .probes import RECONSTRUCTION_PROBE
from .rules import CostHooks, Message, MethodSpec, activation_size, register_method
from .errors import ConfigError
from .revnet import frozen_bn_stats, is_reversible
from .base import StageBase
from .stage import OptimizerFactory, StageSpec

__all__ = ["PetraStage", "PetraOptions"]


class PetraStage(StageBase):
    """A slice of a (mostly) reversible model trained with PETRA's delayed reverse pass."""

    def __init__(
        self,
        module: nn.Module,
        spec: StageSpec,
        optimizer_factory: OptimizerFactory | None = None,
        loss_fn: nn.Module | None = None,
        device: torch.device | str = "cpu",
        *,
        accumulate: int = 1,
        probe_every: int | None = None,
        microbatches: int | None = None,
    ) -> None:
        if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
            raise ConfigError(f"accumulate must be a positive integer; got {accumulate!r}")
        if (probe_every is None) != (microbatches is None) or (
                probe_every is not None and (probe_every < 1 or microbatches < 1)):
            raise ConfigError(f"probe_every ({probe_every!r}) and microbatches ({microbatches!r}) "
                              "go together, both positive integers (or neither)")
        self._setup(module, spec, optimizer_factory, loss_fn, device)
        self.accumulate = accumulate
        self.blocks: list[nn.Module] = list(module.children()) if isinstance(module, nn.Sequential) else [module]
        self.reversible = [is_reversible(b) for b in self.blocks]
        # block index -> {mb: stored input}, for the non-reversible blocks only
        self._inputs: dict[int, dict[int, torch.Tensor]] = {
            i: {} for i, r in enumerate(self.reversible) if not r
        }
        # last stage: mb -> (target, weight, output if the last block is reversible)
        self._heads: dict[int, tuple[torch.Tensor, float, torch.Tensor | None]] = {}
        self._pending = 0  # reverses accumulated since the last optimizer step
        self.steps = 0  # optimizer steps taken
        self.max_buffered = 0
        # Probes (brigade.stages.probes): the first microbatch of every probe_every-th step
        # keeps its reversible blocks' true inputs and the weight version at its forward.
        self.probe_every, self.microbatches = probe_every, microbatches
        self._forwards = 0
        self._probed: dict[int, tuple[int, int, dict[int, torch.Tensor]]] = {}
        self.probe_records: list[dict] = []

    @property
    def all_reversible(self) -> bool:
        return all(self.reversible)

    # -- forward: the schedule's F --------------------------------------------------------
    @torch.no_grad()
    def forward(
        self,
        mb: int,
        x: torch.Tensor,
        target: torch.Tensor | None = None,
        weight: float = 1.0,
        label: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run ``mb`` forward without autograd, keeping only non-reversible blocks' inputs.

        Returns the detached output, or on the last stage the scaled loss (0-d tensor).
        """
        h = x.to(self.device)
        keep = self._probe_this()
        for i, block in enumerate(self.blocks):
            if not self.reversible[i]:
                self._inputs[i][mb] = h
                self.max_buffered = max(self.max_buffered, len(self._inputs[i]))
            elif keep is not None:
                keep[i] = h.clone()
            h = block(h)
        if keep is not None:
            self._probed[mb] = (self._forwards // self.microbatches, self.steps, keep)
        self._forwards += 1
        if self.spec.is_last:
            if target is None:
                raise ConfigError(f"stage {self.spec.index}: last stage forward needs a target")
            target = target.to(self.device)
            loss = self.loss_fn(h, target) * weight
            self._losses.append(float(loss))
            self._heads[mb] = (target, weight, h if self.reversible[-1] else None)
            h = loss
        self.peak_stored_bytes = max(self.peak_stored_bytes, self.stored_bytes())
        return h.detach()

    # -- reverse: the schedule's R --------------------------------------------------------
    def reverse(
        self,
        mb: int,
        y: torch.Tensor | None = None,
        dy: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Rebuild this stage's input for ``mb`` from its output ``y`` and backpropagate
        ``dy`` = dL/dy with the current weights; accumulate parameter gradients.

        The last stage takes ``y = dy = None`` and starts from its loss. Returns ``(x, dx)``
        for the previous stage, ``(None, None)`` on the first stage. Steps the optimizer
        after every ``accumulate`` reverses.
        """
        n = len(self.blocks)
        head_loss = None  # the last stage's loss, built inside the last block's recompute
        if self.spec.is_last:
            try:
                target, weight, y_kept = self._heads.pop(mb)
            except KeyError:
                raise ConfigError(f"stage {self.spec.index}: reverse({mb}) before forward({mb})") from None
            head_loss = (target, weight)
            if self.reversible[-1]:  # the loss sits on a reversible block's output
                with torch.enable_grad():
                    out = y_kept.detach().requires_grad_()
                    (dy,) = torch.autograd.grad(self.loss_fn(out, target) * weight, out)
                y, head_loss = y_kept, None
        elif dy is None:
            raise ConfigError(f"stage {self.spec.index}: reverse({mb}) needs dL/dy from the next stage")
        else:
            dy = dy.to(self.device)
            y = None if y is None else y.to(self.device)
        for i in reversed(range(n)):
            block = self.blocks[i]
            want_dx = not (self.spec.is_first and i == 0)
            if self.reversible[i]:
                if y is None:
                    raise ConfigError(
                        f"stage {self.spec.index}: block {i} is reversible and needs the stage "
                        f"output y for reverse({mb}); got None"
                    )
                y, dy = block.reverse_backward(y, dy)
                if mb in self._probed and i in self._probed[mb][2]:
                    self._record_probe(mb, i, y)
                continue
            try:
                x_b = self._inputs[i].pop(mb)
            except KeyError:
                raise ConfigError(f"stage {self.spec.index}: reverse({mb}) before forward({mb})") from None
            inp = x_b.detach().requires_grad_(want_dx and x_b.is_floating_point())
            with frozen_bn_stats(block), torch.enable_grad():
                out = block(inp)
                if head_loss is not None and i == n - 1:
                    target, weight = head_loss
                    torch.autograd.backward(self.loss_fn(out, target) * weight)
                else:
                    torch.autograd.backward(out, dy)
            y, dy = x_b, inp.grad if inp.requires_grad else None
        self._probed.pop(mb, None)
        self._pending += 1
        if self._pending >= self.accumulate:
            self._step()
        if self.spec.is_first:
            return None, None
        return y.detach(), (None if dy is None else dy.detach())

    def _probe_this(self) -> dict[int, torch.Tensor] | None:
        """A dict to keep true inputs in when this forward is a probed one, else None:
        the first microbatch of every ``probe_every``-th step (steps counted from 1)."""
        if self.probe_every is None or not any(self.reversible):
            return None
        step, j = divmod(self._forwards, self.microbatches)
        return {} if j == 0 and (step + 1) % self.probe_every == 0 else None

    def _record_probe(self, mb: int, i: int, rebuilt: torch.Tensor) -> None:
        """Relative error of block ``i``'s rebuilt input, and the versions since the forward."""
        step, version, kept = self._probed[mb]
        true = kept.pop(i)
        err = float((rebuilt.double() - true.double()).norm() / true.double().norm().clamp_min(1e-30))
        self.probe_records.append({"step": step + 1, "block": i, "recon_rel_error": err,
                                   "staleness": self.steps - version})

    def state_dict_extra(self) -> dict:
        """The probe records (nothing else of PETRA's state outlives a run)."""
        return {"probes": list(self.probe_records)}

    def load_state_dict_extra(self, state: dict) -> None:
        self.probe_records = list(state.get("probes", []))

    def _step(self) -> None:
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        self._pending = 0

    # -- the rest of the dispatch table ---------------------------------------------------
    def update(self) -> None:
        """Flush a partial accumulation: step if any reverse ran since the last step."""
        if self._pending:
            self._step()

    @property
    def stored_microbatches(self) -> int:
        """How many microbatches this stage holds anything for (inputs, or targets)."""
        mbs = set(self._heads)
        for kept in self._inputs.values():
            mbs.update(kept)
        return len(mbs)

    def stored_bytes(self) -> int:
        """Bytes of activations held for pending reverses: non-reversible blocks' inputs
        (and a reversible tail's output on the last stage). Targets are not counted.
        Storages are counted once per microbatch, as ``Stage`` counts them."""
        per_mb: dict[int, list[torch.Tensor]] = {}
        for kept in self._inputs.values():
            for mb, t in kept.items():
                per_mb.setdefault(mb, []).append(t)
        for mb, (_, _, out) in self._heads.items():
            if out is not None:
                per_mb.setdefault(mb, []).append(out)
        return sum(tensor_bytes(*ts) for ts in per_mb.values())


# -- the declaration of petra (brigade.stages.rules) -------------------------------------------
@dataclass(frozen=True)
class PetraOptions:
    """petra's options: microbatches of gradient per update (its schedule's); the probes'
    period (``--probe-every``, taken from the job: the stages measure themselves)."""

    accumulate: int | None = field(default=None, metadata={
        "flag": "--accumulate", "schedule": True, "default_help": "--microbatches",
        "help": "microbatches per update"})
    probe_every: int | None = field(default=None, metadata={
        "help": "record the reversible blocks' reconstruction error for the first "
                "microbatch of every N-th step (brigade.stages.probes)"})

    def __post_init__(self) -> None:
        a = self.accumulate
        if a is not None and (isinstance(a, bool) or not isinstance(a, int) or a < 1):
            raise ConfigError(f"petra accumulate={a!r} must be a positive integer")
        p = self.probe_every
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 1):
            raise ConfigError(f"petra probe_every={p!r} must be a positive integer (--probe-every 50)")


def _prepare(options: PetraOptions, model: Any, schedule: Any) -> dict[str, Any]:
    """The stages step when the schedule's U does: every ``accumulate`` reverses; a probed
    run counts steps in microbatches (the stage sees only those)."""
    probed = options.probe_every is not None
    return {"accumulate": schedule.accumulate, "probe_every": options.probe_every,
            "microbatches": schedule.microbatches if probed else None}


def _updates(options: PetraOptions, microbatches: int) -> float:
    """One update every ``accumulate`` microbatches."""
    return microbatches / (options.accumulate or microbatches)


def _pair_size(shape: tuple[int, ...], options: Any = None) -> int:
    return 2 * activation_size(shape)


def _needs_r(port: handlers.Port, a) -> list:
    return [] if a.stage == port.num_stages - 1 else [("g", a.stage, a.microbatch)]


def _run_r(port: handlers.Port, a) -> None:
    """R: rebuild the input from the output, backward, send (input, grad) back."""
    s, j = a.stage, a.microbatch
    if s == port.num_stages - 1:
        x, dx = port.stage(s).reverse(j)
    else:
        y, dy = port.take(("g", s, j))
        x, dx = port.stage(s).reverse(j, y, dy)
    if s > 0:
        port.send(a, ("g", s - 1, j), (x, dx))


register_method(MethodSpec(
    name="petra", order=40, stage_class=PetraStage, schedules=("petra",),
    handlers={"F": handlers.forward, "R": handlers.Handler(_run_r, _needs_r, frees=True),
              "U": handlers.update},
    options=PetraOptions, prepare=_prepare, default_optimizer=("momentum", 0.05),
    updates_per_step=_updates, costs=CostHooks(balancer=PETRA_COST),
    probe=RECONSTRUCTION_PROBE, config_fields=("probe_every",),
    no_autocast="its backward rebuilds inputs by inverting blocks, which bf16 does not undo",
    forward=(Message("activation h", "B·F", activation_size),),
    backward=(Message("(rebuilt h, dL/dh)", "2·B·F", _pair_size),),
    summary="reversible stages rebuild their input in a delayed backward: one weight "
            "version, no stash, no flush",
    reference="Rivaud et al., ICLR 2025 (PETRA)"))
