"""Shared-seed data-parallel forward gradient: real Ray actors and the in-process backend.

The merge rules are checked against a one-process reference written here from first
principles (``torch.func.jvp`` of the whole model's loss along each seeded direction, the
merge and the SGD step by hand), not with the system's own estimator code.
"""

from __future__ import annotations

import argparse
import copy
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, jvp

from brigade.engine import fgdp
from brigade.engine.fgdp import FGDPConfig, FGWorkerError, ForwardGradientDP, host_ranks, merge_scalars
from brigade.stages import fwdgrad as fg
from brigade.stages.errors import ConfigError

# forward-mode AD loads torch's jvp decompositions through torch.jit.script, which warns
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def tiny(width: int = 8, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Sequential(nn.Linear(6, width), nn.ReLU()), nn.Linear(width, 2))


def data(n: int = 120, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long()


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


# -- the one-process reference ------------------------------------------------------------
BLOCKS = [[0, 1], [2, 3]]  # tiny(): parameter positions of child 0 and child 1


def reference(model: nn.Module, shards, merge: str, directions: str, projections, rounds: int,
              lr: float, seed: int) -> list[torch.Tensor]:
    """Parameters after ``rounds`` rounds, every worker's batch its whole shard.

    Per worker i and block k: ``d = jvp(L_i, v)`` of the whole model's loss, with ``v`` the
    seeded direction on block k's parameters and zero elsewhere; ``g_i = Σ_k Σ_p d v / n_k``;
    then naive (one SGD step per worker, in worker order, all d measured before the first
    step), mean or weighted (by shard size).
    """
    model = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    loss_fn = nn.CrossEntropyLoss()
    for t in range(rounds):
        theta = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads = []
        for i, (x, y) in enumerate(shards):
            keys = (t, i if directions == "independent" else 0)
            g = {n: torch.zeros_like(p) for n, p in theta.items()}
            for k, idx in enumerate(BLOCKS):
                vs = fg.directions([theta[names[j]] for j in idx], seed, keys, projections[k], indices=idx)
                for q in range(projections[k]):
                    tangent = {n: torch.zeros_like(p) for n, p in theta.items()}
                    for j, v in zip(idx, vs):
                        tangent[names[j]] = v[q]
                    _, d = jvp(lambda P: loss_fn(functional_call(model, P, (x,)), y), (theta,), (tangent,))
                    for j, v in zip(idx, vs):
                        g[names[j]] += float(d) * v[q] / projections[k]
            grads.append(g)
        sizes = [len(y) for _, y in shards]
        if merge == "naive":
            steps = grads
        else:
            w = [s / sum(sizes) for s in sizes] if merge == "weighted" else [1 / len(grads)] * len(grads)
            steps = [{n: sum(wi * g[n] for wi, g in zip(w, grads)) for n in names}]
        with torch.no_grad():
            for g in steps:
                for n, p in model.named_parameters():
                    p -= lr * g[n]
    return _params(model)


REF = dict(workers=3, actors=2, batch_size=200, lr=0.2, shards="uneven", scope="block", projections=(2, 3),
           seed=5, optimizer="sgd")


def _check_against_reference(dp: ForwardGradientDP, merge: str, directions: str, rounds: int = 2) -> None:
    x, y = data()
    assert dp.rounds_per_epoch == 1  # each round: every worker's whole shard
    for _ in range(rounds):
        dp.step()
    got = list(dp.state_dict().values())
    shards = [(x[idx], y[idx]) for idx in dp.shard_indices]
    want = reference(tiny(), shards, merge, directions, REF["projections"], rounds, REF["lr"], REF["seed"])
    moved = max(float((w - p).abs().max()) for w, p in zip(want, _params(tiny())))
    assert moved > 1e-3  # the reference did train
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5), (merge, directions, float((g - w).abs().max()))
    assert dp.replicas_identical()


@pytest.mark.ray
@pytest.mark.parametrize("merge,directions", [("naive", "independent"), ("mean", "shared"),
                                              ("weighted", "independent")])
def test_merge_rules_on_ray_match_the_one_process_reference(ray_cluster, merge, directions):
    """3 workers on 2 host actors (one holds two), the coordinator a Ray actor."""
    with ForwardGradientDP(tiny(), data(), None, merge=merge, directions=directions, timeout_s=120, **REF) as dp:
        assert dp.cfg.coordinator == "actor" and len(dp.actors) == 2
        _check_against_reference(dp, merge, directions)


