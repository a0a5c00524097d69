"""The public Pipeline: cut a model into stages, run a schedule on them, measure it.

``Pipeline`` hides the processes the way ``ray.util.queue.Queue`` hides its actor: the user
sees ``step``, ``predict``, ``state_dict``, ``timeline`` and ``shutdown``. The schedule comes
from :mod:`brigade.schedulers` as data (per-worker action lists) and the same lists drive the
simulator, so a measured timeline and its prediction print side by side.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections import deque
from typing import Any, Callable, Sequence

import torch
from torch import nn

from brigade import schedulers
from brigade.schedulers import Action, Event, Timeline
from brigade.stages.partition import Partition, partition, split
from brigade.stages.rules import get_method
from brigade.stages.stage import make_stage_module

from .config import PipelineConfig
from .flags import accepts
from .errors import PipelineConfigError, PipelineError
from .microbatch import loss_weights, split_batch
from .phases import PhaseLog
from .spec import WorkerSpec

__all__ = ["Pipeline", "MAX_EVENTS", "keep_points"]

MAX_EVENTS = 500_000  # measured events kept on the driver (about 100 MB at most)


def _concatenate(base: schedulers.Schedule, steps: int, phase: int) -> list[list[Action]]:
    """Steps ``phase, phase+1, ...`` of a flush schedule's periodic pattern, renumbered
    from 0. Valid because a flush schedule's steps never overlap on a worker."""
    m, period = base.microbatches, base.steps
    program: list[list[Action]] = []
    for row in base.workers:
        by_step: dict[int, list[Action]] = {}
        for a in row:
            t = a.microbatch if a.kind == "U" else a.microbatch // m
            by_step.setdefault(t, []).append(a)
        out = []
        for i in range(steps):
            b = (phase + i) % period
            for a in by_step.get(b, []):
                j = i if a.kind == "U" else a.microbatch - b * m + i * m
                out.append(Action(a.stage, a.kind, j))
        program.append(out)
    return program


def _identity(batches) -> tuple[int, ...]:
    """Which tensors a list of batches holds (a staged run is matched by them, not by
    value: comparing values would cost what staging saves)."""
    return tuple(id(t) for pair in batches for t in pair)


