"""The forward-only pipeline (method fwdgrad): the single-process estimator, cut into stages.

The stages must draw exactly the directions the whole-model estimator draws (each
parameter's from its position in the whole model) and the last stage's d must be the whole
model's directional derivative: then k pipelined steps end with the weights of k
``ForwardGradient.step`` calls with the same seed, projections, distribution and scope.
Backward, only d travels: ``projections`` numbers per microbatch, whatever the model size.
"""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from torch import nn

from brigade.engine import Pipeline, PipelineConfigError
from brigade.engine.cli import main
from brigade.stages import ConfigError, fg_optim
from brigade.stages.fwdgrad import ForwardGradient

from _nets import mlp


def data(k: int, n: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g))
            for _ in range(k)]


sgd = functools.partial(torch.optim.SGD, lr=0.05)
adam = functools.partial(fg_optim.make_optimizer, "adam", lr=1e-3)


def single_process(model, batches, optimizer, **fg_options):
    """The reference: ``ForwardGradient.step`` on each whole batch."""
    model = copy.deepcopy(model)
    fg = ForwardGradient(model, nn.CrossEntropyLoss(), **fg_options)
    opt = optimizer(model.parameters())
    losses = [fg.step(x, y, opt)["loss"] for x, y in batches]
    return model.state_dict(), losses


def pipelined(model, batches, optimizer, balance, microbatches=1, backend="local", **options):
    with Pipeline(copy.deepcopy(model), stages=balance, schedule="fwdgrad", method="fwdgrad",
                  microbatches=microbatches, optimizer=optimizer, backend=backend,
                  loss_fn=nn.CrossEntropyLoss(), **options) as pipe:
        losses = [o["loss"] for o in pipe.run(batches)]
        return pipe.state_dict(), losses, pipe


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


CASES = [  # balance, estimator options, optimizer
    ([2, 2], dict(projections=3), sgd),
    ([1, 2, 1], dict(projections=3, dist="gaussian"), sgd),
    ([2, 2], dict(projections="auto"), adam),  # block scope, (1, 1, 1, 256)
    ([1, 1, 2], dict(projections=(2, 0, 3, 5), scope="block"), adam),  # a frozen block
    ([3, 1], dict(projections=1, scope="block"), sgd),
    ([4], dict(projections="auto"), adam),  # one stage: d goes to itself
]


@pytest.mark.parametrize("balance,options,optimizer", CASES,
                         ids=[f"{len(c[0])}stages-{c[1]}" for c in CASES])
def test_pipelined_steps_equal_the_single_process_estimator(balance, options, optimizer):
    model, batches = mlp(), data(5)
    want, want_losses = single_process(model, batches, optimizer, seed=11, **options)
    got, losses, _ = pipelined(model, batches, optimizer, balance, seed=11, **options)
    assert max_diff(got, want) <= 1e-5
    assert losses == pytest.approx(want_losses, abs=1e-6)
    assert max_diff(got, model.state_dict()) > 1e-3  # the weights did move


def test_microbatches_accumulate_the_batch_mean_derivative():
    """With m microbatches d is summed with weights n_j/N: the batch mean's derivative."""
    model, batches = mlp(), data(4, n=13)  # 13 = 5 + 4 + 4: unequal microbatches
    want, want_losses = single_process(model, batches, sgd, seed=5, projections=4)
    got, losses, _ = pipelined(model, batches, sgd, [2, 2], microbatches=3, seed=5,
                               projections=4)
    assert max_diff(got, want) <= 1e-5
    assert losses == pytest.approx(want_losses, abs=1e-5)


def test_batchnorm_statistics_move_once_per_microbatch_as_in_one_process():
    """Float64, so that rounding cannot hide a difference: the jvps of the stages and of the
    whole model normalise with batch statistics and the running ones move once per step."""
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Sequential(nn.Flatten(), nn.Linear(16, 24), nn.BatchNorm1d(24), nn.ReLU()),
        nn.Sequential(nn.Linear(24, 24), nn.BatchNorm1d(24), nn.ReLU()),
        nn.Linear(24, 3),
    ).double()
    batches = [(x.double(), y) for x, y in data(3)]
    for options in (dict(projections=2), dict(projections="auto")):
        want, _ = single_process(model, batches, sgd, seed=6, **options)
        got, _, _ = pipelined(model, batches, sgd, [2, 1], seed=6, **options)
        assert max_diff(got, want) <= 1e-12
        assert int(got["0.2.num_batches_tracked"]) == 3


def test_a_different_seed_draws_other_directions():
    model, batches = mlp(), data(3)
    want, _ = single_process(model, batches, sgd, seed=1, projections=2)
    got, _, _ = pipelined(model, batches, sgd, [2, 2], seed=2, projections=2)
    assert max_diff(got, want) > 1e-3


def _record_sends(pipe):
    """Wrap each worker's send: (from worker, to worker, key, payload) of every message."""
    sent = []
    for w in pipe._backend.workers:
        def send(dest, key, payload, _src=w.index, _inner=w._send):
            sent.append((_src, dest, key, payload))
            _inner(dest, key, payload)
        w._send = send
    return sent


