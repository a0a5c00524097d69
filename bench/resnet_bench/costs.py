"""Costs of a split: brigade's own stage classes timed per action on one microbatch
(F, B, I, W, S, T, R, U), one thread."""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from brigade.schedulers import Costs
from brigade.schedulers.calibrate import costs_from_spans
from brigade.stages.partition import min_max_partition, split

from .config import SHAPES, BenchConfig, LR, _METHOD
from .profiling import ModelProfile, _threads, make_batch

__all__ = ["SplitCosts", "split_costs", "stage_costs"]


# -- costs of a split ----------------------------------------------------------------------------
@dataclass
class SplitCosts:
    """What the simulator needs for one schedule on one split, and what it was made from."""

    balance: list[int]
    costs: Costs
    stored_bytes: list[float]  # per model stage, per in-flight microbatch
    source: str


def _balance(mp: ModelProfile, parts: int) -> list[int]:
    """Min-max partition of the profiled block times (brigade's balance_by_time)."""
    return min_max_partition(mp.block_seconds, parts)


def _comm(cfg: BenchConfig) -> dict[str, float]:
    """Message costs and microbatch size, the Costs fields every split shares."""
    return {"latency": cfg.latency_ms * 1e-3, "bandwidth": cfg.bandwidth_gbs * 1e9,
            "microbatch_size": cfg.microbatch_size}


def _update_seconds(module: nn.Module, repeats: int) -> float:
    """One SGD step over ``module``'s parameters (the U action), median of a few."""
    params = [p for p in copy.deepcopy(module).parameters() if p.requires_grad]
    if not params:
        return 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.SGD(params, lr=LR)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def _stage_inputs(model: nn.Sequential, balance: list[int], x: torch.Tensor) -> list[torch.Tensor]:
    """The input each stage sees for ``x`` (a no-grad forward through a copy)."""
    work = copy.deepcopy(model).train()
    inputs, h = [], x
    with torch.no_grad():
        for piece in split(work, balance):
            inputs.append(h)
            h = piece(h)
    return inputs


def stage_costs(cfg: BenchConfig, mp: ModelProfile, model: nn.Sequential, parts: int,
                rule: str) -> SplitCosts:
    """Per-stage action seconds of brigade's own stage classes on the time-balanced split.

    Why the stage classes and not the summed block times: the engine runs them, with what
    they add (the saved-bytes hooks, the loss, zb1p's split backward, DNI's synthetic
    gradient and per-microbatch update in S and its training in T, PETRA's reconstruction
    in R, DGL's auxiliary head and its backward in F). ``rule`` is backprop, zb1p (backprop
    with I and W timed), dni, petra or dgl.
    """
    from brigade.stages.stage import StageSpec, make_stage_module

    balance = _balance(mp, parts)
    x, y = make_batch(cfg, mp.shape, mp.profile_batch)
    seconds: dict[tuple[int, str], float] = {}  # (stage, action kind) -> one microbatch's
    stored, acts, first = [], [], 0
    with _threads(1):
        inputs = _stage_inputs(model, balance, x)
        pieces = split(copy.deepcopy(model), balance)
        for s, piece in enumerate(pieces):
            last = s == parts - 1
            if rule != "dni":  # DNI's S updates inside, per microbatch: no U of its own
                seconds[(s, "U")] = _update_seconds(piece, cfg.repeats)
            st = _make_stage(rule, make_stage_module(list(piece), first), StageSpec(s, parts),
                             last, classes=SHAPES[mp.shape][1])
            first += len(piece)
            measured, held, out_bytes = _time_actions(rule, st, inputs[s], y if last else None,
                                                      cfg.repeats)
            seconds.update({(s, kind): t * mp.scale for kind, t in measured.items()})
            stored.append(held * mp.scale)
            acts.append(out_bytes * mp.scale)
    # each kind charged as the simulator charges it, folded actions once (as a measured
    # run is calibrated); DNI's last stage has no T: 0
    costs = costs_from_spans(seconds, parts, activation_bytes=acts, **_comm(cfg))
    return SplitCosts(balance, costs, stored, mp.source)


