"""Measurement: brigade (Ray, torchrun) and torch rounds of a split, taking turns, tallied
into rows."""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

from brigade import schedulers
from brigade.schedulers import ScheduleError, Timeline

from .config import BenchConfig, TORCH_SCHEDULES
from .costs import SplitCosts
from .peer import TorchPeer, TorchPeerError
from .pipeline import _brigade_pipeline, _brigade_warmup
from .profiling import make_batch, make_model
from .simulation import _row_base, applies

__all__ = ["measure_split"]


# -- measurement -------------------------------------------------------------------------------------
@dataclass
class _Tally:
    """Timed steps of one runner on one schedule, gathered over rounds."""

    step_times: list[float] = field(default_factory=list)
    span: float = 0.0  # worker-seconds of wall time
    idle: list[list[float]] = field(default_factory=list)  # per round, per worker
    busy_per_worker: list[float] = field(default_factory=list)  # seconds, summed over rounds
    steps: int = 0  # steps inside the timelines tallied
    calibrated: list[float | None] = field(default_factory=list)  # brigade: per round
    in_place: list[float | None] = field(default_factory=list)  # brigade: per round
    rounds: list[float] = field(default_factory=list)  # mean step seconds per round
    first_loss: float | None = None

    @property
    def bubble(self) -> float:
        busy = sum(self.busy_per_worker)  # worker-seconds inside compute spans
        return min(1.0, max(0.0, 1.0 - busy / self.span)) if self.span else 0.0

    def idle_per_worker(self) -> list[float]:
        if not self.idle:
            return []
        return [statistics.fmean(r[w] for r in self.idle) for w in range(len(self.idle[0]))]


def _brigade_round(cfg: BenchConfig, pipe, batch, tally: _Tally) -> Timeline:
    """An in-place profile of ``window`` steps, then ``window`` timed steps on brigade's Ray
    backend as one run (one driver round trip, as ``brigade train`` runs it); the round's
    timeline feeds busy and idle."""
    profiled = pipe.profile(*batch, steps=cfg.window)
    pipe.reset_timeline()
    t0 = time.perf_counter()
    pipe.run([batch] * cfg.window)
    walls = [(time.perf_counter() - t0) / cfg.window]
    return _tally_brigade(cfg, pipe.timeline(), walls, tally, profiled)  # this round's steps


def _peer_brigade_round(cfg: BenchConfig, peer: TorchPeer, tally: _Tally) -> Timeline:
    """An in-place profile of ``window`` steps, then ``window`` timed steps, on brigade's
    torchrun backend, run by the peer's ranks."""
    profiled = Timeline.from_json(
        peer.call("profile", runner="brigade", steps=cfg.window)["profile"])
    res = peer.call("run", runner="brigade", steps=cfg.window)
    return _tally_brigade(cfg, Timeline.from_json(res["timeline"]), res["wall"], tally, profiled)


def _tally_brigade(cfg: BenchConfig, tl: Timeline, walls: list[float], tally: _Tally,
                   profiled: Timeline) -> Timeline:
    """Add a brigade round: its step times (``walls``: seconds per step), its timeline (busy,
    idle) and its two predictions, from the in-place profile taken right before it (with
    this round's latency) and calibrated from its own spans."""
    tl.meta["time_unit"] = "s"
    tally.step_times += walls
    tally.rounds.append(statistics.fmean(walls))
    _tally_timeline(tally, tl, cfg.window)
    tally.calibrated.append(_predicted_step(tl, cfg.window))
    tally.in_place.append(_in_place_step(tl, profiled, cfg.window))
    return tl


def _predicted_step(tl: Timeline, steps: int) -> float | None:
    """Seconds per step the simulator predicts for the round ``tl`` with the costs this round
    measured (its mean action spans and message latency): what is left between that and the
    measured step time is engine overhead outside compute (driver round trips, waits) and the
    spread of the action times."""
    return _per_step(lambda: schedulers.predict(tl), steps)


def _in_place_step(tl: Timeline, profiled: Timeline, steps: int) -> float | None:
    """Seconds per step the simulator predicts for the round ``tl`` from an in-place profile
    (``Pipeline.profile`` of as many steps: every action timed where it runs, all workers at
    once, its sends charged to it; the simulator replays each action's own time), with the
    mean message latency (the receiver's wake-up) this round measured, which a profile that
    never waits cannot see. Why a profile per round, taken right before it: on this shared
    host the speed drifts by 10% within seconds (resnet18 gpipe on torchrun, three profile
    and run pairs of 3 steps: predicted from the profile / run 1.14, 0.93, 0.87), so one
    profile per split put its moment's speed into every round's prediction (one such run:
    1.10-1.28 on all four rounds); profiles spread over the rounds sample the speed the
    runs had."""
    return _per_step(lambda: schedulers.predict_from_profile(tl, profiled), steps)


