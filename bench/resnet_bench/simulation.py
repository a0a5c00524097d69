"""Simulation: every schedule of a split under its profiled costs, as rows of the report."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from brigade import schedulers
from brigade.schedulers import Costs, ScheduleError, Timeline

from .config import BenchConfig
from .costs import SplitCosts, split_costs
from .profiling import ModelProfile

__all__ = ["applies", "simulate_costs", "simulate_split"]


# -- simulation ------------------------------------------------------------------------------------
def _skip_reason(cfg: BenchConfig, model: str, blocks: int, stages: int, schedule: str) -> str | None:
    """Why ``schedule`` cannot run this split (None when it can)."""
    v = cfg.virtual if schedule == "interleaved" else 1
    if stages * v > blocks:
        return f"{stages * v} model stages but {model} has {blocks} blocks"
    try:
        schedulers.build(schedule, stages=stages, microbatches=cfg.microbatches, virtual=v)
    except ScheduleError as err:
        return str(err).split(";")[0]
    return None


def applies(schedule: str, model: str) -> bool:
    """PETRA needs reversible stages: revnets only."""
    return schedule != "petra" or model.startswith("revnet")


def _steps_of(cfg: BenchConfig, schedule: str) -> int:
    """Simulated steps: one for flush schedules, a window for decoupled ones."""
    return cfg.window if schedule in schedulers.DECOUPLED else 1


def simulate_costs(cfg: BenchConfig, schedule: str, stages: int, costs: Costs,
                   steps: int | None = None) -> Timeline:
    """Simulate ``schedule`` with sends charged to the sender (brigade's sends block)."""
    v = cfg.virtual if schedule == "interleaved" else 1
    sched = schedulers.build(schedule, stages=stages, microbatches=cfg.microbatches, virtual=v,
                             steps=steps or _steps_of(cfg, schedule))
    tl = schedulers.simulate(schedulers.lower(sched), costs)
    tl.meta["time_unit"] = "s"
    return tl


def _peak_bytes(tl: Timeline, stored: Sequence[float], workers: int) -> list[float]:
    """Per worker: the sum over its stages of peak in-flight microbatches x bytes each."""
    out = [0.0] * workers
    for s, per_mb in enumerate(stored):
        out[s % workers] += tl.peak_activations(s) * per_mb
    return out


def _timeline_row(cfg: BenchConfig, tl: Timeline, steps: int) -> dict[str, Any]:
    """Step time, samples/s, bubble and idle per worker of a (simulated) timeline."""
    step = tl.makespan / steps
    return {"step_time_s": step, "samples_per_s": cfg.batch_size / step if step else 0.0,
            "bubble_fraction": tl.bubble_fraction,
            "idle_per_stage": [tl.idle_fraction(w) for w in range(tl.num_workers)],
            "busy_per_step_s": [tl.busy(w) / steps for w in range(tl.num_workers)]}


def simulate_split(cfg: BenchConfig, mp: ModelProfile, model: nn.Sequential, stages: int,
                   on_costs: Callable[[str, SplitCosts], None] | None = None) -> list[dict]:
    """One simulated row per schedule for this (model, shape, stages) split."""
    rows: list[dict] = []
    cache: dict[tuple[int, str], SplitCosts] = {}
    for schedule in cfg.schedules:
        if not applies(schedule, mp.model):
            continue
        base = _row_base(cfg, mp.model, mp.shape, stages, schedule, "simulated")
        reason = _skip_reason(cfg, mp.model, len(mp.blocks), stages, schedule)
        if reason:
            rows.append({**base, "skipped": reason, "step_time_s": None, "samples_per_s": None,
                         "bubble_fraction": None})
            continue
        sc = split_costs(cfg, mp, model, stages, schedule, cache)
        steps = _steps_of(cfg, schedule)
        tl = simulate_costs(cfg, schedule, stages, sc.costs, steps)
        peaks = _peak_bytes(tl, sc.stored_bytes, stages)
        rows.append({**base, **_timeline_row(cfg, tl, steps), "simulated_steps": steps,
                     "balance": sc.balance, "costs": sc.source,
                     "peak_activation_bytes": max(peaks), "peak_activation_bytes_per_worker": peaks,
                     "stage_seconds": [round(x, 6) for x in _stage_seconds(sc.costs, stages)]})
        if on_costs is not None:
            on_costs(schedule, sc)
    return rows


def _stage_seconds(costs: Costs, stages: int) -> list[float]:
    """Compute seconds per microbatch on each worker (f + b, zb1p's b = i + w, S + T, or
    F + R), model stage s on worker s mod ``stages``."""
    c = costs.resolve(len(costs.f) if isinstance(costs.f, list) else stages)
    out = [0.0] * stages
    for s, (f, b, sg) in enumerate(zip(c.f, c.b, c.sg)):
        out[s % stages] += f + b + sg
    return out


def _row_base(cfg: BenchConfig, model: str, shape: str, stages: int, schedule: str,
              runner: str) -> dict[str, Any]:
    """The keys that identify a row (what was run, where)."""
    return {"model": model, "shape": shape, "width": cfg.width, "stages": stages,
            "virtual": cfg.virtual if schedule == "interleaved" else 1,
            "microbatches": cfg.microbatches, "batch_size": cfg.batch_size,
            "schedule": schedule, "runner": runner}
