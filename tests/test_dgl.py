"""DGL (decoupled greedy learning) on the engine: the one-process algorithm, cut into stages.

Each stage trains on its own auxiliary head's loss with its input detached, so no stage's
update depends on a later stage: a pipelined run must equal one process training the
stages one after another (same heads, same microbatch split and weights) on every
backend, to float rounding; and nothing may travel backward.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from brigade.engine import Pipeline
from brigade.engine.microbatch import loss_weights, split_batch
from brigade.stages.fwdgrad import make_head
from brigade.stages.partition import split
from brigade.stages.rules import get_method

from _nets import local_and_torchrun, mlp


def cnn() -> nn.Sequential:
    torch.manual_seed(5)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Flatten(), nn.Linear(64, 3)),
    )


def data(k: int, n: int = 13, classes: int = 3, seed: int = 0):
    """k batches of a learnable problem (13 samples: microbatches of unequal size)."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(classes, 1, 4, 4, generator=g)
    out = []
    for _ in range(k):
        y = torch.randint(0, classes, (n,), generator=g)
        out.append((templates[y] + torch.randn(n, 1, 4, 4, generator=g), y))
    return out


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def one_process(model, balance, batches, m, num_classes=3):
    """DGL written out: stage k = blocks of balance[k]; its head built as the stage builds
    it (seeded, at the first forward); each microbatch's local losses weighted by n_j / N,
    each stage's input detached; one step of every optimizer per batch."""
    model = copy.deepcopy(model)
    stages = split(model, balance)
    opts = [sgd(st.parameters()) for st in stages]
    heads: list[nn.Module | None] = [None] * len(stages)
    head_opts: list = [None] * len(stages)
    loss_fn, losses = nn.CrossEntropyLoss(), []
    for x, y in batches:
        total = 0.0
        xs = split_batch(x, m)
        for xj, yj, wj in zip(xs, split_batch(y, m), loss_weights(xs)):
            h = xj
            for k, st in enumerate(stages):
                h = st(h.detach())
                if k == len(stages) - 1:
                    loss = loss_fn(h, yj) * wj
                    total += float(loss.detach())
                else:
                    if heads[k] is None:
                        with torch.random.fork_rng(devices=[]):
                            torch.manual_seed(k + 1)
                            heads[k] = make_head(tuple(h.shape[1:]), num_classes, 2)
                        head_opts[k] = sgd(heads[k].parameters())
                    loss = loss_fn(heads[k](h), yj) * wj
                loss.backward()
        for opt in opts + [o for o in head_opts if o is not None]:
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(total)
    return model.state_dict(), losses


def pipelined(model, balance, batches, m, backend="local"):
    with Pipeline(copy.deepcopy(model), stages=balance, schedule="dgl", method="dgl",
                  microbatches=m, optimizer=sgd, loss_fn=nn.CrossEntropyLoss(),
                  backend=backend) as pipe:
        losses = [o["loss"] for o in pipe.run(batches)]
        return pipe.state_dict(), losses, pipe.timeline()


def assert_same(got, want):
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("make,balance", [(mlp, [1, 2, 1]), (cnn, [1, 1, 1])],
                         ids=["mlp", "cnn-batchnorm"])
def test_local_run_equals_dgl_written_out_in_one_process(make, balance):
    model, batches = make(), data(5)
    want, want_losses = one_process(model, balance, batches, m=3)
    got, losses, tl = pipelined(model, balance, batches, m=3)
    assert losses == pytest.approx(want_losses, rel=1e-5)
    assert_same(got, want)
    kinds = {e.kind for e in tl.events if e.category == "compute"}
    assert kinds == {"F", "U"}  # no backward action, nothing sent back
    sends = [e for e in tl.events if e.category == "send"]
    assert sends and all(e.kind == "F" for e in sends)


def test_dgl_learns_and_every_stage_sees_only_labels_and_activations():
    batches = data(60)
    _, losses, _ = pipelined(mlp(), [1, 2, 1], batches, m=3)
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[:8]) / 8, losses
    rule = get_method("DGL")
    assert [e.labels for e in map(lambda s: rule.exposure(s, 3, None), range(3))] == [True] * 3
    assert not any(rule.exposure(s, 3, None).true_gradients for s in range(3))
    assert rule.backward == () and rule.default_schedule == "dgl"


def test_checkpoint_carries_the_heads():
    model, batches = mlp(), data(6)
    opts = dict(stages=[2, 2], schedule="dgl", method="dgl", microbatches=2, optimizer=sgd,
                backend="local")
    with Pipeline(copy.deepcopy(model), **opts) as pipe:
        pipe.run(batches)
        whole = pipe.state_dict()
    with Pipeline(copy.deepcopy(model), **opts) as first:
        first.run(batches[:3])
        saved = first.checkpoint_state()
    assert saved[0]["extra"]["head"] is not None and saved[1]["extra"]["head"] is None
    with Pipeline(copy.deepcopy(model), **opts) as second:
        second.load_checkpoint_state(saved, step=3)
        second.run(batches[3:])
        assert_same(second.state_dict(), whole)


@pytest.mark.ray
def test_ray_run_equals_the_one_process_run(ray_cluster):
    model, batches = mlp(), data(4)
    want, want_losses, _ = pipelined(model, [1, 2, 1], batches, m=3)
    got, losses, tl = pipelined(model, [1, 2, 1], batches, m=3, backend="ray")
    assert losses == pytest.approx(want_losses, rel=1e-5)
    assert_same(got, want)
    assert tl.meta["schedule"] == "dgl" and tl.meta["method"] == "dgl"


@pytest.mark.slow
def test_torchrun_run_equals_the_one_process_run(tmp_path):
    flags = ["--model", "mlp", "--width", "32", "--data", "synthetic", "--batch-size", "30",
             "--microbatches", "4", "--steps", "5", "--method", "dgl", "--quiet"]
    want, got, report = local_and_torchrun(tmp_path, flags)
    assert_same(got, want)
    assert report["config"]["method"] == "dgl"