def _per_step(simulation: Callable[[], Timeline], steps: int) -> float | None:
    """The simulated makespan per step, or None where the timeline cannot be simulated."""
    try:
        return simulation().makespan / steps
    except (ScheduleError, KeyError, ValueError):
        return None


def _torch_round(cfg: BenchConfig, peer: TorchPeer, tally: _Tally, schedule: str) -> Timeline:
    """``window`` timed steps on torch; its timed compute calls give busy and idle."""
    res = peer.call("run", steps=cfg.window)
    tally.step_times += res["wall"]
    tl = Timeline(events=[tuple(e) + ("compute",) for e in res["events"]],
                  num_workers=cfg.measure_stages, samples=cfg.batch_size * cfg.window,
                  meta={"source": "measured", "schedule": schedule, "runner": "torch",
                        "microbatches": cfg.microbatches, "time_unit": "s"})
    _tally_timeline(tally, tl, cfg.window)
    return tl


def _tally_timeline(tally: _Tally, tl: Timeline, steps: int) -> None:
    """Add a round's compute and span (worker-seconds) and its idle fractions."""
    workers = tl.num_workers
    busy = [tl.busy(w) for w in range(workers)]
    tally.span += workers * tl.makespan
    tally.idle.append([tl.idle_fraction(w) for w in range(workers)])
    tally.busy_per_worker = [a + b for a, b in zip(tally.busy_per_worker or [0.0] * workers, busy)]
    tally.steps += steps


def measure_split(cfg: BenchConfig, model_name: str, costs: dict[str, SplitCosts],
                  peer: TorchPeer | None, progress: Callable[[str], None] = lambda s: None
                  ) -> tuple[list[dict], dict[tuple[str, str], Timeline]]:
    """Measure every schedule of one split on brigade (each of ``cfg.backends``) and torch,
    round by round in rotating order.

    Returns one brigade row per backend and schedule (``backend`` says which), torch rows
    (once per torch schedule), and the last measured round of each runner for the Gantt
    picture, keyed ``(runner label, schedule)``.
    """
    shape = cfg.measure_shape
    batch = make_batch(cfg, shape, cfg.batch_size)
    rounds = max(1, math.ceil(cfg.steps / cfg.window))
    rows: list[dict] = []
    timelines: dict[tuple[str, str], Timeline] = {}
    torch_tallies: dict[str, tuple[_Tally, list[int]]] = {}
    for schedule in cfg.schedules:
        if not applies(schedule, model_name) or schedule not in costs:
            continue
        sc, tname = costs[schedule], TORCH_SCHEDULES[schedule]
        progress(f"measuring {model_name} {schedule} (brigade on {', '.join(cfg.backends)}) "
                 f"beside torch {tname}")
        tallies = {b: _Tally() for b in cfg.backends}
        theirs = _Tally()
        load = [os.getloadavg()[0]]
        ray_pipe = (_brigade_pipeline(cfg, make_model(cfg, model_name, shape), sc.balance, schedule)
                    if "ray" in tallies else nullcontext())
        with ray_pipe as pipe:
            if pipe is not None:
                tallies["ray"].first_loss = _brigade_warmup(cfg, pipe, batch, schedule)
            if "torchrun" in tallies:
                tallies["torchrun"].first_loss = _on_torch(peer, progress, lambda: _peer_build(
                    cfg, peer, "brigade", model_name, shape, schedule, sc.balance))
            theirs.first_loss = _on_torch(peer, progress, lambda: _peer_build(
                cfg, peer, "torch", model_name, shape, schedule, sc.balance))
            runs = {}  # runner label -> one round (None when the peer has failed)
            if pipe is not None:
                runs[("brigade (ray)", schedule)] = lambda: _brigade_round(
                    cfg, pipe, batch, tallies["ray"])
            if "torchrun" in tallies:
                runs[("brigade (torchrun)", schedule)] = lambda: _on_torch(
                    peer, progress, lambda: _peer_brigade_round(cfg, peer, tallies["torchrun"]))
            runs[("torch", tname)] = lambda: _on_torch(
                peer, progress, lambda: _torch_round(cfg, peer, theirs, tname))
            order = list(runs)
            for r in range(rounds):
                for label in order[r % len(order):] + order[:r % len(order)]:
                    tl = runs[label]()
                    if tl is not None:
                        timelines[label] = tl
        load.append(os.getloadavg()[0])
        for backend, tally in tallies.items():
            if not tally.step_times:  # the peer failed before this backend ran
                continue
            last = timelines[(f"brigade ({backend})", schedule)]  # peaks since the start
            rows.append(_brigade_row(cfg, model_name, schedule, backend, tally, sc.balance,
                                     last.meta.get("peak_stored_activation_bytes", []),
                                     theirs if peer and not peer.error else None))
            rows[-1]["load_avg_1min"] = load  # the machine's load at start and end (2 cores)
        if theirs.step_times and tname == schedule:
            torch_tallies[schedule] = (theirs, sc.balance)
    for schedule, (tally, balance) in torch_tallies.items():
        rows.append(_measured_row(cfg, model_name, schedule, "torch", tally, balance))
    return rows, timelines