@pytest.mark.parametrize("width", [8, 256])
@pytest.mark.parametrize("balance", [[2, 2], [1, 2, 1]])
def test_only_projections_scalars_travel_backward(width, balance):
    n, m = 3, 2
    with Pipeline(mlp(width), stages=balance, schedule="fwdgrad", method="fwdgrad",
                  microbatches=m, optimizer=sgd, backend="local", projections=n) as pipe:
        sent = _record_sends(pipe)
        pipe.run(data(2))
        pipe.predict(data(1)[0][0])
    upstream = [(src, dest, key, p) for src, dest, key, p in sent if dest < src]
    downstream = [(src, dest, key, p) for src, dest, key, p in sent if dest > src]
    p = len(balance)
    assert len(upstream) == 2 * m * (p - 1)  # one d per earlier stage per microbatch
    for _, _, key, payload in upstream:
        assert key[0] == "d" and isinstance(payload, torch.Tensor)
        assert payload.numel() == n  # independent of the width
    train = [(k, x) for _, _, k, x in downstream if isinstance(x, tuple)]
    assert len(train) == 2 * m * (p - 1)
    for _, (h, tangent) in train:  # the tangent travels with the activation
        assert tangent.shape == (n, *h.shape)


def test_evaluation_state_and_checkpoints():
    model, batches = mlp(), data(6)
    opts = dict(stages=[2, 2], schedule="fwdgrad", method="fwdgrad", microbatches=2,
                optimizer=adam, backend="local", projections="auto", seed=4)
    with Pipeline(copy.deepcopy(model), **opts) as pipe:
        pipe.run(batches)
        whole, x = pipe.state_dict(), batches[0][0]
        reference = copy.deepcopy(model)
        reference.load_state_dict(whole)
        with torch.no_grad():
            assert torch.allclose(pipe.predict(x), reference(x), atol=1e-6)
    # stop after 3 steps, restore into a fresh pipeline, run 3 more: as if never stopped
    with Pipeline(copy.deepcopy(model), **opts) as first:
        first.run(batches[:3])
        saved = first.checkpoint_state()
    assert {s: v["extra"] for s, v in saved.items()} == {0: {"t": 3}, 1: {"t": 3}}
    with Pipeline(copy.deepcopy(model), **opts) as second:
        second.load_checkpoint_state(saved, step=3)
        second.run(batches[3:])
        assert max_diff(second.state_dict(), whole) == 0.0


@pytest.mark.parametrize("options,message", [
    (dict(lr=0.1), "method fwdgrad takes no option lr"),
    (dict(projections="many"), "projections must be a number"),
    (dict(projections=(1, 2), scope="block"), "2 projection counts for 4 blocks"),
])
def test_bad_options_say_what_works(options, message):
    with pytest.raises(ConfigError, match=message):
        Pipeline(mlp(), stages=2, schedule="fwdgrad", method="fwdgrad", backend="local",
                 **options)
    with pytest.raises(PipelineConfigError, match="valid schedules for fwdgrad: fwdgrad"):
        Pipeline(mlp(), stages=2, schedule="1f1b", method="fwdgrad", backend="local")


def test_ray_run_equals_the_local_run(ray_cluster):
    model, batches = mlp(), data(3)
    want, want_losses, _ = pipelined(model, batches, adam, [2, 2], microbatches=2, seed=9,
                                     projections="auto")
    got, losses, pipe = pipelined(model, batches, adam, [2, 2], microbatches=2, seed=9,
                                  projections="auto", backend="ray")
    assert max_diff(got, want) <= 1e-5
    assert losses == pytest.approx(want_losses, abs=1e-5)
    kinds = {e.kind for e in pipe.timeline().events}
    assert {"F", "D", "U"} <= kinds and "B" not in kinds


def test_cli_trains_on_ray_and_writes_the_figures(ray_cluster, tmp_path):
    out = tmp_path / "fg.json"
    assert main(["train", "--model", "mlp", "--width", "32", "--data", "synthetic",
                 "--method", "fwdgrad", "--stages", "2", "--backend", "ray",
                 "--batch-size", "32", "--steps", "3", "--quiet", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert 0.0 <= figures["final_test_accuracy"] <= 1.0
    assert len(figures["stages"]) == 2
    for row in figures["stages"]:
        assert row["peak_stored_activation_bytes"] == 0 and row["busy_s"] > 0


@pytest.mark.parametrize("args,message", [
    (["--schedule", "1f1b"], "schedule '1f1b' cannot run method 'fwdgrad'; valid schedules "
                             "for fwdgrad: fwdgrad"),
    (["--projections", "many"], "projections must be a number, one number per block, or 'auto'; got 'many'"),
    (["--optimizer", "adamw"], "not a forward-gradient optimizer"),
])
def test_bad_combinations_exit_2_before_starting_anything(args, message, capsys):
    base = ["train", "--model", "mlp", "--width", "16", "--data", "synthetic", "--method",
            "fwdgrad", "--stages", "2", "--backend", "ray", "--steps", "1", "--quiet"]
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err, err
    assert len(err.splitlines()) == 1, err
