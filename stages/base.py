"""The stage base class: the one set of entry points every learning rule's stage implements.

A stage owns a contiguous slice of the model's blocks, its optimizer and, on the last stage,
the loss. Whatever its rule, the engine talks to it through these methods only (the worker
never probes a stage with ``getattr``/``hasattr``):

- ``forward(mb, x, target=None, weight=1.0, label=None)``: one microbatch forward (what the
  rule does there: store activations, update at once, push a tangent, ...);
- ``infer(x)``: evaluation forward, nothing stored;
- ``backward`` / ``backward_input`` / ``backward_weight``: the backward kinds, for rules that
  have them (the default says which rule lacks it);
- ``update()``: the optimizer step of an ``U`` action;
- ``pop_losses()``, ``stored_bytes()``, ``peak_stored_bytes``, ``stored_microbatches``: what
  the worker reports;
- ``optimizer``, ``state_dict_extra()`` / ``load_state_dict_extra()``: checkpoints.

Rule-specific actions (DNI's ``train_sg``, PETRA's ``reverse``, forward gradients'
``accumulate``) stay methods of the rule's own class, called by the rule's own handlers
(``brigade.stages.handlers``), which the rule's declaration (``brigade.stages.rules``) names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["StageBase", "OptimizerFactory", "place_stage"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def place_stage(module: nn.Module, spec: Any, optimizer_factory: OptimizerFactory | None,
                loss_fn: nn.Module | None,
                device: torch.device | str) -> tuple[torch.device, torch.optim.Optimizer | None]:
    """What every stage class does first: the last stage must have a loss; the module
    moves to ``device``; the optimizer is built over its parameters (None without a
    factory). Returns the device and the optimizer."""
    if spec.is_last and loss_fn is None:
        raise ConfigError(f"stage {spec.index} is the last stage and needs a loss_fn")
    device = torch.device(device)
    module.to(device)
    return device, optimizer_factory(module.parameters()) if optimizer_factory else None


class StageBase(ABC):
    """What the engine may call on any stage; subclasses implement ``forward``.

    ``_setup`` is the constructor preamble every stage class shares (the loss check, the
    device, the optimizer, the loss record); call it first, from ``__init__`` or a
    dataclass's ``__post_init__``.
    """

    module: nn.Module
    spec: Any  # StageSpec: index, num_stages, is_first, is_last
    loss_fn: nn.Module | None
    device: torch.device
    optimizer: torch.optim.Optimizer | None
    peak_stored_bytes: int

    def _setup(self, module: nn.Module, spec: Any, optimizer_factory: OptimizerFactory | None,
               loss_fn: nn.Module | None, device: torch.device | str) -> None:
        """Place the module, build its optimizer, start the records."""
        self.module, self.spec, self.loss_fn = module, spec, loss_fn
        self.device, self.optimizer = place_stage(module, spec, optimizer_factory, loss_fn, device)
        self._losses: list[float] = []
        self.peak_stored_bytes = 0

    # -- forward ------------------------------------------------------------------------------
    @abstractmethod
    def forward(self, mb: int, x: Any, target: torch.Tensor | None = None, weight: float = 1.0,
                label: torch.Tensor | None = None) -> Any:
        """Run microbatch ``mb`` forward as the rule says; ``target`` and ``weight`` (its
        share of the batch) on the last stage, ``label`` where the rule shows earlier stages
        the labels."""

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Forward-only evaluation: nothing is stored, no graph is built."""
        return self.module(x.to(self.device))

    def forward_only(self, mb: int, x: torch.Tensor, target: torch.Tensor | None = None,
                     weight: float = 1.0) -> torch.Tensor:
        """A training forward that no backward follows in this program (stale's in-between
        steps); rules without such steps never get one."""
        raise self._lacks("forward_only")

    # -- backward kinds -----------------------------------------------------------------------
    def backward(self, mb: int, grad_out: torch.Tensor | None = None) -> torch.Tensor | None:
        raise self._lacks("backward (B)")

    def backward_input(self, mb: int, grad_out: torch.Tensor | None = None) -> torch.Tensor | None:
        raise self._lacks("backward_input (I)")

    def backward_weight(self, mb: int) -> None:
        raise self._lacks("backward_weight (W)")

    def _lacks(self, what: str) -> Exception:
        return ConfigError(f"stage {self.spec.index} ({type(self).__name__}) has no {what}; "
                           "its rule's schedules never ask for it")

    # -- update and records ------------------------------------------------------------------
    def update(self) -> None:
        """One optimizer step on the gradients accumulated since the last update."""
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def pop_losses(self) -> list[float]:
        """Scaled losses recorded by the last stage since the previous call."""
        out, self._losses = self._losses, []
        return out

    @property
    def stored_microbatches(self) -> int:
        """How many microbatches this stage holds anything for right now."""
        return 0

    def stored_bytes(self) -> int:
        """Bytes held right now for pending backward work."""
        return 0

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict_extra(self) -> dict[str, Any] | None:
        """The rule's own state beyond weights and optimizer (None: nothing)."""
        return None

    def load_state_dict_extra(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict_extra`` returned."""