def _brigade_row(cfg: BenchConfig, model: str, schedule: str, backend: str, tally: _Tally,
                 balance: list[int], peak: Sequence[int], theirs: _Tally | None) -> dict:
    """A measured brigade row on one backend, with torch's step time and the ratio beside."""
    row = _measured_row(cfg, model, schedule, "brigade", tally, balance, peak_per_stage=peak,
                        workers=cfg.measure_stages)
    row["backend"] = backend
    if theirs is not None and theirs.step_times:
        row.update(torch_schedule=TORCH_SCHEDULES[schedule],
                   torch_step_time_s=statistics.median(theirs.step_times),
                   torch_min_step_time_s=min(theirs.step_times),
                   torch_first_loss=theirs.first_loss)
        row["min_ratio_vs_torch"] = row["min_step_time_s"] / row["torch_min_step_time_s"]
        row["ratio_vs_torch"] = row["step_time_s"] / row["torch_step_time_s"]
    return row


def _on_torch(peer: TorchPeer | None, progress: Callable[[str], None],
              action: Callable[[], Any]) -> Any:
    """``action()`` on the torchrun peer, or None when the peer is absent or has failed; a
    failure is kept on the peer (the Ray measurements go on without it) and reported once."""
    if peer is None or peer.error is not None:
        return None
    try:
        return action()
    except TorchPeerError as err:
        peer.error = str(err)
        progress(f"torchrun peer failed; brigade on Ray goes on alone: {err}")
        return None


def _peer_build(cfg: BenchConfig, peer: TorchPeer, runner: str, model: str, shape: str,
                schedule: str, balance: list[int]) -> float | None:
    """Build ``runner``'s side of this split on the ranks (torch: ``schedule``'s torch
    companion; brigade: ``schedule`` itself) and run its warm-up steps; the first loss."""
    res = peer.call("build", runner=runner, config=_config_dict(cfg), model=model, shape=shape,
                    schedule=TORCH_SCHEDULES[schedule] if runner == "torch" else schedule,
                    balance=balance, warmup=cfg.warmup)
    return res.get("first_loss")


def _config_dict(cfg: BenchConfig) -> dict[str, Any]:
    """The config as JSON (tuples become lists; BenchConfig turns them back)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}


def _measured_row(cfg: BenchConfig, model: str, schedule: str, runner: str, tally: _Tally,
                  balance: list[int], peak_per_stage: Sequence[int] = (), workers: int = 2) -> dict:
    """A measured row: median step time, bubble and idle from the rounds' timelines."""
    step = statistics.median(tally.step_times)
    row = {**_row_base(cfg, model, cfg.measure_shape, cfg.measure_stages, schedule, runner),
           "step_time_s": step, "samples_per_s": cfg.batch_size / step,
           "min_step_time_s": min(tally.step_times),
           "bubble_fraction": tally.bubble, "idle_per_stage": tally.idle_per_worker(),
           "steps_timed": tally.steps,
           "step_times_s": tally.step_times, "balance": balance, "first_loss": tally.first_loss,
           "bubble_source": "timeline" if runner == "brigade" else "timed compute calls",
           "busy_per_step_s": [b / tally.steps for b in tally.busy_per_worker] if tally.steps else []}
    calibrated = [c for c in tally.calibrated if c]
    if calibrated:
        row["calibrated_samples_per_s"] = cfg.batch_size / statistics.median(calibrated)
    pairs = [(m, p) for m, p in zip(tally.rounds, tally.in_place) if p]
    if pairs:  # round by round (each its own profile and latency); predicted over measured
        # time of the rounds together: each round's profile-to-run noise averages out
        row["in_place_samples_per_s"] = cfg.batch_size / statistics.fmean(p for _, p in pairs)
        row["in_place_over_measured_rounds"] = [m / p for m, p in pairs]
        row["in_place_over_measured"] = sum(m for m, _ in pairs) / sum(p for _, p in pairs)
    if peak_per_stage:
        per_worker = [0.0] * workers
        for s, b in enumerate(peak_per_stage):
            per_worker[s % workers] += b
        row["peak_activation_bytes"] = max(per_worker)
        row["peak_activation_bytes_per_worker"] = per_worker
    return row


@contextmanager
def _ray_cluster(num_cpus: int = 2, env: dict[str, str] | None = None) -> Iterator[None]:
    """A private local Ray cluster for the measured runs, shut down on the way out (an
    already running one is used as it is, without ``env``)."""
    import ray

    started = not ray.is_initialized()
    if started:
        # address="local": private even where `ray start --head` runs (see ensure_ray)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 logging_level="ERROR",
                 log_to_driver=False, runtime_env={"env_vars": env} if env else None)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
