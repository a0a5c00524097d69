"""Blocks and auxiliary heads (stages/heads.py): the public API the local-loss rules share."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from brigade.stages import fwdgrad
from brigade.stages.errors import ConfigError
from brigade.stages.heads import Block, LocalHeads, make_head, param_blocks


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Flatten(1),
        nn.Linear(6 * 8 * 8, 5),
    )


def test_make_head_pools_images_and_flattens_vectors():
    img = make_head((6, 8, 8), 5, pool=2)
    assert img(torch.randn(3, 6, 8, 8)).shape == (3, 5)
    assert sum(p.numel() for p in img.parameters()) == 6 * 2 * 2 * 5 + 5  # pooled, not 6*8*8
    vec = make_head((7,), 3)
    assert vec(torch.randn(2, 7)).shape == (2, 3)
    with pytest.raises(ConfigError, match="num_classes=0"):
        make_head((7,), 0)


def test_blocks_take_parameterless_children_along():
    bl = param_blocks(cnn())
    assert [len(list(b.module.children())) for b in bl] == [2, 3, 0]  # conv+relu, conv+relu+flatten, linear
    assert all(isinstance(b, Block) for b in bl)
    assert [i for b in bl for i in b.index] == list(range(6))
    with pytest.raises(ConfigError, match="sum to the model's 6 children"):
        param_blocks(cnn(), [2, 2])


def test_local_heads_score_every_block_but_the_last():
    m = cnn()
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    heads = LocalHeads(m, x)
    assert len(heads) == 2 and heads[1] is heads.heads[1]
    h = param_blocks(m)[0].module(x)
    loss = heads.local_loss(0, h, y, nn.CrossEntropyLoss())
    assert loss.shape == () and loss.item() > 0
    # the old import path still names the same class
    assert fwdgrad.LocalHeads is LocalHeads and fwdgrad.param_blocks is param_blocks
