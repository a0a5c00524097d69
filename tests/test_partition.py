"""Partitioning: split, balancers (the min-max solver against brute force), profiles, tables."""

from __future__ import annotations

import itertools
import random
import time

import pytest
import torch
from rich.console import Console
from torch import nn

from brigade.schedulers import Costs
from brigade.stages.errors import ConfigError
from brigade.stages.models import build_model, count_params
from brigade.stages.partition import (
    Partition,
    balance_by_params,
    balance_by_time,
    balance_uniform,
    min_max_partition,
    partition,
    profile_blocks,
    split,
)


def brute_force(costs: list[float], parts: int) -> float:
    """Smallest possible largest run sum, by trying every set of cut points."""
    n, best = len(costs), float("inf")
    for cuts in itertools.combinations(range(1, n), parts - 1):
        bounds = (0, *cuts, n)
        best = min(best, max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])))
    return best


def run_max(costs: list[float], balance: list[int]) -> float:
    out, start = [], 0
    for count in balance:
        out.append(sum(costs[start:start + count]))
        start += count
    return max(out)


def test_min_max_partition_matches_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 8)
        parts = rng.randint(1, n)
        costs = [rng.randint(0, 20) for _ in range(n)]
        balance = min_max_partition(costs, parts)
        assert len(balance) == parts and sum(balance) == n and min(balance) >= 1
        assert run_max(costs, balance) == brute_force(costs, parts), (costs, parts, balance)


def test_min_max_partition_float_costs_and_examples():
    rng = random.Random(1)
    for _ in range(100):
        n = rng.randint(2, 7)
        costs = [rng.random() for _ in range(n)]
        parts = rng.randint(1, n)
        assert run_max(costs, min_max_partition(costs, parts)) == pytest.approx(brute_force(costs, parts))
    assert min_max_partition([4, 1, 1, 1, 1], 2) == [1, 4]
    assert min_max_partition([1, 1, 1, 1], 4) == [1, 1, 1, 1]
    assert min_max_partition([5], 1) == [1]


def test_min_max_partition_errors():
    with pytest.raises(ConfigError, match="3 stages but the model has only 2 blocks"):
        min_max_partition([1, 2], 3)
    with pytest.raises(ConfigError, match="non-negative"):
        min_max_partition([1, -2], 1)


@pytest.mark.parametrize(
    "n, p, expected",
    [(10, 1, [10]), (10, 2, [5, 5]), (10, 3, [3, 3, 4]), (10, 4, [2, 2, 3, 3]), (3, 3, [1, 1, 1])],
)
def test_balance_uniform(n, p, expected):
    assert balance_uniform(n, p) == expected


def test_split_shares_blocks_and_keeps_names():
    model = build_model("mlp", width=4, image_size=4)
    stages = split(model, [1, 2])
    assert stages[0][0] is model[0] and stages[1][0] is model[1] and stages[1][1] is model[2]
    keys = [k for s in stages for k in s.state_dict()]
    assert keys == list(model.state_dict())


@pytest.mark.parametrize(
    "balance, words",
    [
        ([], ["empty"]),
        ([2, 0, 1], ["non-positive"]),
        ([1, 1], ["sums to 2", "3 blocks", "[1, 2]"]),
        ([1, 1, 1, 1], ["4 stages", "only 3 blocks"]),
    ],
)
def test_split_errors_name_the_numbers(balance, words):
    model = build_model("mlp", width=4, image_size=4)
    with pytest.raises(ConfigError) as err:
        split(model, balance)
    for word in words:
        assert word in str(err.value)


def test_balance_by_params_minimises_largest_stage():
    model = build_model("resnet18", width=8)
    costs = [count_params(b) for b in model]
    for p in (2, 3, 4):
        assert run_max(costs, balance_by_params(model, p)) == brute_force(costs, p)


def test_profile_blocks_leaves_model_untouched():
    torch.manual_seed(0)
    model = build_model("resnet18", width=8, image_size=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    profile = profile_blocks(model, torch.randn(2, 3, 8, 8), repeats=1)
    assert len(profile) == len(model)
    assert all(p.forward_s > 0 and p.backward_s > 0 for p in profile)
    assert profile[0].out_shape == (2, 8, 8, 8) and profile[0].out_bytes == 2 * 8 * 8 * 8 * 4
    assert profile[0].bytes_per_sample == 8 * 8 * 8 * 4
    assert profile[-1].out_shape == (2, 10)
    assert [p.params for p in profile] == [count_params(b) for b in model]
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())


class Sleep(nn.Module):
    """A block whose forward takes a known time."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.lin = nn.Linear(2, 2)

    def forward(self, x):
        time.sleep(self.seconds)
        return self.lin(x)


def test_profile_times_the_split_backward_and_stage_rows_sum_it():
    """Each block's I and W are timed; a stage sums them, except the first stage, whose I
    is empty (its input needs no gradient) and whose W is its whole backward."""
    model = nn.Sequential(*(Sleep(s) for s in (0.0, 0.01, 0.0)))
    part = partition(model, [1, 2], sample=torch.randn(2, 2), repeats=1)
    assert all(b.input_s > 0 and b.weight_s > 0 for b in part.profile)
    assert part.input_s[0] == 0.0 and part.weight_s[0] == part.backward_s[0]
    assert part.input_s[1] == pytest.approx(sum(b.input_s for b in part.profile[1:]))
    assert part.weight_s[1] == pytest.approx(sum(b.weight_s for b in part.profile[1:]))
    costs = Costs.from_profile(part.forward_s, part.backward_s, part.input_s, part.weight_s)
    assert costs.resolve(2, "zb1p").i == part.input_s


def test_balance_by_time_follows_measured_cost():
    # [1, 2] costs max(30, 20) ms; the only other cut [2, 1] costs 40 ms: a 10 ms margin.
    model = nn.Sequential(*(Sleep(s) for s in (0.03, 0.01, 0.01)))
    assert balance_by_time(model, torch.randn(2, 2), 2, repeats=2) == [1, 2]


def test_partition_by_each_balancer_and_table():
    torch.manual_seed(0)
    model = build_model("cnn", width=4, image_size=8)
    sample = torch.randn(2, 1, 8, 8)
    for by in ("uniform", "PARAMS", "time"):
        part = partition(model, 3, by=by, sample=sample, repeats=1)
        assert isinstance(part, Partition) and len(part) == 3 and sum(part.balance) == len(model)
        assert [r.blocks for r in part.rows] == part.balance
        assert sum(r.params for r in part.rows) == count_params(model)
        assert part.rows[-1].out_shape == (2, 10)
        assert len(part.forward_s) == len(part.backward_s) == 3
    console = Console(record=True, width=120)
    console.print(part.table())
    text = console.export_text()
    for word in ("blocks", "params", "fwd ms", "output shape", "2x10"):
        assert word in text


def test_partition_without_sample_and_explicit_balance():
    model = build_model("mlp", width=4, image_size=4)
    part = partition(model, [2, 1])
    assert part.balance == [2, 1] and part.forward_s is None
    assert part.rows[0].out_shape is None
    assert part.modules[1][0] is model[2]
    assert partition(model, 2).balance == [1, 2]


def test_partition_errors():
    model = build_model("mlp", width=4, image_size=4)
    with pytest.raises(ConfigError, match="sample"):
        partition(model, 2, by="time")
    with pytest.raises(ConfigError, match="uniform, params, time"):
        partition(model, 2, by="flops")
    with pytest.raises(ConfigError, match="5 stages but the model has only 3 blocks"):
        partition(model, 5)
    with pytest.raises(ConfigError, match="positive"):
        partition(model, 0)