def _make_stage(rule: str, module: nn.Module, spec, last: bool, classes: int):
    """The stage class the engine builds for ``rule``, with its fixed options (zb1p's is
    backprop's; PETRA never steps inside R here; DGL's heads predict ``classes``)."""
    from brigade.stages.rules import get_method, method_names

    rule_spec = get_method(rule if rule in method_names() else "backprop")
    extra = {"petra": {"accumulate": 10**9}, "dgl": {"num_classes": classes}}.get(rule, {})
    return rule_spec.stage_class(module, spec, lambda p: torch.optim.SGD(p, lr=LR),
                                 nn.CrossEntropyLoss() if last else None,
                                 **rule_spec.fixed, **extra)


def _time_actions(rule: str, st, x: torch.Tensor, y: torch.Tensor | None,
                  repeats: int) -> tuple[dict[str, float], int, int]:
    """Median seconds per action kind over ``repeats`` microbatches (after one warm-up),
    the bytes the stage keeps for one in-flight microbatch, and the bytes it sends on."""
    samples: dict[str, list[float]] = {}
    held = out_bytes = 0
    for j in range(repeats + 1):
        spans, held, out_bytes = _one_microbatch(rule, st, j, x, y)
        if j:
            for kind, seconds in spans.items():
                samples.setdefault(kind, []).append(seconds)
    return {k: statistics.median(v) for k, v in samples.items()}, held, out_bytes


def _one_microbatch(rule: str, st, j: int, x: torch.Tensor, y: torch.Tensor | None
                    ) -> tuple[dict[str, float], int, int]:
    """Run microbatch ``j`` through every action ``rule`` has on this stage, timing each."""
    last = y is not None
    clock = time.perf_counter
    t0 = clock()
    if rule == "dgl" and not last:  # F trains the stage on its head's loss: it needs labels
        out = st.forward(j, x, None, label=torch.zeros(len(x), dtype=torch.long))
    else:
        out = st.forward(j, x, y)
    t1 = clock()
    if rule == "dni":
        out = out[0]
    held = st.stored_bytes()
    out_bytes = 0 if last else out.numel() * out.element_size()
    grad = None if last else torch.randn_like(out) * 1e-3
    first = {"dni": "S"}.get(rule, "F")
    if rule == "backprop":
        st.backward(j, grad)
        return {first: t1 - t0, "B": clock() - t1}, held, out_bytes
    if rule == "dgl":  # its backward ran inside F (the head's loss); nothing comes back
        return {first: t1 - t0}, held, out_bytes
    if rule == "zb1p":
        st.backward_input(j, grad)
        t2 = clock()
        st.backward_weight(j)
        return {first: t1 - t0, "I": t2 - t1, "W": clock() - t2}, held, out_bytes
    if rule == "dni":
        if last:  # the last stage has no synthetic gradient to train
            return {first: t1 - t0}, held, out_bytes
        st.train_sg(j, grad)
        return {first: t1 - t0, "T": clock() - t1}, held, out_bytes
    st.reverse(j) if last else st.reverse(j, out, grad)
    return {first: t1 - t0, "R": clock() - t1}, held, out_bytes


def _rule(schedule: str) -> str:
    """What is profiled for ``schedule``: its learning rule, or zb1p's split backward."""
    return "zb1p" if schedule == "zb1p" else _METHOD.get(schedule, "backprop")


def split_costs(cfg: BenchConfig, mp: ModelProfile, model: nn.Sequential, stages: int,
                schedule: str, cache: dict | None = None) -> SplitCosts:
    """The costs ``schedule`` is simulated with on a ``stages``-worker split (interleaved:
    ``stages x virtual`` model stages). With a ``cache`` dict, schedules that share a split
    and a learning rule (gpipe and 1f1b) share one profile, so they are predicted from the
    same numbers."""
    parts = stages * (cfg.virtual if schedule == "interleaved" else 1)
    key = (parts, _rule(schedule))
    if cache is None or key not in cache:
        sc = stage_costs(cfg, mp, model, parts, _rule(schedule))
        if cache is None:
            return sc
        cache[key] = sc
    return cache[key]