def keep_points(row: list[Action], steps: list[int], microbatches: int) -> dict[Action, int]:
    """Where a worker's program leaves each stage's weights as kept step ``t`` made them:
    after the stage's last action on a microbatch of step ``t``, and after the updates of
    that stage that follow it before the stage's next other work (an update's index is
    not always a step: PETRA's counts accumulations). Why not at U(t): DNI and PETRA
    update inside other actions, and a decoupled stage may run step t+1 before it."""
    wanted = set(steps)
    last: dict[tuple[int, int], int] = {}  # (stage, step) -> index of its last action
    for i, a in enumerate(row):
        if a.kind != "U" and a.microbatch // microbatches in wanted:
            last[(a.stage, a.microbatch // microbatches)] = i
    points: dict[Action, int] = {}
    for (stage, t), i in last.items():
        end = i
        for k in range(i + 1, len(row)):
            if row[k].stage != stage:
                continue
            if row[k].kind != "U":
                break
            end = k
        points[row[end]] = t
    return points


_POSITIONAL_DEFAULTS = dict(stages=2, schedule=None, method="backprop", microbatches=4,
                           virtual=1, backend="ray")


def _config(config: PipelineConfig | None, keys: dict[str, Any], **named: Any) -> PipelineConfig:
    """The pipeline's config: ``config`` as given, or built from the keywords (config keys
    to the config, the rest to the stage options)."""
    given = {k: v for k, v in keys.items() if accepts(PipelineConfig, k)}
    options = {k: v for k, v in keys.items() if k not in given}
    if config is None:
        options = {**given.pop("options", {}), **options}
        return PipelineConfig(**named, **given, options=options)
    clash = sorted(given) + [k for k, v in named.items() if v != _POSITIONAL_DEFAULTS[k]]
    if clash:
        raise PipelineConfigError(
            f"give the configuration either as config= or as keywords, not both "
            f"({', '.join(clash)} given beside config=)")
    if options:
        config = dataclasses.replace(config, options={**config.options, **options})
    return config


class Pipeline:
    """A model trained by a pipeline of stages (the README's "Python API" is the contract).

    ``stages`` is the number of workers (processes), or a balance list of block counts with
    ``workers x virtual`` entries. Interleaved schedules put ``virtual`` non-adjacent model
    stages on each worker (worker w holds stages w, w + p, ...).
    """

    def __init__(
        self,
        model: nn.Sequential,
        stages: int | list[int] = 2,
        schedule: str | None = None,
        method: str = "backprop",
        microbatches: int = 4,
        virtual: int = 1,
        optimizer: Callable[[Any], torch.optim.Optimizer] | None = None,
        loss_fn: nn.Module | None = None,
        backend: str = "ray",
        *,
        config: PipelineConfig | None = None,
        sample: torch.Tensor | None = None,
        phases: PhaseLog | None = None,
        **keys: Any,
    ) -> None:
        """``config``: the whole configuration as one object; without it, the keywords
        build one (``balance_by``, ``autocast``, the cluster's ``address``,
        ``cpus_per_stage``, ``gpus_per_stage``, ``placement``, ``placement_timeout_s``,
        ``transport``, ``timeout_s``, ``schedule_options``; any other keyword is an option
        of the method's stage class, e.g. ``sg_lr``). ``phases`` hears the timed start-up
        phases (Ray cluster, blocks profiled, stages placed)."""
        self.config = _config(config, keys, stages=stages, schedule=schedule, method=method,
                              microbatches=microbatches, virtual=virtual, backend=backend)
        if not isinstance(model, nn.Sequential):
            raise PipelineConfigError(
                f"model must be an nn.Sequential of blocks (got {type(model).__name__}); "
                "wrap your layers in nn.Sequential so contiguous cuts are stages"
            )
        self.phases = phases if phases is not None else PhaseLog()
        self.rule = get_method(self.config.method)  # the rule's declaration
        self.rule_options = self._rule_options(self.config.options, self.config.schedule_options)
        self.config.schedule_options = {**self.rule.schedule_options(self.rule_options),
                                        **self.config.schedule_options}
        # BatchNorm1d cannot train on a microbatch of one sample (one value per channel)
        self._min_microbatch = 2 if any(isinstance(mod, nn.BatchNorm1d)
                                        for mod in model.modules()) else 1
        self.schedule = self._build(1)
        period = int(self.schedule.options.get("k", 1))  # stale repeats every k steps
        if not self.decoupled and period != 1:  # build one period of the pattern
            self.schedule = self._build(period)
        self._programs: dict[tuple[int, int], list[list[Action]]] = {}
        # Before the cut: the method balancer times the blocks with the stages' own options.
        self._stage_options = self.rule.stage_kwargs(self.rule_options, model, self.schedule)
        self.partition: Partition | None = None  # the cut and what it was balanced by
        self.balance = self._balance(model, sample)
        n = self.schedule.num_stages
        self.labels_to = frozenset(
            s for s in range(n) if self.rule.labels_to(s, n, self.rule_options))
        # Bounded so that a long run cannot grow the driver's memory without limit; the
        # timeline then covers the most recent events (meta says how many were dropped).
        self._events: deque[Event] = deque(maxlen=MAX_EVENTS)
        self._dropped = 0
        self._samples = 0
        self._steps = 0
        self._timeline_steps = 0  # steps the recorded events cover (reset_timeline clears)
        # (batches, token) of the inputs the last run shipped ahead (``run(then=...)``); held,
        # so their tensors' ids stay theirs while they are matched by identity
        self._staged: tuple[list, int] | None = None
        self._peak_bytes: dict[int, int] = {}
        self._owns_ray = False
        self.started_ray = False  # whether this pipeline started the Ray cluster it runs on
        self._backend = self._start(model, optimizer, loss_fn or nn.CrossEntropyLoss())
        self.worker_pids: list[int] = list(self._backend.pids)  # one process id per worker

    # -- construction ---------------------------------------------------------------------
    def _balance(self, model: nn.Sequential, sample: torch.Tensor | None) -> list[int]:
        """Blocks per model stage: as given, or by the chosen balancer. The default
        (``balance_by=None``) is ``"method"`` for a rule whose declaration carries a
        balancer cost (``costs.balancer``: every built-in but backprop) when a sample batch
        is given, so the rule's own work decides the cut; else uniform.
        ``self.partition`` keeps the cut and, when measured, its per-stage costs."""
        n = self.config.num_model_stages
        if self.config.balance is not None:
            balance = list(self.config.balance)
            if sum(balance) != len(model):
                raise PipelineConfigError(
                    f"balance {balance} sums to {sum(balance)} but the model has "
                    f"{len(model)} blocks"
                )
            self.partition = Partition.from_profile(model, balance, None)
            return balance
        by = self.config.balancer(sampled=sample is not None)
        measured = by in ("time", "method")
        t0 = time.perf_counter()
        # Only the measured balancers need the blocks profiled: uniform and params would
        # throw that work away (1.7 s of the MLP main job's start-up, measured)
        self.partition = partition(model, n, by=by, sample=sample if measured else None,
                                   method=self.rule, method_options=self._stage_options,
                                   microbatches=self.config.microbatches)
        balance = self.partition.balance
        if self.config.backend == "torchrun":  # measured balances differ between ranks
            from .torchrun_backend import broadcast_object

            balance = broadcast_object(balance)
        if measured:
            costs = f"{self.partition.method} costs" if by == "method" else "block times"
            self.phases.record("profiled", time.perf_counter() - t0,
                               f"profiled {len(model)} blocks on a batch of {len(sample)} "
                               f"(balance by {by}, {costs}): balance {list(balance)}",
                               balance=list(balance), by=by)
        return balance

    @property
    def decoupled(self) -> bool:
        """Whether the schedule runs without a flush between steps (dni, petra)."""
        return self.config.schedule in schedulers.DECOUPLED

    def _build(self, steps: int) -> schedulers.Schedule:
        return schedulers.build(
            self.config.schedule, stages=self.config.num_workers,
            microbatches=self.config.microbatches, virtual=self.config.virtual, steps=steps,
            **self.config.schedule_options,
        )

    def _rule_options(self, options: dict[str, Any], schedule_options: dict[str, Any]) -> Any:
        """The rule's typed options, checked here, on the driver, before any process starts:
        the stage options, and the schedule options that are the rule's own (stale's k)."""
        own = {f.name for f in dataclasses.fields(self.rule.options) if f.metadata.get("schedule")}
        return self.rule.make_options(
            **{**options, **{k: v for k, v in schedule_options.items() if k in own}})

    def _specs(self, model, optimizer, loss_fn) -> list[WorkerSpec]:
        """Cut the model (a private copy) and assign each stage to its worker."""
        model = copy.deepcopy(model)
        pieces = split(model, self.balance)
        firsts = [sum(self.balance[:i]) for i in range(len(self.balance))]
        worker_of = [self.schedule.worker_of(s) for s in range(len(pieces))]
        specs = []
        for w in range(self.config.num_workers):
            mods = {
                s: make_stage_module(list(pieces[s]), firsts[s])
                for s in range(len(pieces)) if worker_of[s] == w
            }
            specs.append(WorkerSpec(
                index=w, modules=mods, worker_of=worker_of, rule=self.rule,
                optimizer_factory=optimizer, loss_fn=loss_fn, options=self._stage_options,
                labels_to=self.labels_to, autocast=self.config.autocast,
            ))
        return specs

    def _start(self, model, optimizer, loss_fn):
        specs = self._specs(model, optimizer, loss_fn)
        t0 = time.perf_counter()
        if self.config.backend == "local":
            from .local_backend import LocalBackend

            backend = LocalBackend(specs)
            self.phases.record("placed", time.perf_counter() - t0,
                               f"built {self._layout()} in this process (local backend)",
                               balance=list(self.balance))
            return backend
        if self.config.backend == "torchrun":
            from .torchrun_backend import TorchrunBackend

            backend = TorchrunBackend(specs, self.config.cluster)
            self.phases.record("placed", time.perf_counter() - t0,
                               f"joined {len(specs)} torchrun ranks: {self._layout()}",
                               balance=list(self.balance))
            return backend
        from .ray_backend import RayBackend

        self._start_ray()
        t0 = time.perf_counter()
        try:
            backend = RayBackend(specs, self.config.cluster)
        except BaseException:
            self._release_ray()
            raise
        nodes = len(set(backend.node_ips))
        self.phases.record(
            "placed", time.perf_counter() - t0,
            f"placed {len(specs)} stage actors ({backend.cpus:g} CPU, {backend.gpus:g} GPU "
            f"each, {self.config.cluster.placement}) on {nodes} node(s): {self._layout()}; "
            f"transport {backend.transport}",
            balance=list(self.balance), nodes=nodes, cpus_per_stage=backend.cpus,
            gpus_per_stage=backend.gpus, transport=backend.transport)
        return backend

    def _start_ray(self) -> None:
        """Join or start the Ray cluster, and say which (with its resources)."""
        import ray

        from .ray_cluster import cluster_summary, ensure_ray, private_cluster

        t0 = time.perf_counter()
        self._owns_ray = ensure_ray(self.config.cluster.address)
        res = cluster_summary()
        self.started_ray = self._owns_ray and private_cluster()
        if self.started_ray:
            how = "started a local Ray cluster"
        elif self._owns_ray:
            how = f"joined the Ray cluster at {ray.get_runtime_context().gcs_address}"
        else:
            how = "using the Ray session already running in this process"
        self.phases.record(
            "ray", time.perf_counter() - t0,
            f"{how}: {res['cpus']:g} CPU, {res['gpus']:g} GPU on {res['nodes']:g} node(s)",
            started=self.started_ray, **res)

    def _layout(self) -> str:
        """``2 stages, blocks [1, 2]``; with virtual stages, how many per worker."""
        workers = self.config.num_workers
        if self.config.virtual == 1:
            return f"{workers} stage{'s' if workers > 1 else ''}, blocks {list(self.balance)}"
        return (f"{len(self.balance)} stages on {workers} workers (virtual "
                f"{self.config.virtual}), blocks {list(self.balance)}")

    # -- training and evaluation ------------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """One optimizer step on one batch: forward, backward and update on every stage."""
        return self.run([(x, y)])[0]

    def run(self, batches: list[tuple[torch.Tensor, torch.Tensor]],
            keep: Sequence[int] = (),
            then: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> list[dict[str, Any]]:
        """Train on several batches in one pipelined run; one result per batch (step).

        Flush schedules give exactly what as many ``step`` calls give, with one driver
        round trip instead of one per step. Decoupled schedules (dni, petra) fill and drain
        once per run, not once per step: pass many batches at a time.

        ``keep``: steps of this run (0-based) whose weights to hand back without stopping
        the run: their results carry ``weights`` (a whole-model state dict, as each stage
        held it when its work on the step ended) and ``weights_at`` (the latest of those
        ends, on ``time.perf_counter``'s clock). Evaluating them later costs the run only
        the copies, where a run cut at the step would fill and drain the pipeline again.
        ``then``: the batches of the next run, when the caller knows them: the Ray backend
        ships them to the stages while this run trains, and the next ``run`` given those
        same batches (the same tensors) starts with them in place, so the stages do not
        idle through the hand-over (the other backends have nothing to ship).
        """
        self._check_open()
        if not batches:
            return []
        m = self.config.microbatches
        bad = [t for t in keep if not 0 <= t < len(batches)]
        if bad:
            raise PipelineConfigError(f"keep steps {bad} are outside this run of "
                                      f"{len(batches)} steps (0-{len(batches) - 1})")
        messages = self._take_staged(batches)
        if messages is None:
            messages = self._messages(True, *self._inputs(batches))
        program = self._program(len(batches))
        points = [keep_points(row, list(keep), m) for row in program] if keep else None
        upcoming = None
        if then and self._backend.stages_inputs:
            upcoming = self._messages(True, *self._inputs(then))
        results = self._run(True, program, messages=messages, keep=points, then=upcoming)
        if upcoming is not None:
            self._staged = (list(then), self._backend.staged)
        per_mb = dict(pair for r in results for pair in r.losses)
        out = []
        for t, (x, _) in enumerate(batches):
            self._steps += 1
            self._timeline_steps += 1
            self._samples += x.shape[0]
            loss = sum(per_mb[t * m + j] for j in range(m))
            out.append({"loss": float(loss), "step": self._steps})
        self._attach_kept(results, out)
        return out

    def _attach_kept(self, results: list, out: list[dict[str, Any]]) -> None:
        """Each kept step's stage weights merged into its result, timed on the driver's
        clock."""
        offsets = self._backend.clock_offsets()
        for r in results:
            for t, _stage, done, state in r.kept:
                entry = out[t]
                entry.setdefault("weights", {}).update(state)
                entry["weights_at"] = max(entry.get("weights_at", -math.inf),
                                          done - offsets[r.worker])

    def _inputs(self, batches: list[tuple[torch.Tensor, torch.Tensor]]
                ) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, float]]]:
        """Each batch cut into the microbatches the stages take: the inputs, and the
        targets with each microbatch's share of its batch's loss."""
        m = self.config.microbatches
        xs, ys = [], []
        for x, y in batches:
            x_chunks = split_batch(x, m)
            if min(c.shape[0] for c in x_chunks) < self._min_microbatch:
                raise PipelineConfigError(
                    f"a batch of {x.shape[0]} samples in {m} microbatches gives microbatches "
                    f"of {min(c.shape[0] for c in x_chunks)} sample, and the model's "
                    "BatchNorm1d cannot train on one sample; use a batch size >= "
                    f"{2 * m} or fewer microbatches")
            xs += x_chunks
            ys += list(zip(split_batch(y, m), loss_weights(x_chunks)))
        return xs, ys

    def _program(self, steps: int) -> list[list[Action]]:
        """Per-worker action lists for the next ``steps`` steps (cached by shape)."""
        phase = 0 if self.decoupled else self._steps % self.schedule.steps
        key = (steps, phase)
        if key not in self._programs:
            if self.decoupled:
                self._programs[key] = self._build(steps).workers
            else:
                self._programs[key] = _concatenate(self.schedule, steps, phase)
        return self._programs[key]

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Forward-only evaluation through the pipeline; returns the last stage's output."""
        self._check_open()
        m = min(self.config.microbatches, x.shape[0])
        xs = split_batch(x, m)
        program = self._forward_program(m)
        results = self._run(False, program, xs, [(None, 0.0)] * m)
        outputs: dict[int, Any] = {}
        for r in results:
            outputs.update(r.outputs)
        return torch.cat([outputs[j] for j in range(m)])

    def _forward_program(self, m: int) -> list[list[Action]]:
        """Every worker's forward actions, microbatch by microbatch (no backward)."""
        program: list[list[Action]] = [[] for _ in range(self.config.num_workers)]
        for j in range(m):
            for s in range(self.schedule.num_stages):
                program[self.schedule.worker_of(s)].append(Action(s, "F", j))
        return program

    def profile(self, x: torch.Tensor, y: torch.Tensor, steps: int = 2) -> Timeline:
        """Time every action of ``steps`` steps on this batch where it runs, without
        waiting for messages; the model is left as it was. Returns a timeline (``meta["source"]`` is
        "profiled") to simulate this pipeline with: ``brigade.schedulers.predict_from_profile``
        replays each action's own time, with a run's message latency (a profile never
        waits, so it cannot see the receiver's wake-up); ``costs_from_timeline`` gives its
        per-stage means (latency 0).

        How: one step of the batch is run and every message a worker takes is kept (after
        a snapshot of its weights, optimizer and RNG); then each worker runs the program
        of ``steps`` steps back to back, all workers at once, every message it needs stood
        in for by the kept one, its own sends going out and dropped on arrival (so both
        ends pay for them); then the snapshot is restored. Why not time
        each stage alone in one process: the stages then compute with the machine to
        themselves and one microbatch in flight; on 2 CPU stages (resnet18 width 16, m=8,
        ``bench/pipeline_schedules.py``, two runs) measured / predicted throughput of the four
        backprop schedules came out 0.75-1.01 from that, 0.94-0.99 from this.
        """
        self._check_open()
        if steps < 1:
            raise PipelineConfigError(f"steps must be >= 1 to profile (got {steps})")
        xs, ys = self._inputs([(x, y)])
        self._run(True, self._program(1), xs, ys, mode="record")
        results = self._run(True, self._program(steps), xs * steps, ys * steps, mode="replay")
        return Timeline(events=self._events_of(results), num_workers=self.config.num_workers,
                        samples=x.shape[0] * steps, meta=self._meta("profiled", steps))

    def _take_staged(self, batches) -> int | None:
        """The token of ``batches``' inputs where the last run shipped them (``then``)."""
        staged, self._staged = self._staged, None
        if staged is not None and _identity(staged[0]) == _identity(batches):
            return staged[1]
        return None

    def _messages(self, training: bool, xs, ys) -> list[list[tuple]]:
        """Per worker, the driver's messages of a run: the inputs to the first stage's
        worker, targets to the last's (and, in training, the labels to every worker holding
        an earlier stage the rule shows them to: its exposure)."""
        n = self.schedule.num_stages
        first, last = self.schedule.worker_of(0), self.schedule.worker_of(n - 1)
        messages: list[list[tuple]] = [[] for _ in range(self.config.num_workers)]
        messages[first] += [(("x", 0, j), xj) for j, xj in enumerate(xs)]
        messages[last] += [(("y", j), yj) for j, yj in enumerate(ys)]
        if training:
            for w in {self.schedule.worker_of(s) for s in self.labels_to}:
                messages[w] += [(("l", j), yj) for j, yj in enumerate(ys)]  # (label, weight)
        return messages

    def _run(self, training: bool, program, xs=(), ys=(), mode: str = "run",
             keep: list[dict[Action, int]] | None = None, messages=None, then=None) -> list:
        """Run ``program`` on ``xs``/``ys`` (or on ``messages``, built or staged already);
        ``then``: the next run's messages, to ship meanwhile. Only a training step that is
        a plain run joins the timeline."""
        if messages is None:
            messages = self._messages(training, xs, ys)
        try:
            results = self._backend.run_step(training, program, messages, mode, keep, then)
        except PipelineError:
            self.shutdown()  # the backend has killed its workers; release the cluster too
            raise
        if training and mode == "run":
            self._collect(results)
        return results

    def _events_of(self, results) -> list[Event]:
        """The results' events on the driver's clock."""
        offsets = self._backend.clock_offsets()
        return [Event(w, s, kind, j, t0 - offsets[r.worker], t1 - offsets[r.worker], cat)
                for r in results for (w, s, kind, j, t0, t1, cat) in r.events]

    def _collect(self, results) -> None:
        """Keep the step's events, and the memory peaks."""
        events = self._events_of(results)
        self._dropped += max(0, len(self._events) + len(events) - MAX_EVENTS)
        self._events.extend(events)
        for r in results:
            for s, b in r.peak_stored_bytes.items():
                self._peak_bytes[s] = max(self._peak_bytes.get(s, 0), b)

    # -- state and reports ------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's state: same keys and shapes as ``model.state_dict()``."""
        self._check_open()
        states = self._backend.state_dicts()
        out: dict[str, torch.Tensor] = {}
        for s in sorted(states):
            out.update(states[s])
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a whole-model state dict into the stages."""
        self._check_open()
        firsts = [sum(self.balance[:i]) for i in range(len(self.balance))]
        per_stage: dict[int, dict] = {s: {} for s in range(len(self.balance))}
        for key, value in state.items():
            block = int(key.split(".", 1)[0])
            s = max(i for i, f in enumerate(firsts) if f <= block)
            per_stage[s][key] = value
        self._backend.load_state_dicts(per_stage)

    def identity(self) -> dict[str, Any]:
        """What a checkpoint of this pipeline must match to be loaded into it."""
        return {
            "balance": list(self.balance),
            "schedule": self.config.schedule,
            "method": self.config.method,
            "microbatches": self.config.microbatches,
            "virtual": self.config.virtual,
            "workers": self.config.num_workers,
            "schedule_options": dict(self.config.schedule_options),
        }

    def checkpoint_state(self) -> dict[int, dict[str, Any]]:
        """Every stage's training state (weights, optimizer, method state, RNG), by stage.

        Taken between runs, when no microbatch is in flight; pair it with
        :func:`brigade.engine.checkpoint.save_checkpoint` for an atomic on-disk copy.
        """
        self._check_open()
        return self._backend.checkpoint_state()

    def load_checkpoint_state(self, states: dict[int, dict[str, Any]], step: int = 0) -> None:
        """Restore what :meth:`checkpoint_state` returned (same split, same method);
        ``step`` is the number of steps the checkpointed run had taken (it sets the phase
        of periodic schedules such as stale)."""
        self._check_open()
        self._steps = int(step)
        missing = sorted(set(range(len(self.balance))) - set(states))
        if missing:
            raise PipelineConfigError(f"checkpoint lacks stages {missing} of this "
                                      f"{len(self.balance)}-stage pipeline")
        self._backend.load_checkpoint_state(states)

    def timeline(self) -> Timeline:
        """The measured timeline of the training steps since start or ``reset_timeline``
        (``meta["steps"]`` counts those steps, so ``predict`` simulates as many)."""
        meta = self._meta("measured", self._timeline_steps)
        meta["events_dropped"] = self._dropped
        return Timeline(events=list(self._events), num_workers=self.config.num_workers,
                        samples=self._samples, meta=meta)

    def _meta(self, source: str, steps: int) -> dict[str, Any]:
        """What a timeline of this pipeline says about itself (``schedule_of`` reads it)."""
        return {
            **self.identity(),
            "source": source,
            "stages": len(self.balance),
            "steps": steps,
            "backend": self.config.backend,
            "peak_stored_activation_bytes": [
                self._peak_bytes.get(s, 0) for s in range(len(self.balance))
            ],
        }

    def reset_timeline(self) -> None:
        """Forget recorded events (e.g. after warm-up steps)."""
        self._events.clear()
        self._samples = 0
        self._dropped = 0
        self._timeline_steps = 0

    # -- lifetime ---------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._backend is None:
            raise PipelineError("this pipeline was shut down; create a new Pipeline")

    def shutdown(self) -> None:
        """Stop every worker (and the Ray cluster, if this pipeline started it)."""
        if self._backend is not None:
            self._backend.shutdown()
            self._backend = None
        self._release_ray()

    def _release_ray(self) -> None:
        """Leave (or stop) the Ray cluster this pipeline joined (or started); not a head
        that stopped answering (:func:`~.ray_cluster.leave_ray`)."""
        if self._owns_ray:
            from .ray_cluster import leave_ray

            leave_ray()
            self._owns_ray = False

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self) -> None:  # best effort: actors die with the driver anyway
        try:
            if getattr(self, "_backend", None) is not None:
                self.shutdown()
        except Exception:  # noqa: BLE001
            pass
