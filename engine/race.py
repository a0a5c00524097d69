"""``brigade race``: learning rules against the wall clock, on the same model, data and split.

Unlocking the backward pass is worth something only if it trains a model SOONER. A race
runs several methods one after another on the same model, data, number of stages,
microbatches and machine, each for the same training budget (``budget_s`` seconds of
training, or ``epochs``), and evaluates held-out accuracy at fixed intervals of training
time. The clock stops while it evaluates: evaluation is not charged to the method, so a
method is judged by how fast its training moves the accuracy, not by how often it is looked
at. Nor does looking stop the run: an evaluation that falls due inside a run is of the
weights each stage held when its work on that step ended, copied as the run goes
(``Pipeline.run(keep=)``) and evaluated after it, at the time the step ended. With a grid
of learning rates (``lrs``) every method runs once per rate and is reported at its best
(the rate that reaches the target soonest; if none does, the highest final accuracy), so
no method is handicapped by a rate chosen for another.

Per method the result holds ``final_test_accuracy`` (the whole test split, after training),
``time_to_target_s`` (the training seconds at the first evaluation that reached
``target``: an upper bound within one interval; None if never), ``samples_per_s``,
``updates`` (optimizer steps per stage), ``idle_fraction`` per stage, ``lr`` and ``curve``
(``[[seconds, accuracy], ...]`` on the first ``eval_size`` test examples, the first point at
0 s, before any training).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from .config import check_method_schedule
from .errors import PipelineConfigError

__all__ = ["RaceConfig", "DEFAULT_METHODS", "run_race", "best_lane", "time_to_target", "plot_race", "lane_updates"]

# The default field: the reference first (the table's ratios are against the first method).
DEFAULT_METHODS = ("backprop", "dni", "cdni")
MIN_EVAL_EVERY_S = 0.05  # evaluating more often than this measures the evaluation, not training


@dataclass
class RaceConfig:
    """One race: the shared setting and the methods to run in it."""

    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    model: str = "mlp"
    width: int | None = None
    data: str = "synthetic"
    data_dir: str | None = None
    stages: int = 2
    balance: list[int] | None = None
    microbatches: int = 4
    batch_size: int = 64
    budget_s: float | None = None  # training seconds per method (or epochs)
    epochs: int | None = None
    eval_every_s: float | None = None  # default: a twentieth of the budget
    eval_size: int = 2000  # test examples of each curve point (the final figure: all)
    target: float | None = None
    lrs: list[float] | None = None  # None: each method's default rate
    optimizer: str | None = None  # None: each method's default optimizer
    backend: str = "local"
    seed: int = 0
    synthetic_size: int = 2048
    tensorboard: str | None = None
    options: dict = field(default_factory=dict)  # per method: {"dni": {"sg_lr": ...}}

    def __post_init__(self) -> None:
        if not self.methods:
            raise PipelineConfigError(
                f"--methods is empty; name at least one, e.g. {','.join(DEFAULT_METHODS[:2])}")
        self.methods = [self._method(m) for m in self.methods]
        if len(set(self.methods)) != len(self.methods):
            raise PipelineConfigError(f"--methods {','.join(self.methods)} names a method twice")
        if (self.budget_s is None) == (self.epochs is None):
            raise PipelineConfigError("give exactly one of --budget-s SECONDS or --epochs N")
        if self.budget_s is not None and not (self.budget_s > 0 and math.isfinite(self.budget_s)):
            raise PipelineConfigError(f"--budget-s {self.budget_s} must be a positive number of seconds")
        if self.epochs is not None and not (isinstance(self.epochs, int) and self.epochs >= 1):
            raise PipelineConfigError(f"--epochs {self.epochs} must be >= 1")
        if self.eval_every_s is not None and not (self.eval_every_s >= MIN_EVAL_EVERY_S
                                                  and math.isfinite(self.eval_every_s)):
            raise PipelineConfigError(
                f"--eval-every-s {self.eval_every_s} must be at least {MIN_EVAL_EVERY_S} s")
        if self.target is not None and not 0.0 < self.target <= 1.0:
            raise PipelineConfigError(f"--target {self.target} must be an accuracy in (0, 1], e.g. 0.95")
        if self.lrs is not None:
            if not self.lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in self.lrs):
                raise PipelineConfigError(
                    f"--lrs {','.join(map(str, self.lrs))} must be positive rates, e.g. 0.01,0.03,0.1")
        if self.eval_size < 1:
            raise PipelineConfigError(f"--eval-size {self.eval_size} must be >= 1")
        unknown = set(self.options) - set(self.methods)
        if unknown:
            raise PipelineConfigError(f"options given for {sorted(unknown)}, not in --methods")
        for lane in self.lanes():  # every lane's TrainConfig checks its flags now, before data
            self.train_config(*lane)

    @staticmethod
    def _method(name: str) -> str:
        """A registered rule's name (the registry's error, naming --methods, otherwise)."""
        try:
            return check_method_schedule(str(name), None)
        except PipelineConfigError as err:
            raise PipelineConfigError(f"{err} (in --methods)") from None

    def validate(self) -> RaceConfig:
        """What needs the outside world (the model's shape, an installed tensorboard) for
        every lane, as ``brigade train`` checks it: before any data, cluster or bar."""
        from .train import validate

        for lane in self.lanes():
            validate(self.train_config(*lane))
        return self

    @property
    def interval_s(self) -> float | None:
        """Training seconds between evaluations (None: evaluate once per epoch)."""
        if self.eval_every_s is not None:
            return self.eval_every_s
        return None if self.budget_s is None else max(MIN_EVAL_EVERY_S, self.budget_s / 20)

    def lanes(self) -> list[tuple[str, float | None]]:
        """(method, lr) for every run of the race, method by method."""
        return [(m, lr) for m in self.methods for lr in (self.lrs or [None])]

    def train_config(self, method: str, lr: float | None):
        """The TrainConfig of one lane: the shared setting, this method and rate."""
        from .train import TrainConfig

        return TrainConfig(
            model=self.model, width=self.width, data=self.data, data_dir=self.data_dir,
            stages=self.stages, balance=self.balance, method=method,
            microbatches=self.microbatches, batch_size=self.batch_size,
            epochs=self.epochs or 1, steps=None if self.epochs else 10**9, lr=lr,
            optimizer=self.optimizer, seed=self.seed, backend=self.backend,
            synthetic_size=self.synthetic_size, options=dict(self.options.get(method, {})),
        )


def time_to_target(curve: list[list[float]], target: float | None) -> float | None:
    """Training seconds at the first curve point at or above ``target`` (None: never)."""
    if target is None:
        return None
    for seconds, acc in curve:
        if acc >= target:
            return seconds
    return None


def best_lane(lanes: list[dict]) -> dict:
    """The lane a method is reported by: the soonest to the target; among lanes that never
    reach it (or without a target), the highest final accuracy. A lane whose loss diverged
    is a rate the user cannot keep, so it is reported only where every rate diverged."""
    lanes = [r for r in lanes if r.get("diverged_at_step") is None] or lanes
    reached = [r for r in lanes if r["time_to_target_s"] is not None]
    if reached:
        return min(reached, key=lambda r: (r["time_to_target_s"], -r["final_test_accuracy"]))
    return max(lanes, key=lambda r: r["final_test_accuracy"])


def lane_updates(timeline, stages: int, accumulate: int = 1) -> list[int]:
    """Optimizer steps per stage, counted from the timeline: U (backprop, stale, fwdgrad),
    S (DNI: each forward updates), R (PETRA: one per ``accumulate`` reconstructions)."""
    counts = [0] * stages
    recon = [0] * stages
    for e in timeline.events:
        if e.category != "compute":  # a wait before an action carries the action's kind
            continue
        if e.kind in ("U", "S"):
            counts[e.stage] += 1
        elif e.kind == "R":
            recon[e.stage] += 1
    return [c + r // max(1, accumulate) for c, r in zip(counts, recon)]


KEEPS_PER_INTERVAL = 2  # kept candidates per evaluation interval, predicted from step_s


def _keep_steps(n: int, step_s: float | None, clock: float, next_eval: float | None,
                interval: float | None) -> list[int]:
    """The steps (0-based) of a run of ``n`` starting at ``clock`` whose weights to keep as
    evaluation candidates: the first step predicted to end at or after each due time from
    ``next_eval`` on, and after each half-way point between them, at ``step_s`` seconds a
    step (the last run's). Why candidates and not only the due steps: a step's time is a
    guess, and a wrong one crowded the curve's points or left holes in it; the candidates'
    real times pick the points (:func:`_pick_kept`). Why not more: each keeps a copy of the
    weights on the clock (about 13 ms a step for the 1.9M-parameter MLP on Ray, before it
    travelled as numpy). None without a step's time or an interval; the run's last step is
    its end (the current weights)."""
    if not step_s or next_eval is None or not interval:
        return []
    steps: list[int] = []
    due, every = next_eval, interval / KEEPS_PER_INTERVAL
    while due < clock + (n - 1) * step_s:
        t = max(0, math.ceil((due - clock) / step_s) - 1)
        if t < n - 1 and (not steps or steps[-1] != t):
            steps.append(t)
        due += every
    return steps


def _pick_kept(kept: list[tuple[float, Any]], next_eval: float | None,
               interval: float | None) -> list[tuple[float, Any]]:
    """For each evaluation due from ``next_eval`` on, every ``interval``, the first kept
    candidate at or after its time; a candidate is picked once, and dues past the last
    candidate are left to the run's end."""
    picked: list[tuple[float, Any]] = []
    if next_eval is None or not interval:
        return picked
    due = next_eval
    for at, weights in sorted(kept, key=lambda k: k[0]):
        if at >= due:
            picked.append((at, weights))
            while due <= at:
                due += interval
    return picked


class _Diverged(Exception):
    """A lane's training loss became nan or inf at ``step``: that rate ends there."""

    def __init__(self, step: int) -> None:
        super().__init__(step)
        self.step = step


class _Lane:
    """One method at one rate: its pipeline, its charged clock and its curve."""

    def __init__(self, rc: RaceConfig, method: str, lr: float | None, data, writer) -> None:
        from .train import _Run, _model_kwargs

        self.rc, self.method = rc, method
        self.cfg = rc.train_config(method, lr)
        self.train, self.test, self.probe = data
        kwargs = _model_kwargs(self.cfg, self.train.shape, self.train.num_classes)
        self.run = _Run(self.cfg, self.train, self.test, kwargs, None, None)
        self.writer = writer
        self.clock = 0.0
        self.curve: list[list[float]] = []
        self.losses: list[float] = []
        self.diverged_at: int | None = None

    def evaluate(self, pipe, at: float | None = None) -> float:
        """Accuracy on the probe split of the weights the pipeline holds, put on the curve
        at ``at`` seconds of training (default: now), clock stopped (not charged)."""
        from .train import pipeline_accuracy

        acc = pipeline_accuracy(pipe, self.probe)
        at = self.clock if at is None else at
        self.curve.append([round(at, 4), acc])
        if self.writer is not None:
            self.writer.scalar("test_accuracy", acc, self.run.done, at)
        return acc

    def evaluate_kept(self, pipe, kept: list[tuple[float, dict]]) -> float | None:
        """Accuracy of each kept set of weights, at the training time it was kept: loaded
        into the stages for the evaluation, and the weights they hold now put back (the
        optimizer and rule state are not touched)."""
        if not kept:
            return None
        now = pipe.state_dict()
        acc = None
        for at, weights in kept:
            pipe.load_state_dict(weights)
            acc = self.evaluate(pipe, at)
        pipe.load_state_dict(now)
        return acc

    def race(self, tick: Callable[[float, dict], None] | None) -> dict[str, Any]:
        """Train until the budget is spent, evaluating at each interval; returns the lane's
        figures."""
        pipe = self.run.start_pipeline()
        with pipe:
            try:
                self._train(pipe, tick)
            except _Diverged as err:  # this rate is out of the race; the others go on
                self.diverged_at = err.step
            if not self.curve or self.curve[-1][0] != round(self.clock, 4):
                self.evaluate(pipe)
            return self._figures(pipe)

    def _run_steps(self, pipe, step_s: float | None) -> int:
        """Steps in the next run: the method's own run length (the first run is one step,
        to time a step), not far past the budget, ending on an epoch's end."""
        from .train import window_steps

        rc = self.rc
        n = window_steps(self.cfg, pipe, step_s) if step_s else 1
        if step_s and rc.budget_s is not None:
            n = max(1, min(n, math.ceil((rc.budget_s - self.clock) / step_s)))
        if rc.epochs:
            per_epoch = len(self.run.loader)
            n = min(n, per_epoch * rc.epochs - self.run.done,
                    per_epoch - self.run.done % per_epoch)
        return n

    def _train(self, pipe, tick) -> None:
        """Runs until the budget (or the epochs) is spent. An evaluation due inside a run
        is of the weights kept at the first candidate step that ended at or after its time
        (``Pipeline.run(keep=)``, two candidates an interval: :func:`_keep_steps`), put
        on the curve at the time that step ended: the run is not cut there. Why: a cut
        fills and drains the pipeline, which costs a decoupled rule (dni, petra, dgl: one
        fill per run) a pipeline's depth of idle time per evaluation, and costs a flush
        schedule nothing; at an evaluation every 0.25 s that was a third of dgl's
        throughput."""
        rc = self.rc
        self.evaluate(pipe)
        interval = rc.interval_s
        next_eval = interval
        step_s = None
        last_epoch = 0
        while not self._done(len(self.run.loader) * rc.epochs if rc.epochs else None):
            n = self._run_steps(pipe, step_s)
            chunk = self.run._next_batches(n)
            keep = _keep_steps(len(chunk), step_s, self.clock, next_eval, interval)
            t0 = time.perf_counter()
            outs = pipe.run([(x, y) for _, x, y in chunk], keep=keep)
            spent = time.perf_counter() - t0
            start, self.clock = self.clock, self.clock + spent
            step_s = spent / len(outs)
            self.run.done += len(outs)
            self._record(outs)
            kept = [(start + o["weights_at"] - t0, o["weights"]) for o in outs if "weights" in o]
            acc = self.evaluate_kept(pipe, _pick_kept(kept, next_eval, interval))
            while next_eval is not None and acc is not None and next_eval <= self.curve[-1][0]:
                next_eval += interval
            epoch = chunk[-1][0]
            epoch_done = rc.epochs is not None and self.run.done % len(self.run.loader) == 0
            due = (next_eval is not None and self.clock >= next_eval) or (
                next_eval is None and (epoch_done or epoch != last_epoch))
            if due:  # a run that kept no step for it (the first one, a slow one)
                acc = self.evaluate(pipe)
                last_epoch = epoch + 1 if epoch_done else epoch  # evaluated: this one
            while next_eval is not None and next_eval <= self.clock:
                next_eval += interval
            if tick:
                tick(self.clock, {"method": self.method, "acc": acc} if acc is not None
                     else {"method": self.method, "loss": self.losses[-1]})

    def _done(self, epoch_end: int | None) -> bool:
        if epoch_end is not None:
            return self.run.done >= epoch_end
        return self.clock >= self.rc.budget_s

    def _record(self, outs: list[dict]) -> None:
        for i, out in enumerate(outs):
            if not math.isfinite(out["loss"]):
                raise _Diverged(self.run.done - len(outs) + i + 1)
            self.losses.append(out["loss"])
        if self.writer is not None:
            self.writer.scalar("train_loss", outs[-1]["loss"], self.run.done, self.clock)

    def _figures(self, pipe) -> dict[str, Any]:
        from .train import pipeline_accuracy

        tl = pipe.timeline()
        idle = [tl.idle_fraction(w) for w in range(tl.num_workers)]
        accumulate = getattr(pipe.schedule, "accumulate", 1) or 1
        final = pipeline_accuracy(pipe, self.test)
        sps = tl.samples / self.clock if self.clock > 0 else 0.0
        if self.writer is not None:
            self.writer.scalar("samples_per_s", sps, self.run.done, self.clock)
            for w, f in enumerate(idle):
                self.writer.scalar(f"idle_fraction/stage{w}", f, self.run.done, self.clock)
        return {
            "method": self.method, "schedule": self.cfg.schedule, "lr": self.cfg.lr,
            "optimizer": self.cfg.optimizer, "balance": list(pipe.balance),
            "steps": self.run.done, "train_s": self.clock, "samples_per_s": sps,
            "updates": lane_updates(tl, len(pipe.balance), accumulate),
            "idle_fraction": idle, "final_test_accuracy": final,
            "time_to_target_s": time_to_target(self.curve, self.rc.target),
            "curve": self.curve, "final_train_loss": self.losses[-1] if self.losses else None,
            "diverged_at_step": self.diverged_at,
        }


def _data(rc: RaceConfig):
    """Train split, test split and the first ``eval_size`` test examples (the curve's)."""
    from brigade.stages.data import Dataset

    from .train import _load

    train, test = _load(rc.train_config(rc.methods[0], None))
    n = min(rc.eval_size, len(test))
    probe = Dataset(test.name, test.x[:n], test.y[:n], test.num_classes) if n < len(test) else test
    return train, test, probe


def run_race(rc: RaceConfig, progress: Callable[[float, float, dict], None] | None = None
             ) -> dict[str, Any]:
    """Run every lane of ``rc``; returns ``{"config", "methods": {name: best lane},
    "lanes": [every lane]}``. ``progress(done, total, info)`` gets training seconds (budget
    races) or steps... here: seconds charged so far over all lanes against the total."""
    import torch

    from .tensorboard import open_writer

    rc.validate()
    data = _data(rc)
    lanes_cfg = rc.lanes()
    total = rc.budget_s * len(lanes_cfg) if rc.budget_s else None
    lanes: list[dict] = []
    spent_before = 0.0
    for i, (method, lr) in enumerate(lanes_cfg):
        torch.manual_seed(rc.seed)
        name = method if lr is None else f"{method}-lr{lr:g}"
        writer = open_writer(rc.tensorboard, name)

        def tick(clock: float, info: dict, _before=spent_before, _i=i) -> None:
            if progress:
                done = _before + clock if total else _i
                progress(min(done, total) if total else done, total or len(lanes_cfg),
                         {**info, "lane": f"{_i + 1}/{len(lanes_cfg)}"})

        try:
            result = _Lane(rc, method, lr, data, writer).race(tick)
        finally:
            if writer is not None:
                writer.close()
        lanes.append(result)
        spent_before += result["train_s"] if total is None else rc.budget_s
    best = {m: best_lane([r for r in lanes if r["method"] == m]) for m in rc.methods}
    return {"config": asdict(rc), "methods": best, "lanes": lanes,
            "eval_examples": len(data[2].y)}


def plot_race(result: dict[str, Any], path: str, title: str | None = None) -> None:
    """Test accuracy against training seconds, one line per method (at its best rate),
    the target as a dashed line; PNG or SVG by the file's extension."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, lane in result["methods"].items():
        xs = [p[0] for p in lane["curve"]]
        ys = [p[1] for p in lane["curve"]]
        ttt = lane["time_to_target_s"]
        label = f"{name} (lr {lane['lr']:g}, {lane['optimizer']})"
        if ttt is not None:
            label += f": {ttt:.1f} s to target"
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    if cfg.get("target"):
        ax.axhline(cfg["target"], color="grey", linestyle="--", linewidth=1,
                   label=f"target {cfg['target']:g}")
    ax.set_xlabel("training wall-clock seconds (evaluation not charged)")
    shown = result.get("eval_examples", cfg["eval_size"])  # the test split may be smaller
    ax.set_ylabel(f"test accuracy (first {shown} test examples)")
    ax.set_title(title or f"{cfg['model']} on {cfg['data']}: {cfg['stages']} stages, "
                          f"m={cfg['microbatches']}, backend {cfg['backend']}")
    ax.grid(alpha=0.3)
    lows = [p[1] for lane in result["methods"].values() for p in lane["curve"][1:]]
    if lows:
        ax.set_ylim(max(0.0, min(lows) - 0.05), 1.0)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
