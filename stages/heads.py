"""Blocks of a model and the small auxiliary heads that score them (local losses).

A *block* is a group of an ``nn.Sequential``'s children that holds parameters
(``param_blocks``): the unit that gets its own directions (forward gradients, block scope),
its own local loss, or its own pipeline stage. A *head* (``make_head``) turns a block's
output into class scores (pool + linear), so that the block can be trained on a loss of its
own without waiting for the rest of the network: the local-loss guess of forward gradients
(Fournier et al. 2023) and decoupled greedy learning (Belilovsky et al. 2020) both use them.
``LocalHeads`` holds one head per block of a whole model except the last, whose output is the
model's output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["Block", "param_blocks", "make_head", "LocalHeads"]


def make_head(shape: Sequence[int], num_classes: int, pool: int = 2) -> nn.Module:
    """A small classifier for outputs of per-example ``shape`` (no batch dimension).

    ``(C, H, W)``: adaptive average pooling to ``pool x pool``, flatten, linear to
    ``num_classes`` (pooling keeps the head small whatever the resolution); any other shape:
    flatten and linear.
    """
    shape = tuple(int(s) for s in shape)
    if int(num_classes) < 1:
        raise ConfigError(f"a head needs at least one class; got num_classes={num_classes}")
    if len(shape) == 3:
        c = shape[0]
        return nn.Sequential(nn.AdaptiveAvgPool2d(pool), nn.Flatten(1), nn.Linear(c * pool * pool, int(num_classes)))
    return nn.Sequential(nn.Flatten(1), nn.Linear(math.prod(shape), int(num_classes)))


@dataclass
class Block:
    """A group of a Sequential's children that holds parameters: the unit a head scores."""

    module: nn.Module  # runs the block: input -> output
    names: list[str]  # parameter names inside ``module``
    params: list[nn.Parameter]
    index: list[int]  # positions of ``params`` in ``list(model.parameters())``


def param_blocks(model: nn.Module, blocks: Sequence[int] | None = None) -> list[Block]:
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
            Block(
                module=module,
                names=[n for n, _ in named],
                params=[p for _, p in named],
                index=[position[id(p)] for _, p in named],
            )
        )
    return out


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

    def __getitem__(self, k: int) -> nn.Module:
        """The head of block ``k`` (``0 <= k < len(self)``)."""
        return self.heads[k]

    def local_loss(self, k: int, h: torch.Tensor, y: torch.Tensor, loss_fn: Callable) -> torch.Tensor:
        """Block ``k``'s local loss: its head's prediction from the block output ``h``."""
        return loss_fn(self.heads[k](h), y)


_Block = Block  # the name before the split
