"""Reversible blocks: exact inverse (train and eval), no double BatchNorm update, RevNet backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from brigade.stages.errors import ConfigError
from brigade.stages.models import build_model
from brigade.stages.revnet import Downsample, RevBlock, frozen_bn_stats, invert, is_reversible

REVNETS = ["revnet18", "revnet34", "revnet50"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def bn_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", REVNETS)
def test_every_reversible_block_reconstructs_its_input(name, mode):
    """Each block's input comes from the model's own forward in the same mode, as in training."""
    torch.manual_seed(0)
    model = build_model(name, width=8, image_size=8).train(mode == "train")
    x, checked = torch.randn(4, 3, 8, 8), 0
    with torch.no_grad():
        for i, block in enumerate(model):
            y = block(x)
            if is_reversible(block):
                stats = bn_state(block)
                assert rel_err(block.inverse(y), x) < 1e-5, f"{name} block {i} ({mode})"
                after = bn_state(block)
                for key in stats:
                    assert torch.equal(after[key], stats[key]), f"inverse changed {key} of block {i}"
                checked += 1
            x = y
    assert checked == sum(is_reversible(b) for b in model) > 0


def test_train_forward_updates_stats_once_and_inverse_not_at_all():
    torch.manual_seed(0)
    block = RevBlock(8).train()
    x = torch.randn(4, 8, 6, 6)
    y = block(x)
    bn = block.f[0][1]
    assert int(bn.num_batches_tracked) == 1
    before = bn_state(block)
    block.inverse(y)
    for key, value in bn_state(block).items():
        assert torch.equal(value, before[key]), key
    assert bn.momentum == 0.1, "momentum restored"


def test_frozen_stats_with_cumulative_momentum():
    block = RevBlock(4, "bottleneck").train()
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    y = block(torch.randn(3, 4, 5, 5))
    before = bn_state(block)
    with frozen_bn_stats(block):
        block(y)
    assert all(torch.equal(v, before[k]) for k, v in bn_state(block).items())
    assert all(m.momentum is None for m in block.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_reverse_backward_matches_autograd(kind):
    torch.manual_seed(0)
    block = RevBlock(8, kind).train()
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    dy = torch.randn(4, 8, 6, 6)
    y = block(x)
    y.backward(dy)
    ref_dx, ref_grads = x.grad.clone(), [p.grad.clone() for p in block.parameters()]
    stats = bn_state(block)
    block.zero_grad()
    x_rec, dx = block.reverse_backward(y.detach(), dy)
    assert rel_err(x_rec, x.detach()) < 1e-5
    assert rel_err(dx, ref_dx) < 1e-4
    for p, ref in zip(block.parameters(), ref_grads):
        assert rel_err(p.grad, ref) < 1e-4
    assert all(torch.equal(v, stats[k]) for k, v in bn_state(block).items())


def test_invert_runs_of_reversible_blocks():
    torch.manual_seed(0)
    model = build_model("revnet18", width=8, image_size=8).eval()
    x = model[0](torch.randn(2, 3, 8, 8)).detach()
    run = model[1:3]  # the two reversible blocks of the first stage
    assert all(is_reversible(b) for b in run)
    with torch.no_grad():
        assert rel_err(invert(run, run(x)), x) < 1e-5
    with pytest.raises(ConfigError, match="not reversible"):
        invert(model[0:2], torch.zeros(2, 8, 8, 8))


def test_downsampling_blocks_and_stem_say_they_are_not_reversible():
    model = build_model("revnet50", width=8, image_size=8)
    downs = [b for b in model if isinstance(b, Downsample)]
    assert len(downs) == 4
    assert not any(is_reversible(b) for b in downs)
    assert "NOT reversible" in Downsample.__doc__
    assert not is_reversible(model[0]) and not is_reversible(model[-1])
    assert not is_reversible(nn.Linear(2, 2))


def test_odd_channels_rejected():
    with pytest.raises(ConfigError, match="even"):
        RevBlock(5)
