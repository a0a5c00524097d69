"""The unlocked methods in the engine: DNI, cDNI, PETRA and the stale-gradient baseline.

Each stage's state changes only through its own actions, in the order its worker's list
gives, so an asynchronous Ray run must end with the same weights as the one-process
executor: that pins the engine's routing and ordering. PETRA's first step (no update has
happened yet, so the reconstruction uses the forward's weights) must equal backprop's; the
stale baseline's in-between steps must reapply the last gradient exactly.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from brigade.engine import Pipeline, PipelineConfigError
from brigade.stages.models import build_model
from brigade.stages.trainer import reference_step

from _nets import mlp


def data(k: int, n: int = 12, shape=(1, 4, 4), classes: int = 3, seed: int = 0):
    """k batches of a learnable problem: a class template plus noise."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(classes, *shape, generator=g)
    out = []
    for _ in range(k):
        y = torch.randint(0, classes, (n,), generator=g)
        out.append((templates[y] + torch.randn(n, *shape, generator=g), y))
    return out


def revnet() -> nn.Sequential:
    torch.manual_seed(4)
    return build_model("revnet18", width=8, in_channels=1, image_size=8, num_classes=3)


def sgd(params):
    return torch.optim.SGD(params, lr=0.05)


METHODS = [
    ("dni", "dni", mlp, [1, 2, 1], {}),
    ("cdni", "dni", mlp, [2, 1, 1], {}),
    ("petra", "petra", revnet, [3, 4, 3], {}),
    ("stale", "stale", mlp, [1, 2, 1], {"schedule_options": {"k": 2}}),
]


def fast_sgd(params):
    return torch.optim.SGD(params, lr=0.2)


def train(make, method, schedule, balance, backend, batches, optimizer=sgd, **kw):
    with Pipeline(make(), stages=balance, schedule=schedule, method=method, microbatches=3,
                  optimizer=optimizer, loss_fn=nn.CrossEntropyLoss(), backend=backend, **kw) as pipe:
        losses = [o["loss"] for o in pipe.run(batches)]
        return pipe.state_dict(), losses, pipe.timeline()


@pytest.mark.parametrize("method,schedule,make,balance,kw", METHODS, ids=[m[0] for m in METHODS])
def test_methods_learn_on_the_local_backend(method, schedule, make, balance, kw):
    shape = (1, 8, 8) if make is revnet else (1, 4, 4)
    batches = data(60, shape=shape)
    # stale gets one real gradient every k=2 steps, so it needs the larger step; DNI's
    # bootstrapped synthetic gradients diverge at lr 0.2 on this problem.
    opt = fast_sgd if method == "stale" else sgd
    _, losses, tl = train(make, method, schedule, balance, "local", batches, opt, **kw)
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.9 * first, (method, losses)
    compute = [e for e in tl.events if e.category == "compute"]
    assert {e.worker for e in compute} == {0, 1, 2}


@pytest.mark.ray
@pytest.mark.parametrize("method,schedule,make,balance,kw", METHODS, ids=[m[0] for m in METHODS])
def test_ray_run_equals_the_one_process_run(ray_cluster, method, schedule, make, balance, kw):
    shape = (1, 8, 8) if make is revnet else (1, 4, 4)
    batches = data(4, shape=shape)
    want, want_losses, _ = train(make, method, schedule, balance, "local", batches, **kw)
    got, got_losses, tl = train(make, method, schedule, balance, "ray", batches, **kw)
    assert got_losses == pytest.approx(want_losses, rel=1e-5)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    assert tl.meta["schedule"] == schedule and tl.meta["steps"] == 4


def test_petra_first_step_equals_backprop():
    """Before any update, reconstruction uses the forward's weights: exact gradients."""
    model = revnet()
    (x, y), = data(1, n=12, shape=(1, 8, 8))
    with Pipeline(model, stages=[3, 4, 3], schedule="petra", method="petra", microbatches=3,
                  optimizer=sgd, backend="local") as pipe:
        got_loss = pipe.step(x, y)["loss"]
        got = pipe.state_dict()
    ref = copy.deepcopy(model)
    want_loss = reference_step(ref, sgd(ref.parameters()), nn.CrossEntropyLoss(), x, y, 3)
    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_stale_reuses_the_last_gradient_between_backprop_steps():
    model, batches = mlp(), data(4)
    with Pipeline(model, stages=[2, 2], schedule="stale", method="stale", microbatches=3,
                  optimizer=sgd, backend="local", schedule_options={"k": 2}) as pipe:
        pipe.step(*batches[0])   # backprop
        pipe.run(batches[1:3])   # reuse, then backprop (the pipeline keeps the phase)
        pipe.step(*batches[3])   # reuse
        got = pipe.state_dict()
    ref = copy.deepcopy(model)
    loss_fn = nn.CrossEntropyLoss()
    for t in (0, 2):
        ref.zero_grad()
        (loss_fn(ref(batches[t][0]), batches[t][1])).backward()
        with torch.no_grad():
            for _ in range(2):  # the backprop step and the step that reuses its gradient
                for p in ref.parameters():
                    p -= 0.05 * p.grad
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_dni_never_stores_activations_past_the_forward():
    with Pipeline(mlp(), stages=[2, 2], schedule="dni", method="dni", microbatches=3,
                  optimizer=sgd, backend="local") as pipe:
        pipe.run(data(3))
        for w in pipe._backend.workers:
            for st in w.stages.values():
                assert st.stored_microbatches == 0  # every kept h was consumed by its T
            assert w.mailbox.pending() == []


@pytest.mark.parametrize("method,schedule,message", [
    ("petra", "1f1b", "schedule '1f1b' cannot run method 'petra'; valid schedules for petra: petra"),
    ("dni", "gpipe", "valid schedules for dni: dni"),
    ("backprop", "dni", "valid schedules for backprop: 1f1b, gpipe, interleaved, zb1p"),
])
def test_method_and_schedule_must_match(method, schedule, message):
    with pytest.raises(PipelineConfigError, match=message):
        Pipeline(mlp(), stages=2, schedule=schedule, method=method, backend="local",
                 optimizer=sgd)
