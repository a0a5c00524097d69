"""The next run's inputs shipped while a run trains (``Pipeline.run(then=...)``).

Staging must change nothing that is computed: the staged run trains on the batches as they
were when they were staged, a run given other batches than the staged ones falls back to
shipping its own, and the trainer draws ahead only where nothing happens on the driver
between two runs (an epoch's evaluation, a checkpoint, the budget's end).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from brigade.engine import Pipeline
from brigade.engine.train import TrainConfig, run_training

from _nets import mlp
from test_engine_methods import data, sgd


def _pipe(backend: str) -> Pipeline:
    torch.manual_seed(0)
    return Pipeline(mlp(), stages=[2, 2], schedule="1f1b", microbatches=3, optimizer=sgd,
                    loss_fn=nn.CrossEntropyLoss(), backend=backend)


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.slow
def test_staged_runs_train_what_unstaged_runs_train(ray_cluster):
    b1, b2, b3, b4 = (data(2, seed=s) for s in range(4))
    with _pipe("local") as local:
        for b in (b1, b2, b3):
            local.run(b)
        want = local.state_dict()
    with _pipe("ray") as remote:
        remote.run(b1, then=b2)
        assert remote._staged is not None and remote._staged[1] == remote._backend.staged == 1
        # changed after staging: the staged run must train on what was shipped, which
        # proves it took the staged inputs rather than shipping b2 again
        original = [(x.clone(), y.clone()) for x, y in b2]
        for x, _ in b2:
            x.zero_()
        remote.run(b2, then=b4)  # b4 staged, then never run: b3 is shipped as usual
        assert remote._backend.staged == 2
        remote.run(b3)
        assert remote._staged is None
        got = remote.state_dict()
    _same(got, want)
    for (x, _), (x0, _) in zip(b2, original):
        assert not torch.equal(x, x0)  # the test did change the tensors it staged


def _spy_on_runs(monkeypatch) -> list[tuple[list, list | None]]:
    """Every ``Pipeline.run`` call's batches and ``then``, in order (the runs still run)."""
    calls: list[tuple[list, list | None]] = []
    real = Pipeline.run

    def spy(self, batches, keep=(), then=None):
        calls.append((batches, then))
        return real(self, batches, keep, then)

    monkeypatch.setattr(Pipeline, "run", spy)
    return calls


def test_the_trainer_draws_ahead_only_where_nothing_happens_between_runs(monkeypatch, tmp_path):
    """Runs of 4 steps over 2 epochs of 11 steps, a checkpoint every 6: each run's
    ``then`` is the next run's batches (the same tensors), and none is given across an
    epoch's end, a checkpoint step or the last step."""
    calls = _spy_on_runs(monkeypatch)
    cfg = TrainConfig(model="mlp", data="synthetic", synthetic_size=352, batch_size=32, epochs=2,
                      window=4, backend="local", checkpoint=str(tmp_path / "ck"),
                      checkpoint_every=6, width=16)
    report = run_training(cfg)
    lengths = [len(b) for b, _ in calls]
    assert sum(lengths) == report["steps"] == 22
    ends, done = set(), 0
    for n in lengths:
        done += n
        ends.add(done)
    assert {6, 11, 12, 18, 22} <= ends  # checkpoints, the epoch's end, the budget's end
    done = 0
    for (batches, then), nxt in zip(calls, calls[1:] + [(None, None)]):
        done += len(batches)
        if then is None:
            continue
        assert done % 6 and done not in (11, 22), f"drew ahead across step {done}"
        assert [id(t) for p in then for t in p] == [id(t) for p in nxt[0] for t in p]
    assert sum(then is not None for _, then in calls) >= 2  # it did draw ahead


@pytest.mark.parametrize("method, second", [("dgl", 5), ("backprop", 16)])
def test_the_first_run_ships_the_second(monkeypatch, method, second):
    """The first run carries the second's batches: a decoupled schedule's fixed window
    (here 5), a flush schedule's untimed run (16 steps: no step is timed before its first
    run, of one step, ends)."""
    calls = _spy_on_runs(monkeypatch)
    cfg = TrainConfig(model="mlp", data="synthetic", synthetic_size=1280, batch_size=32,
                      steps=30, window=5 if method == "dgl" else None, method=method,
                      backend="local", width=16)
    run_training(cfg)
    (first, then), (nxt, _) = calls[0], calls[1]
    assert len(first) == (5 if method == "dgl" else 1), [len(b) for b, _ in calls]
    assert then is not None and len(nxt) == second
    assert [id(t) for p in then for t in p] == [id(t) for p in nxt for t in p]
