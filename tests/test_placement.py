"""Placement groups: the stage actors of a Ray pipeline sit in one placement group, one
bundle per worker; a cluster that cannot hold them is refused with the numbers and the fix,
and no group outlives its pipeline (after shutdown, after a failed start).

These run on the session's shared local cluster (4 logical CPUs, no GPU).
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from brigade.engine import Pipeline, PipelineConfigError, PipelineError

pytestmark = pytest.mark.ray


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Linear(8, 3))


def live_groups(ray) -> dict:
    """brigade's placement groups that are not removed, by id."""
    return {pg_id: info for pg_id, info in ray.util.placement_group_table().items()
            if info["name"].startswith("brigade-") and info["state"] != "REMOVED"}


def run_one_step(pipe: Pipeline) -> float:
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    return pipe.step(x, y)["loss"]


def test_actors_run_in_one_group_bundle_each_and_the_group_goes(ray_cluster):
    ray = ray_cluster
    before = set(live_groups(ray))
    pipe = Pipeline(net(), stages=2, microbatches=2, cpus_per_stage=1,
                    optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    try:
        groups = {k: v for k, v in live_groups(ray).items() if k not in before}
        assert len(groups) == 1, groups
        (info,) = groups.values()
        assert info["state"] == "CREATED" and info["strategy"] == "PACK"
        assert list(info["bundles"].values()) == [{"CPU": 1.0}, {"CPU": 1.0}]
        assert run_one_step(pipe) > 0
        for pid in pipe.worker_pids:  # glibc malloc settings per actor (see actor_env)
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            assert b"MALLOC_ARENA_MAX=1" in environ
            assert b"MALLOC_TRIM_THRESHOLD_=%d" % (1 << 30) in environ
    finally:
        pipe.shutdown()
    assert set(live_groups(ray)) <= before


@pytest.mark.parametrize("placement", ["spread", "strict_pack"])
def test_other_strategies_reach_ray(ray_cluster, placement):
    """The group alone (actors cost seconds each; the pack test above runs them)."""
    from brigade.engine.ray_backend import _place

    ray = ray_cluster
    pg = _place(2, 0.5, 0.0, placement, 10.0)
    try:
        info = ray.util.placement_group_table(pg)
        assert info["state"] == "CREATED" and info["strategy"] == placement.upper()
        assert list(info["bundles"].values()) == [{"CPU": 0.5}, {"CPU": 0.5}]
    finally:
        ray.util.remove_placement_group(pg)


def test_no_group_when_nothing_is_reserved(ray_cluster):
    from brigade.engine.ray_backend import _place

    assert _place(2, 0.0, 0.0, "pack", 1.0) is None


def test_more_stages_than_the_cluster_holds_fail_at_once_with_the_fix(ray_cluster):
    ray = ray_cluster
    before = set(live_groups(ray))
    with pytest.raises(PipelineConfigError) as err:
        Pipeline(net(), stages=[1, 1, 1, 1], microbatches=4, cpus_per_stage=2,
                 placement_timeout_s=2)
    msg = str(err.value)
    assert len(msg.splitlines()) == 1, msg
    # (what is free now depends on what the tests before released: not asserted)
    assert re.match(r"cannot place 4 stages x \{2 CPU, 0 GPU\} \(placement pack\): the cluster "
                    r"has 4 CPU, 0 GPU on 1 node\(s\) \([\d.]+ CPU, 0 GPU free now\); its nodes "
                    r"can hold 2 such stage\(s\); ", msg), msg
    assert "use fewer --stages, a smaller --cpus-per-stage" in msg and "add nodes" in msg
    assert set(live_groups(ray)) <= before


def test_strict_spread_needs_a_node_per_stage(ray_cluster):
    with pytest.raises(PipelineConfigError, match=r"1 node\(s\) can take one stage each"):
        Pipeline(net(), stages=2, microbatches=2, cpus_per_stage=1, placement="strict_spread")


def test_a_gpu_where_the_cluster_has_none_is_refused(ray_cluster):
    with pytest.raises(PipelineConfigError, match="the cluster has 0; pass --gpus-per-stage 0"):
        Pipeline(net(), stages=2, microbatches=2, gpus_per_stage=1)


def test_busy_resources_time_out_and_leave_no_group(ray_cluster):
    """The cluster could hold the stages, but another group holds its CPUs for now."""
    ray = ray_cluster
    from ray.util.placement_group import placement_group, remove_placement_group

    total = ray.cluster_resources()["CPU"]
    hog = placement_group([{"CPU": total}], name="test-hog")
    assert hog.wait(10)
    before = set(live_groups(ray))
    try:
        with pytest.raises(PipelineError) as err:
            Pipeline(net(), stages=2, microbatches=2, cpus_per_stage=1, placement_timeout_s=1)
        msg = str(err.value)
        assert "within 1 s: the cluster has 4 CPU, 0 GPU (0 CPU, 0 GPU free now: " in msg, msg
        assert "--placement-timeout" in msg
        assert not isinstance(err.value, PipelineConfigError)
    finally:
        remove_placement_group(hog)
    assert set(live_groups(ray)) <= before


def test_a_start_that_fails_after_placing_removes_the_group(ray_cluster, monkeypatch):
    from brigade.engine.ray_backend import RayBackend

    def broken(self):
        raise RuntimeError("clock went away")

    monkeypatch.setattr(RayBackend, "_clock_offsets", broken)
    before = set(live_groups(ray_cluster))
    with pytest.raises(RuntimeError, match="clock went away"):
        Pipeline(net(), stages=2, microbatches=2, cpus_per_stage=1)
    assert set(live_groups(ray_cluster)) <= before


def test_unknown_placement_lists_the_valid_ones():
    with pytest.raises(PipelineConfigError,
                       match="unknown placement 'ring'; valid placements: pack, spread, "
                             "strict_pack, strict_spread"):
        Pipeline(net(), stages=2, backend="local", placement="ring")