@pytest.mark.parametrize("merge", ["naive", "mean", "weighted"])
@pytest.mark.parametrize("directions", ["independent", "shared"])
def test_merge_rules_in_process_match_the_reference(merge, directions):
    with ForwardGradientDP(tiny(), data(), None, merge=merge, directions=directions, backend="local", **REF) as dp:
        _check_against_reference(dp, merge, directions)


RAY_CFG = dict(workers=3, actors=3, merge="mean", batch_size=10, lr=0.05, shards="uneven", projections=2, seed=5)


@pytest.fixture(scope="module")
def ray_dp(ray_cluster):
    """One system of 3 real host actors shared by the Ray tests (actors take seconds to start)."""
    dp = ForwardGradientDP(tiny(), data(), data(30, seed=1), timeout_s=300, **RAY_CFG)
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
def test_a_dead_worker_is_named_not_waited_for(ray_dp, ray_cluster):
    ray_dp.step()
    ray_cluster.kill(ray_dp.actors[1], no_restart=True)
    with pytest.raises(FGWorkerError, match="worker 1") as err:
        ray_dp.step()
    assert err.value.workers == [1]
    ray_dp.shutdown()
    assert ray_dp.actors == [] and ray_dp.coordinator is None


def test_many_workers_per_host_equal_one_worker_per_host():
    """Logical workers share their host's replica: the layout changes nothing but processes."""
    x, y = data(320)
    cfg = dict(workers=8, merge="weighted", directions="independent", batch_size=8, lr=0.05,
               shards="uneven", backend="local", scope="block", projections=(1, 4))
    hashes = []
    for actors in (8, 3, 1):
        with ForwardGradientDP(tiny(), (x, y), actors=actors, **cfg) as dp:
            assert [len(r) for r in dp.ranks] == [len(p) for p in host_ranks(8, actors)]
            for _ in range(3):
                dp.step()
            hs = dp.hashes()
            assert len(set(hs)) == 1 and len(hs) == actors
            hashes.append(hs[0])
    assert len(set(hashes)) == 1


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
        for actors in (3, 2):  # the host of workers 0 and 1 moves its statistics once a round
            with ForwardGradientDP(model, (x, y), workers=3, actors=actors, batch_size=10, guess=guess,
                                   backend="local") as dp:
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


def test_wire_is_scalars_only_and_o_of_workers_times_projections():
    x, y = data(400)

    def bytes_per_step(width, workers, directions="shared", projections=4):
        with ForwardGradientDP(
            tiny(width), (x, y), workers=workers, actors=workers, merge="mean", directions=directions,
            batch_size=10, lr=0.01, backend="local", projections=projections,
        ) as dp:
            recs = [dp.step() for _ in range(2)]
            params = dp.num_params
        return recs[-1], params

    small, p_small = bytes_per_step(4, 2)
    large, p_large = bytes_per_step(4096, 2)
    assert p_large > 900 * p_small
    assert large["bytes"] == small["bytes"]  # the same scalars, whatever the model
    assert large["bytes"] < 0.01 * 4 * p_large
    # shared directions: N rows up, one row down per host -> linear in workers
    r2, _ = bytes_per_step(4, 2)
    r8, _ = bytes_per_step(4, 8)
    assert r8["bytes"] <= 4.2 * r2["bytes"]
    # ... and a row is 4 bytes a projection plus a fixed header
    r8_64, _ = bytes_per_step(4, 8, projections=64)
    assert r8_64["bytes"] - r8["bytes"] == pytest.approx(2 * 8 * 4 * 60, rel=0.02)
    # independent directions: every host receives every worker's coefficients -> quadratic
    i2, _ = bytes_per_step(4, 2, "independent", 64)
    i8, _ = bytes_per_step(4, 8, "independent", 64)
    assert i8["bytes_down"] > 10 * i2["bytes_down"]


def test_merge_scalars_rules():
    rows = [(0, 10, np.array([1.0, 3.0])), (1, 30, np.array([2.0, 2.0])), (2, 0, np.array([9.0, 9.0]))]

    def agg(merge, directions="independent"):
        who, coefs = merge_scalars(merge, directions, rows, [2])
        return who.tolist(), coefs.tolist()

    assert agg("naive") == ([[0], [1]], [[[0.5, 1.5]], [[1.0, 1.0]]])  # the empty worker 2 takes no step
    assert agg("mean") == ([[0, 1]], [[[0.25, 0.75], [0.5, 0.5]]])
    assert agg("weighted") == ([[0, 1]], [[[0.125, 0.375], [0.75, 0.75]]])
    assert agg("weighted", "shared") == ([[0]], [[[0.875, 1.125]]])
    # units are averaged over their own projection counts
    who, coefs = merge_scalars("mean", "shared", [(0, 5, np.array([2.0, 4.0, 6.0]))], [1, 2])
    assert coefs.tolist() == [[[2.0, 2.0, 3.0]]]


