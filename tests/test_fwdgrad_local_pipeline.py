"""Local-guess forward gradients in the pipeline (Fournier et al. 2023), one unit per stage.

Each stage's guess u is the gradient of its own head's loss (backprop inside the stage
only), its tangent row J_θ·u rides forward with the activation, and the last stage sends
back d = ∇L·u, one number per earlier stage; g = (d / |u|²) u. With one microbatch that is
the single-process estimator with the stages as its blocks (``ForwardGradient(guess=
"local", blocks=balance)``), heads included: the weights must agree to float rounding.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from brigade.engine import Pipeline
from brigade.stages.fwdgrad import ForwardGradient, LocalHeads, make_head, param_blocks
from brigade.stages.partition import split
from brigade.stages.rules import get_method

from _nets import local_and_torchrun, mlp


def data(k: int, n: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(3, 1, 4, 4, generator=g)
    out = []
    for _ in range(k):
        y = torch.randint(0, 3, (n,), generator=g)
        out.append((templates[y] + torch.randn(n, 1, 4, 4, generator=g), y))
    return out


sgd = functools.partial(torch.optim.SGD, lr=0.05)


def single_process(model, balance, batches, optimizer):
    """The whole-model local-guess estimator, its blocks = the stages, its heads the ones
    the stages build (``make_head``, seeded by stage)."""
    model = copy.deepcopy(model)
    x = batches[0][0]
    heads = LocalHeads(model, x, 3, blocks=balance)
    h = x
    for k, stage in enumerate(split(model, balance)[:-1]):
        h = stage(h)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(k + 1)
            heads.heads[k].load_state_dict(make_head(tuple(h.shape[1:]), 3).state_dict())
    fg = ForwardGradient(model, nn.CrossEntropyLoss(), guess="local", blocks=balance,
                         heads=heads, head_lr=1e-3)
    opt = optimizer(model.parameters())
    losses = [fg.step(xb, yb, opt)["loss"] for xb, yb in batches]
    return model.state_dict(), losses


def pipelined(model, balance, batches, optimizer, microbatches=1, backend="local"):
    with Pipeline(copy.deepcopy(model), stages=balance, schedule="fwdgrad", method="fwdgrad",
                  guess="local", microbatches=microbatches, optimizer=optimizer,
                  loss_fn=nn.CrossEntropyLoss(), backend=backend) as pipe:
        losses = [o["loss"] for o in pipe.run(batches)]
        return pipe.state_dict(), losses, pipe.timeline()


def assert_same(got, want, tol=1e-5):
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=tol, atol=tol, msg=k)


@pytest.mark.parametrize("balance", [[2, 2], [1, 2, 1]])
def test_one_microbatch_equals_the_single_process_estimator(balance):
    model, batches = mlp(), data(4)
    want, want_losses = single_process(model, balance, batches, sgd)
    got, losses, tl = pipelined(model, balance, batches, sgd)
    assert losses == pytest.approx(want_losses, rel=1e-5)
    assert_same(got, want)
    assert "B" not in {e.kind for e in tl.events}


def test_several_microbatches_learn_and_only_d_comes_back():
    model, batches = mlp(), data(40)
    momentum = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)
    got, losses, tl = pipelined(model, [1, 2, 1], batches, momentum, microbatches=3)
    assert sum(losses[-6:]) / 6 < 0.92 * sum(losses[:6]) / 6, losses
    rule = get_method("fwdgrad")
    options = rule.make_options(guess="local")
    assert all(rule.exposure(s, 3, options).labels for s in range(3))
    assert not any(rule.exposure(s, 3, options).true_gradients for s in range(3))


def test_d_has_one_number_per_earlier_stage():
    """What comes back per microbatch: d, one float per stage before the last."""
    from brigade.stages.fwdpipe import ForwardGradientStage, stage_options
    from brigade.stages.stage import StageSpec, make_stage_module

    model, ((x, y),) = mlp(), data(1)
    opts = stage_options(model, guess="local")
    pieces = split(copy.deepcopy(model), [1, 2, 1])
    stages = [ForwardGradientStage(make_stage_module(list(p), f), StageSpec(i, 3), sgd,
                                   nn.CrossEntropyLoss() if i == 2 else None, **opts)
              for i, (p, f) in enumerate(zip(pieces, [0, 1, 3]))]
    h = x
    for st in stages[:-1]:
        h = st.forward(0, h, None, 1.0, label=y)
    assert h[1].shape == (2, *h[0].shape)  # one tangent row per earlier stage
    loss, d = stages[-1].forward(0, h, y, 1.0)
    assert d.shape == (2,) and torch.isfinite(d).all()


@pytest.mark.ray
def test_ray_run_equals_the_local_run(ray_cluster):
    model, batches = mlp(), data(3)
    want, want_losses, _ = pipelined(model, [2, 2], batches, sgd, microbatches=2)
    got, losses, _ = pipelined(model, [2, 2], batches, sgd, microbatches=2, backend="ray")
    assert losses == pytest.approx(want_losses, rel=1e-5)
    assert_same(got, want)


@pytest.mark.slow
def test_torchrun_run_equals_the_local_run(tmp_path):
    flags = ["--model", "mlp", "--width", "32", "--data", "synthetic", "--batch-size", "30",
             "--microbatches", "3", "--steps", "4", "--method", "fwdgrad", "--guess", "local",
             "--quiet"]
    want, got, report = local_and_torchrun(tmp_path, flags, local=["--stages", "2"])
    assert_same(got, want)
    assert report["config"]["guess"] == "local"


def seeded_heads(model, x, blocks):
    """LocalHeads whose head k is the one the pipeline builds for unit k (seeded k + 1)."""
    heads = LocalHeads(model, x, 3, blocks=blocks)
    h = x
    for k, block in enumerate(param_blocks(model, blocks)[:-1]):
        h = block.module(h)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(k + 1)
            heads.heads[k].load_state_dict(make_head(tuple(h.shape[1:]), 3).state_dict())
    return heads


def estimator(model, batches, blocks):
    """The whole-model local-guess estimator with the given units (None: one per block)."""
    model = copy.deepcopy(model)
    heads = seeded_heads(model, batches[0][0], blocks)
    fg = ForwardGradient(model, nn.CrossEntropyLoss(), guess="local", blocks=blocks,
                         heads=heads, head_lr=1e-3)
    opt = sgd(model.parameters())
    return model.state_dict(), [fg.step(xb, yb, opt)["loss"] for xb, yb in batches]


@pytest.mark.parametrize("balance, blocks", [
    (4, None),  # one stage: one unit per block, not one exact unit (that would be backprop)
    ([2, 2], (1, 1, 1, 1)),  # two units on each stage
    ([3, 1], (1, 2, 1)),  # the last stage's only unit exact, two on the first
    ([1, 3], (1, 1, 2)),  # a guessed unit before the exact one on the last stage
])
def test_several_units_per_stage_equal_the_estimator_with_those_blocks(balance, blocks):
    model, batches = mlp(), data(3)
    want, want_losses = estimator(model, batches, blocks)
    with Pipeline(copy.deepcopy(model), stages=balance if blocks else 1, schedule="fwdgrad",
                  method="fwdgrad", guess="local", blocks=blocks, microbatches=1,
                  optimizer=sgd, loss_fn=nn.CrossEntropyLoss(), backend="local") as pipe:
        losses = [o["loss"] for o in pipe.run(batches)]
        got = pipe.state_dict()
    assert losses == pytest.approx(want_losses, rel=1e-5)
    assert_same(got, want)
    moved = [k for k in want if not torch.equal(want[k], mlp().state_dict()[k])]
    assert moved == list(want)  # every unit learned: no head's guess was lost


def test_a_unit_that_the_stage_cut_splits_is_refused():
    with pytest.raises(Exception, match=r"local-guess block 0 spans children 0 and 1"):
        Pipeline(mlp(), stages=[1, 3], schedule="fwdgrad", method="fwdgrad", guess="local",
                 blocks=(2, 2), microbatches=1, optimizer=sgd, loss_fn=nn.CrossEntropyLoss(),
                 backend="local").shutdown()
