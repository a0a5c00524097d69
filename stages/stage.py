"""One pipeline stage and its backpropagation learning rule, as a plain class.

A stage owns a contiguous slice of the model's blocks, its optimizer and, on the last stage,
the loss. It exposes one method per action kind of a schedule (forward, backward,
backward-input, backward-weight, update), keyed by microbatch, so that any executor (a thread,
a Ray actor, a torchrun rank) can drive it in the order a schedule says. It knows nothing of
processes or transport: tensors come in and go out as arguments.

Gradient accumulation follows single-process training with the same microbatch split: the
last stage scales microbatch j's mean loss by ``n_j / N`` (its share of the batch), so the
accumulated gradient equals the gradient of the batch's mean loss.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
import torch
from torch import nn

from . import handlers
from .base import OptimizerFactory, StageBase, place_stage
from .rules import Message, MethodSpec, activation_size, register_method
from .split_backward import SplitBackward, backward_input, backward_weight

__all__ = ["Stage", "StageSpec", "make_stage_module", "place_stage", "OptimizerFactory"]

def make_stage_module(blocks: list[nn.Module], first_block: int) -> nn.Sequential:
    """Wrap blocks in a Sequential whose child names are their indices in the whole model.

    Why: the stage's ``state_dict()`` then carries exactly the keys of the whole model's
    ``state_dict()`` ("3.conv.weight"), so merging the stages' dicts needs no renaming.
    """
    return nn.Sequential(OrderedDict((str(first_block + i), b) for i, b in enumerate(blocks)))


@dataclass
class StageSpec:
    """What a stage needs to know about its place in the pipeline."""

    index: int
    num_stages: int
    first_block: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.num_stages:
            raise ValueError(f"stage index {self.index} outside 0..{self.num_stages - 1}")

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1


@dataclass
class _Saved:
    """Tensors kept from a microbatch's forward until its backward frees them."""

    inp: torch.Tensor
    out: torch.Tensor  # the stage output, or the scaled loss on the last stage
    nbytes: int = 0  # bytes autograd saved for this microbatch's backward, plus inp and out
    split: SplitBackward | None = None  # what backward_input left for backward_weight


class _SavedBytes:
    """Counts the bytes autograd saves during a forward (each storage once).

    Why: the memory a pipeline stage holds per in-flight microbatch is the autograd graph's
    saved tensors, not just the boundary activation; PETRA's savings are measured with this.
    Computing the set of parameter storages costs one pass over the parameters per forward,
    and the hook one call per saved tensor, so :class:`Stage` counts once per input shape.
    """

    def __init__(self, module: nn.Module) -> None:
        self.nbytes = 0
        # Parameters and buffers are saved by reference (Linear saves its weight): they are
        # not activations, so their storages never count.
        self._seen: set[int] = {
            t.untyped_storage().data_ptr()
            for t in (*module.parameters(), *module.buffers())
            if t.device.type != "meta"
        }

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """Count ``t`` and hand autograd an alias without its graph link.

        Why the alias: a saved output packed as itself holds its own ``grad_fn``, a cycle
        through C++ that Python's collector cannot see. A graph freed by a backward with
        ``retain_graph=False`` breaks it, but a split backward (I then W) retains the graph,
        and the whole microbatch's activations leaked: 3.6 MB per microbatch on resnet18's
        last stage, 8k page faults per step. ``detach`` shares storage and version counter,
        and autograd re-attaches the graph edge on unpack.
        """
        self._count(t, t.untyped_storage().nbytes())
        return t.detach() if t.grad_fn is not None else t

    def own(self, t: torch.Tensor) -> None:
        """Count ``t`` by its own bytes, not its storage's: a microbatch is a view of the
        whole batch, whose storage the stage does not hold m times over."""
        self._count(t, t.numel() * t.element_size())

    def _count(self, t: torch.Tensor, nbytes: int) -> None:
        """Add ``nbytes`` unless ``t``'s storage was counted already."""
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key not in self._seen:
            self._seen.add(key)
            self.nbytes += nbytes

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t


