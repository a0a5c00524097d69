"""The method-aware balancer: per-block and per-cut costs under each rule, the exact DP."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest
import torch
from torch import nn

from brigade.stages.errors import ConfigError
from brigade.stages.method_cost import (BACKPROP_COST, CostHook, MethodCosts, balance_by_cost,
                                        cost_hook, method_costs, stage_costs)
from brigade.stages.models import build_model
from brigade.stages.partition import partition
from brigade.stages.rules import (CostHooks, get_method, method_names, register_method,
                                  unregister_method)


def brute(costs: MethodCosts, parts: int) -> float:
    n, best = len(costs.block_s), float("inf")
    for cuts in itertools.combinations(range(1, n), parts - 1):
        b = (0, *cuts, n)
        best = min(best, max(costs.stage_cost(x, y) for x, y in zip(b, b[1:])))
    return best


def test_balance_by_cost_matches_brute_force_with_boundary_costs():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 7)
        parts = rng.randint(1, n)
        c = MethodCosts("dni", [rng.randint(0, 9) for _ in range(n)],
                        [rng.randint(0, 9) for _ in range(n)])
        bal = balance_by_cost(c, parts)
        assert len(bal) == parts and sum(bal) == n and min(bal) >= 1
        assert max(stage_costs(c, bal)) == brute(c, parts), (c, parts, bal)


def test_boundary_cost_moves_the_cut_and_last_stage_pays_none():
    # Equal blocks; a huge boundary after block 1 makes the cut avoid it.
    c = MethodCosts("dni", [1.0, 1.0, 1.0, 1.0], [0.0, 10.0, 0.0, 99.0])
    assert balance_by_cost(c, 2) in ([1, 3], [3, 1])
    assert c.stage_cost(0, 4) == 4.0  # the last stage has no boundary work
    with pytest.raises(ConfigError, match="5 stages"):
        balance_by_cost(c, 5)


def test_dni_costs_include_the_synthesizer_and_cdni_timed_with_labels():
    model = build_model("mlp", width=64)
    x = torch.randn(8, 1, 28, 28)
    dni = method_costs("dni", model, x, {"sg_hidden_layers": 2}, repeats=1)
    back = method_costs("backprop", model, x, repeats=1)
    assert len(dni.block_s) == len(back.block_s) == 3
    assert all(b > 0 for b in dni.boundary_s[:-1]) and dni.boundary_s[-1] == 0.0
    assert all(b == 0.0 for b in back.boundary_s)
    cdni = method_costs("cdni", model, x, {"num_classes": 10, "conditioned": True},
                        labels=torch.arange(8) % 10, repeats=1)
    assert cdni.boundary_s[0] > 0
    # the model itself is untouched (a copy is timed)
    assert all(p.grad is None for p in model.parameters())


def test_petra_and_fwdgrad_hooks_run_on_their_models():
    rev = build_model("revnet18", width=8, in_channels=1, image_size=28)
    c = method_costs("petra", rev, torch.randn(2, 1, 28, 28), repeats=1)
    assert len(c.block_s) == len(rev) and all(b > 0 for b in c.block_s)
    f = method_costs("fwdgrad", build_model("mlp", width=32), torch.randn(4, 1, 28, 28), repeats=1)
    assert all(b > 0 for b in f.block_s)


def test_every_built_in_rule_but_backprop_declares_its_hook_dgl_with_its_head():
    hooks = {n: get_method(n).costs.balancer for n in method_names()}
    assert hooks["backprop"] is None and cost_hook("backprop") is BACKPROP_COST
    assert all(hooks[n] is not None for n in ("stale", "dni", "cdni", "petra", "fwdgrad", "dgl"))
    assert hooks["dgl"].boundary is not None  # each stage but the last trains its own head
    model = build_model("mlp", width=32)
    dgl = method_costs("dgl", model, torch.randn(8, 1, 28, 28), {"num_classes": 10},
                       labels=torch.arange(8) % 10, repeats=1)
    assert all(b > 0 for b in dgl.boundary_s[:-1]) and dgl.boundary_s[-1] == 0.0
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        cost_hook("nope")


def test_registered_hook_decides_the_partition_and_rows_carry_its_cost():
    def block(b: nn.Module, x, options):
        return (5.0 if getattr(b, "slow", False) else 1.0), b(x).detach()

    toy = dataclasses.replace(get_method("backprop"), name="toy-slow-second",
                              costs=CostHooks(balancer=CostHook(block)))
    register_method(toy)  # the hook rides in the rule's declaration
    try:
        model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(4)])
        model[1].slow = True  # deep copies keep the mark
        part = partition(model, 2, by="method", sample=torch.randn(4, 4),
                         method="toy-slow-second")
        # costs 1,5,1,1: [2,2] -> max(6, 2) = 6 beats [1,3] -> 7 and [3,1] -> 7
        assert part.balance == [2, 2]
        assert [r.cost_s for r in part.rows] == [6.0, 2.0]
        assert "toy-slow-second ms/mb" in [c.header for c in part.table().columns]
    finally:
        unregister_method("toy-slow-second")