def test_a_raising_worker_is_named(monkeypatch):
    x, y = data()
    real = fgdp._FGHost.compute_one

    def flaky(self, j, t, epoch, b):
        if self.ranks[j] == 1 and t == 1:
            raise RuntimeError("disk on fire")
        return real(self, j, t, epoch, b)

    monkeypatch.setattr(fgdp._FGHost, "compute_one", flaky)
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
    with pytest.raises(ConfigError, match="actors must be between 1 and workers=4; got 5"):
        FGDPConfig(workers=4, actors=5)
    with pytest.raises(ConfigError, match="actor, driver"):
        FGDPConfig(coordinator="boss")
    with pytest.raises(ConfigError, match="at most 3 workers"):
        ForwardGradientDP(tiny(), data(3), workers=5, backend="local")


def test_cli_writes_the_json_report(tmp_path, capsys):
    from brigade.engine.cli import fwdgrad_cmd

    parser = argparse.ArgumentParser()
    fwdgrad_cmd.add_arguments(parser)
    out = tmp_path / "fg.json"
    args = parser.parse_args([
        "--workers", "4", "--actors", "2", "--merge", "weighted", "--model", "mlp", "--data", "synthetic",
        "--epochs", "2", "--batch-size", "8", "--train-limit", "64", "--test-limit", "32",
        "--width", "16", "--backend", "local", "--json", str(out), "--quiet",
    ])
    assert fwdgrad_cmd.run(args) == 0
    rep = json.loads(out.read_text())
    for key in ("final_test_accuracy", "bytes_per_step", "bytes_up_per_worker_per_step", "startup_bytes",
                "wall_s", "rounds_per_s", "replicas_identical", "param_hash"):
        assert key in rep
    assert [e["epoch"] for e in rep["epochs"]] == [1, 2]
    assert all(0 <= e["test_accuracy"] <= 1 and e["train_loss"] > 0 for e in rep["epochs"])
    assert rep["replicas_identical"] is True and len(rep["param_hashes"]) == 2
    printed = capsys.readouterr().out
    assert "epoch  2" in printed and rep["param_hash"][:12] in printed and "start-up" in printed
    bad = parser.parse_args(["--merge", "mean", "--projections", "0", "--backend", "local"])
    with pytest.raises(ConfigError):
        fwdgrad_cmd.run(bad)


def test_auto_projections_freeze_convs_and_feed_the_dense_block_behind_them():
    """``--projections auto``: 0 on conv blocks, 16 on the dense block right after them,
    1 elsewhere, 192 on the last; the frozen-feature head gets 10x the default rate."""
    from brigade.engine.cli import fwdgrad_cmd
    from brigade.stages.models import build_model

    cnn, mlp = build_model("cnn", width=4), build_model("mlp", width=16)
    assert fgdp.auto_projections(cnn) == (0, 0, 0, 0, fgdp.AUTO_AFTER_FROZEN, fgdp.AUTO_LAST)
    assert fgdp.auto_projections(mlp) == (1, 1, fgdp.AUTO_LAST)
    assert fgdp.auto_lr_scale(fgdp.auto_projections(cnn)) == fgdp.FROZEN_LR_SCALE
    assert fgdp.auto_lr_scale(fgdp.auto_projections(mlp)) == 1.0

    parser = argparse.ArgumentParser()
    fwdgrad_cmd.add_arguments(parser)
    base = fgdp.default_lr("adam", "random", "mean", 10)
    cfg = fwdgrad_cmd.config_from_args(parser.parse_args([]), cnn)
    assert cfg.lr == pytest.approx(base * fgdp.FROZEN_LR_SCALE)
    assert fwdgrad_cmd.config_from_args(parser.parse_args([]), mlp).lr == pytest.approx(base)
    explicit = fwdgrad_cmd.config_from_args(parser.parse_args(["--lr", "0.002"]), cnn)
    assert explicit.lr == 0.002  # a rate the user gave is kept