@dataclass
class Stage(StageBase):
    """A slice of the model trained by backpropagation, driven one action at a time."""

    module: nn.Module
    spec: StageSpec
    optimizer_factory: OptimizerFactory | None = None
    loss_fn: nn.Module | None = None
    device: torch.device | str = "cpu"
    _saved: dict[int, _Saved] = field(default_factory=dict, init=False, repr=False)
    _losses: list[float] = field(default_factory=list, init=False, repr=False)
    _bytes_by_shape: dict[tuple, int] = field(default_factory=dict, init=False, repr=False)
    peak_stored_bytes: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._setup(self.module, self.spec, self.optimizer_factory, self.loss_fn, self.device)

    # -- forward ------------------------------------------------------------------------
    def forward(
        self,
        mb: int,
        x: torch.Tensor,
        target: torch.Tensor | None = None,
        weight: float = 1.0,
        label: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run microbatch ``mb`` forward and keep what its backward needs.

        On the last stage ``target`` is required and the return value is the scaled loss
        (a 0-d tensor, ``weight`` times the mean loss); elsewhere it is the detached output.
        """
        x = x.to(self.device)
        inp = x.detach().requires_grad_(not self.spec.is_first and x.is_floating_point())
        if self.spec.is_last and target is None:
            raise ValueError(f"stage {self.spec.index}: last stage forward needs a target")
        shape = (tuple(inp.shape), inp.dtype, inp.requires_grad, self.module.training)
        nbytes = self._bytes_by_shape.get(shape)
        if nbytes is None:  # first microbatch of this shape: count what autograd saves
            counter = _SavedBytes(self.module)
            counter.own(inp)
            with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
                out = self._run(inp, target, weight)
            counter.pack(out)
            nbytes = self._bytes_by_shape[shape] = counter.nbytes
        else:
            out = self._run(inp, target, weight)
        self._saved[mb] = _Saved(inp, out, nbytes)
        self.peak_stored_bytes = max(self.peak_stored_bytes, self.stored_bytes())
        return out.detach()

    def _run(self, inp: torch.Tensor, target: torch.Tensor | None, weight: float) -> torch.Tensor:
        """The module's output, or on the last stage ``weight`` times the mean loss."""
        out = self.module(inp)
        if self.spec.is_last:
            out = self.loss_fn(out, target.to(self.device)) * weight
            self._losses.append(float(out.detach()))
        return out

    # -- backward -----------------------------------------------------------------------
    def backward(self, mb: int, grad_out: torch.Tensor | None = None) -> torch.Tensor | None:
        """Full backward of microbatch ``mb``; accumulates parameter gradients.

        Returns dL/d(input) for the previous stage (None on the first stage).
        """
        saved = self._saved.pop(mb)
        grad = self._grad_for(saved, grad_out)
        torch.autograd.backward(saved.out, grad)
        return None if self.spec.is_first else saved.inp.grad

    def backward_input(self, mb: int, grad_out: torch.Tensor | None = None) -> torch.Tensor | None:
        """The input half of a split backward (zero-bubble schedules): dL/d(input) only.

        It records the gradients where parameter branches leave the input's path, so that
        :meth:`backward_weight` computes weight gradients without walking the graph again
        (see ``split_backward``, whose docstring has the timings: I + W about one backward
        on a resnet18 middle stage; more on a small last stage, where each op's fixed cost,
        now paid twice, dominates: 12.1 against 8.6 ms at batch 8).
        """
        saved = self._saved[mb]
        grad = self._grad_for(saved, grad_out)
        params = [p for p in self.module.parameters() if p.requires_grad]
        if self.spec.is_first or not saved.inp.requires_grad:
            # no input gradient to compute: W is the whole backward, walked once
            saved.split = SplitBackward(direct=params, out=saved.out, grad_out=grad)
            return None
        grad_in, saved.split = backward_input(saved.out, grad, saved.inp, params)
        return grad_in

    def backward_weight(self, mb: int) -> None:
        """The weight half of a split backward: accumulate parameter gradients, free ``mb``."""
        saved = self._saved.pop(mb)
        if saved.split is None:
            raise RuntimeError(f"stage {self.spec.index}: W{mb} before I{mb}")
        backward_weight(saved.split)

    def _grad_for(self, saved: _Saved, grad_out: torch.Tensor | None) -> torch.Tensor | None:
        """The gradient to start backward from: given, or none for the last stage's loss."""
        if self.spec.is_last:
            return None
        if grad_out is None:
            raise ValueError(f"stage {self.spec.index}: backward needs the output gradient")
        return grad_out.to(self.device)

    @property
    def stored_microbatches(self) -> int:
        """How many microbatches' activations this stage holds right now."""
        return len(self._saved)

    def stored_bytes(self) -> int:
        """Bytes held right now for pending backwards (autograd's saved tensors)."""
        return sum(s.nbytes for s in self._saved.values())


# -- the declaration of backprop (brigade.stages.rules) ---------------------------------------
register_method(MethodSpec(
    name="backprop", order=0, stage_class=Stage, schedules=("1f1b", "gpipe", "interleaved", "zb1p"),
    handlers=handlers.BACKPROP_HANDLERS, default_optimizer=("momentum", 0.05),
    forward=(Message("activation h", "B·F", activation_size),),
    backward=(Message("gradient dL/dh", "B·F", activation_size),),
    summary="backpropagation: dL/dh flows back; one optimizer step per step, after the flush",
    reference="GPipe (Huang 2019), 1F1B (PipeDream-Flush), interleaved (Narayanan 2021), "
              "ZB-H1 (Qi 2024)"))
