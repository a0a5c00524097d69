"""Shared-seed data-parallel forward gradient: real Ray actors and the in-process backend."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from brigade.engine import fgdp
from brigade.engine.fgdp import FGDPConfig, FGWorkerError, ForwardGradientDP
from brigade.stages import fwdgrad as fg
from brigade.stages.errors import ConfigError


# forward-mode AD loads torch's jvp decompositions through torch.jit.script, which warns
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def fg_ray():
    """A local Ray cluster for this module; shut down at the end even when a test fails.

    Reuses a cluster that is already running (the session's) and then leaves it alone.
    """
    ray = pytest.importorskip("ray")
    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def tiny(width: int = 8, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Sequential(nn.Linear(6, width), nn.ReLU()), nn.Linear(width, 2))


def data(n: int = 120, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long()


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


RAY_CFG = dict(workers=3, merge="mean", batch_size=10, lr=0.05, shards="uneven", projections=2, seed=5)


@pytest.fixture(scope="module")
def ray_dp(fg_ray):
    """One system of 3 real actors shared by the Ray tests (actors take seconds to start)."""
    dp = ForwardGradientDP(tiny(), data(), data(30, seed=1), timeout_s=120, **RAY_CFG)
    try:
        yield dp
    finally:
        dp.shutdown()


@pytest.mark.ray
def test_replicas_stay_bit_identical_on_ray(ray_dp):
    before = _params(tiny())
    for _ in range(4):
        rec = ray_dp.step()
    hashes = ray_dp.hashes()
    after = ray_dp.state_dict()
    acc = ray_dp.evaluate()["accuracy"]
    assert len(hashes) == 3 and len(set(hashes)) == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, after.values()))  # it learned something
    assert 0.0 <= acc <= 1.0
    assert rec["bytes"] > 0 and rec["bytes_up"] > 0
    # the in-process backend runs the same protocol: the same replicas, bit for bit
    with ForwardGradientDP(tiny(), data(), None, backend="local", **RAY_CFG) as local:
        for _ in range(4):
            local.step()
        assert local.hashes() == hashes


@pytest.mark.ray
def test_a_dead_worker_is_named_not_waited_for(ray_dp, fg_ray):
    ray_dp.step()
    fg_ray.kill(ray_dp.actors[1], no_restart=True)
    with pytest.raises(FGWorkerError, match="worker 1") as err:
        ray_dp.step()
    assert err.value.workers == [1]
    ray_dp.shutdown()
    assert ray_dp.actors == []


@pytest.mark.parametrize("merge", ["naive", "weighted"])
@pytest.mark.parametrize("directions", ["independent", "shared"])
def test_every_merge_keeps_replicas_identical(merge, directions):
    x, y = data()
    with ForwardGradientDP(
        tiny(), (x, y), workers=3, merge=merge, directions=directions, batch_size=10,
        lr=0.05, shards="uneven", backend="local", scope="block", projections=(2, 3),
    ) as dp:
        for _ in range(3):
            dp.step()
        assert dp.replicas_identical()


def test_batchnorm_statistics_follow_worker_zero():
    x, y = data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU()), nn.Linear(8, 2))
    for guess in ("random", "local"):
        with ForwardGradientDP(model, (x, y), workers=3, batch_size=10, guess=guess, backend="local") as dp:
            for _ in range(3):
                dp.step()
            assert dp.replicas_identical()  # parameters and running statistics
            assert int(dp.state_dict()["0.1.num_batches_tracked"]) == 3


def test_local_guess_is_supported_and_costs_parameters():
    x, y = data()
    with ForwardGradientDP(tiny(), (x, y), workers=2, guess="local", batch_size=20, lr=0.05, backend="local") as dp:
        rec = dp.step()
        assert dp.replicas_identical()
    assert rec["bytes"] > 4 * dp.num_params  # a local guess cannot be regenerated: it travels


def test_bytes_per_step_do_not_grow_with_parameters():
    x, y = data()

    def bytes_per_step(width, workers, directions="independent"):
        with ForwardGradientDP(
            tiny(width), (x, y), workers=workers, merge="mean", directions=directions,
            batch_size=10, lr=0.01, backend="local",
        ) as dp:
            recs = [dp.step() for _ in range(2)]
            params = dp.num_params
        return recs[-1]["bytes"], params

    small, p_small = bytes_per_step(4, 2)
    large, p_large = bytes_per_step(4096, 2)
    assert p_large > 900 * p_small
    assert large == small  # the same scalars, whatever the model
    assert large < 0.01 * 4 * p_large
    # O(workers): with shared directions every message is a few scalars
    b2, _ = bytes_per_step(4, 2, "shared")
    b4, _ = bytes_per_step(4, 4, "shared")
    assert b4 <= 2.2 * b2
    assert b4 / 4 < 400  # bytes per worker per round


def test_aggregation_rules():
    from brigade.engine.fgdp import _pack, _unpack

    def agg(merge, directions="independent"):
        cfg = FGDPConfig(workers=2, merge=merge, directions=directions, projections=2)
        results = [{"d": _pack([[1.0, 3.0]]), "n": 10, "loss": 1.0}, {"d": _pack([[2.0, 2.0]]), "n": 30, "loss": 1.0}]
        out = ForwardGradientDP._merge(SimpleNamespace(cfg=cfg), results, t=7)
        return [[(w, [u.tolist() for u in _unpack(c)]) for w, c in step] for step in out["steps"]]

    assert agg("naive") == [[(0, [[0.5, 1.5]])], [(1, [[1.0, 1.0]])]]
    assert agg("mean") == [[(0, [[0.25, 0.75]]), (1, [[0.5, 0.5]])]]
    assert agg("weighted") == [[(0, [[0.125, 0.375]]), (1, [[0.75, 0.75]])]]
    assert agg("weighted", "shared") == [[(0, [[0.875, 1.125]])]]


def test_one_worker_mean_equals_the_centralized_estimate():
    """Worker 0's round-0 update is the single-process estimate with keys (0, 0)."""
    x, y = data(40)
    cfg = dict(workers=1, merge="mean", batch_size=40, lr=0.1, projections=3, seed=9, optimizer="sgd")
    with ForwardGradientDP(tiny(), (x, y), backend="local", **cfg) as dp:
        dp.step()
        got = dp.state_dict()
        shard_order = dp.actors[0].obj._batch(0, 0)
    model = tiny()
    est = fg.forward_gradient(model, *shard_order, nn.CrossEntropyLoss(), projections=3, seed=9, keys=(0, 0))
    with torch.no_grad():
        for p, g in zip(model.parameters(), est.grads):
            p -= 0.1 * g
    for (k, v), p in zip(got.items(), model.parameters()):
        assert torch.allclose(v, p, atol=1e-6), k


def test_a_raising_worker_is_named(monkeypatch):
    x, y = data()
    real = fgdp._FGWorker.compute

    def flaky(self, t, epoch, b):
        if self.rank == 1 and t == 1:
            raise RuntimeError("disk on fire")
        return real(self, t, epoch, b)

    monkeypatch.setattr(fgdp._FGWorker, "compute", flaky)
    with ForwardGradientDP(tiny(), (x, y), workers=2, batch_size=10, backend="local") as dp:
        dp.step()
        with pytest.raises(FGWorkerError, match="worker 1 failed: round 1: RuntimeError: disk on fire"):
            dp.step()


def test_bad_settings_say_what_works():
    with pytest.raises(ConfigError, match="naive, mean, weighted"):
        FGDPConfig(merge="median")
    with pytest.raises(ConfigError, match="independent, shared"):
        FGDPConfig(directions="some")
    with pytest.raises(ConfigError, match="sgd"):
        FGDPConfig(optimizer="lbfgs")
    with pytest.raises(ConfigError, match="at most 3 workers"):
        ForwardGradientDP(tiny(), data(3), workers=5, backend="local")


def test_cli_writes_the_json_report(tmp_path, capsys):
    from brigade.engine.cli import fwdgrad_cmd
    import argparse

    parser = argparse.ArgumentParser()
    fwdgrad_cmd.add_arguments(parser)
    out = tmp_path / "fg.json"
    args = parser.parse_args([
        "--workers", "2", "--merge", "weighted", "--model", "mlp", "--data", "synthetic",
        "--epochs", "2", "--batch-size", "16", "--train-limit", "64", "--test-limit", "32",
        "--width", "16", "--backend", "local", "--lr", "0.001", "--json", str(out), "--quiet",
    ])
    assert fwdgrad_cmd.run(args) == 0
    rep = json.loads(out.read_text())
    for key in ("final_test_accuracy", "bytes_per_step", "wall_s", "train_loss", "replicas_identical"):
        assert key in rep
    assert len(rep["train_loss"]) == 2 and rep["replicas_identical"] is True
    assert "accuracy" in capsys.readouterr().out
    bad = parser.parse_args(["--merge", "mean", "--projections", "0", "--backend", "local"])
    with pytest.raises(ConfigError):
        fwdgrad_cmd.run(bad)
