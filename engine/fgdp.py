"""Shared-seed data-parallel forward gradient on Ray (the seed report's system, done right).

N logical workers each hold a shard of the data; they live several to a *host* actor, which
holds one replica of the model and its optimizer. A *coordinator* actor runs the rounds: the
driver only starts the system, asks for an epoch of rounds at a time and reads the results,
so it is off the critical path (a cluster of N nodes runs N hosts of k workers each). All
share a seed, so the random direction ``v`` of worker ``i`` at round ``t`` is regenerated
anywhere from ``(seed, t, i)`` (``brigade.stages.fg_directions``). One round:

1. each worker takes its next batch and computes, by forward-mode AD, its loss and its
   directional derivatives ``d_i = ∇L_i·v_i`` (``projections`` scalars; one count per block
   with ``scope='block'``); its host sends back only those scalars, the sample count ``n_i``
   and the loss, one float32 row per worker;
2. the coordinator aggregates the scalars (``merge``):

   ``naive``     apply each worker's estimate ``d_i v_i`` in turn: N optimizer steps;
   ``mean``      one step on ``(1/N) Σ_i d_i v_i``;
   ``weighted``  one step on ``Σ_i (n_i/Σn) d_i v_i`` (workers with more samples count more);

3. it sends the aggregated coefficients to every host (folded into the next round's call);
   each replica regenerates the directions, forms the same gradient, and takes the same
   optimizer step. No parameter crosses the wire after start-up, and the replicas stay
   bit-identical (``replicas_identical`` compares a hash of every replica's parameters).

``directions='shared'`` (default) gives all workers the same ``v`` in a round: then
``Σ w_i d_i`` is the directional derivative of the merged batch loss, and one vector of
``projections`` scalars goes down to each host (traffic per round: N rows up, one row down
per host, ``O(workers x projections)`` floats). ``'independent'`` gives every worker its own
``v_i``: N times more directions per round, but every host must receive every worker's
coefficients (``O(workers² x projections)`` floats down) and regenerate N sets of
directions; measured against shared on the same wire budget in ``bench/fgdp_variance.py``.

Bytes on the wire (``wire_size``: the pickled size of each call's arguments and result,
counted once per host that receives or sends them) are recorded per round, up and down, and
at start-up (model and shards). The coordinator's exchanges with the driver (one call per
epoch) are not on the round path and are not counted. ``guess='local'`` is also offered,
for comparison: a local-loss guess ``u_i`` depends on the worker's data and cannot be
regenerated from a seed, so each host sends its workers' estimates (``O(parameters)``) and
the coordinator sends back the aggregate: ordinary data-parallel traffic, reported as such.

The executor pieces are the engine's (``brigade.engine.actors``): actors started in a
placement group, one wait loop that fails fast and names the actor, numpy on the wire; the
in-process backend (``backend='local'``) runs the same hosts and coordinator through
``LocalActor`` handles, every message pickled as over the wire.

Failures: a worker that raises or dies becomes ``FGWorkerError`` naming the workers of its
host; one that does not answer within ``timeout_s`` too. Actors are killed on
``shutdown()`` (also on error, and on leaving the ``with`` block); a Ray cluster this class
started is shut down.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from brigade.stages import fg_estimator as fge
from brigade.stages.errors import ConfigError, choose
from brigade.stages.fg_directions import DISTRIBUTIONS, make_generator
from brigade.stages.fg_optim import FGOptimizer, make_optimizer
from brigade.stages.heads import LocalHeads, param_blocks

from .actors import LocalActor, from_wire, start_actors, to_wire, wait_all, wire_size
from .errors import PipelineError

__all__ = [
    "BACKENDS", "COORDINATORS", "MERGES", "SHARING", "SHARDS", "FGDPConfig", "default_lr",
    "FGWorkerError", "ForwardGradientDP", "merge_scalars", "host_ranks", "auto_projections", "auto_lr_scale", "wire_size",
]

MERGES = ("naive", "mean", "weighted")
SHARING = ("independent", "shared")
SHARDS = ("equal", "uneven")
BACKENDS = ("ray", "local")
COORDINATORS = ("actor", "driver")
PLACEMENTS = ("pack", "spread", "strict_pack", "strict_spread")


class FGWorkerError(PipelineError):
    """A data-parallel worker (or the coordinator) raised, died or did not answer; names it."""

    def __init__(self, worker: int | list[int], cause: str, who: str = "worker") -> None:
        self.workers = [worker] if isinstance(worker, int) else list(worker)
        self.reason = cause
        names = ", ".join(str(w) for w in self.workers)
        super().__init__(f"fgdp {who} {names} failed: {cause}".replace("  ", " "))

    def __reduce__(self):  # travels from the coordinator actor to the driver intact
        return (FGWorkerError, (self.workers, self.reason))


@dataclass
class FGDPConfig:
    """Settings of the shared-seed data-parallel system; checked on construction."""

    workers: int = 2
    actors: int | None = None  # host processes; None: one per worker, at most one per CPU
    merge: str = "mean"
    directions: str = "shared"
    guess: str = "random"
    projections: int | tuple[int, ...] = 1
    dist: str = "rademacher"
    scope: str = "global"
    blocks: tuple[int, ...] | None = None
    optimizer: str = "sgd"
    lr: float | None = None
    optimizer_kw: dict = field(default_factory=dict)
    batch_size: int = 64
    shards: str = "equal"
    seed: int = 0
    head_lr: float = 1e-3
    lr_scale: float = 1.0  # on the default rate only (``auto_lr_scale``); an explicit lr is kept
    timeout_s: float = 600.0
    threads_per_worker: int = 1
    cpus_per_worker: float = 0.0
    coordinator: str = "actor"
    placement: str = "pack"
    placement_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if int(self.workers) < 1:
            raise ConfigError(f"workers must be at least 1; got {self.workers}")
        self.workers = int(self.workers)
        if self.actors is not None:
            if not 1 <= int(self.actors) <= self.workers:
                raise ConfigError(f"actors must be between 1 and workers={self.workers}; got {self.actors}")
            self.actors = int(self.actors)
        self.merge = choose("merge", self.merge, MERGES)
        self.directions = choose("direction sharing", self.directions, SHARING)
        self.guess = choose("guess", self.guess, fge.GUESSES)
        self.dist = choose("direction distribution", self.dist, DISTRIBUTIONS)
        self.scope = choose("scope", self.scope, fge.SCOPES)
        self.shards = choose("shards", self.shards, SHARDS)
        self.coordinator = choose("coordinator", self.coordinator, COORDINATORS)
        self.placement = choose("placement", self.placement, PLACEMENTS)
        if self.blocks is not None:
            self.blocks = tuple(int(b) for b in self.blocks)
        _, _, _, _, self.projections = fge._check(self.guess, "weight", self.scope, self.dist, self.projections)
        if int(self.batch_size) < 1:
            raise ConfigError(f"batch_size must be at least 1; got {self.batch_size}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be positive; got {self.lr}")
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s must be positive; got {self.timeout_s}")
        if self.cpus_per_worker < 0:
            raise ConfigError(f"cpus_per_worker must be >= 0; got {self.cpus_per_worker}")
        # build one optimizer on a dummy parameter: an unknown name or option fails here
        # (a cosine schedule's length is the run's, known once fit() is called)
        kw = dict(self.optimizer_kw)
        if kw.get("decay") == "cosine":
            kw.setdefault("total_steps", 1)
        opt = make_optimizer(self.optimizer, [nn.Parameter(torch.zeros(1))], self.lr, guess=self.guess, **kw)
        self.optimizer = opt.kind
        if self.lr is None:
            self.lr = default_lr(self.optimizer, self.guess, self.merge, self.workers) * float(self.lr_scale)


def default_lr(optimizer: str, guess: str, merge: str, workers: int) -> float:
    """The measured single-estimate rate, adjusted for merging.

    ``naive`` takes one optimizer step per worker estimate: the single-process rate
    (``fg_optim.DEFAULTS``). ``mean``/``weighted`` take one step on the average of N
    estimates: for the plain rules (sgd, momentum, nesterov) that average is N times less
    noisy and N times fewer steps are taken, so the rate grows N times (the same expected
    progress per epoch as naive); for the normalised rules (adam, rmsprop) the step size does
    not follow the estimate's scale, the signal-to-noise ratio of each step grows by √N, and
    the rate grows √N times (measured: 3e-3 for 10 workers, against 1e-3 naive).
    """
    from brigade.stages.fg_optim import DEFAULTS

    lr = DEFAULTS[guess][optimizer]["lr"]
    if merge == "naive" or workers == 1:
        return lr
    return lr * (math.sqrt(workers) if optimizer in ("adam", "rmsprop") else workers)


AUTO_LAST = 192
AUTO_AFTER_FROZEN = 16
FROZEN_LR_SCALE = 10.0


def auto_projections(model: nn.Module, blocks=None, last: int = AUTO_LAST) -> tuple[int, ...]:
    """Projections per block for the shared-seed system (``--projections auto``).

    The last block gets ``last`` (its jvps run through that block alone, so they are cheap,
    and they train the read-out); blocks holding a convolution get 0 and stay as initialised
    (random features): a convolution's jvp runs through the whole conv stack, costing more
    than the rest of the step, for a direction that moves a 37k-dimensional block by next to
    nothing (measured in ``bench/fwdgrad_mnist.py``'s CNN plan). A dense block behind such
    frozen blocks gets ``AUTO_AFTER_FROZEN``: its jvps start after the frozen features, so
    they are cheap too, and they are what lets the head shape those features (MNIST CNN,
    14k digits, 3 epochs at Adam 0.03: 0.18 test accuracy with that block frozen, 0.49
    with 1 projection, 0.78 with 16, 0.66 after 2 epochs with 64 at half the rounds/s).
    Every other block gets 1. ``last=192`` keeps the default traffic of 10 workers under
    20 KB a round: each worker sends ``2 + Σ projections`` float32 and each host receives
    ``Σ projections``.
    """
    bl = param_blocks(model, blocks)
    conv = (nn.modules.conv._ConvNd,)
    counts: list[int] = []
    for b in bl[:-1]:
        if any(isinstance(m, conv) for m in b.module.modules()):
            counts.append(0)
        else:
            counts.append(AUTO_AFTER_FROZEN if counts and all(c == 0 for c in counts) else 1)
    return tuple(counts) + (int(last),)


def auto_lr_scale(projections) -> float:
    """The factor on the default rate for ``projections`` (``--projections auto``).

    A model whose first blocks are frozen (0 projections: the conv stack of the CNN) trains
    only a head on random features, which are small at initialisation; Adam's step is the
    same for every weight, so the head's output moves slowly and the rate must grow
    (MNIST CNN, 14k digits, 3 epochs, 16 projections on the dense block: Adam 0.01, 0.03,
    0.1 -> 0.56, 0.78, 0.57 test accuracy; the plain default 3.2e-3 stays at loss 2.30).
    """
    counts = projections if isinstance(projections, tuple) else (projections,)
    return FROZEN_LR_SCALE if counts and counts[0] == 0 else 1.0


def host_ranks(workers: int, actors: int) -> list[list[int]]:
    """Logical workers per host actor: contiguous, as even as possible (``[[0, 1], [2]]``)."""
    return [[int(r) for r in part] for part in np.array_split(np.arange(workers), actors)]


def merge_scalars(merge: str, directions: str, rows: list[tuple[int, int, np.ndarray]],
                  unit_sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The coefficients every replica applies, from each worker's ``(rank, n, d)``.

    ``d`` is the worker's row of directional derivatives (units concatenated); each unit is
    divided by its projection count (the estimate averages over projections). Returns
    ``(who, coefs)``: ``who[s, e]`` is the worker whose directions entry ``e`` of optimizer
    step ``s`` weighs, ``coefs[s, e]`` its coefficients (float32). Workers with no samples
    this round take no part.
    """
    live = [(r, n, d) for r, n, d in rows if n > 0]
    if not live:
        return np.zeros((0, 0), np.int32), np.zeros((0, 0, sum(unit_sizes)), np.float32)
    scale = np.concatenate([np.full(u, 1.0 / max(u, 1)) for u in unit_sizes])
    scaled = [(r, d.astype(np.float64) * scale) for r, _, d in live]
    total = sum(n for _, n, _ in live)
    w = [n / total if merge == "weighted" else 1.0 / len(live) for _, n, _ in live]
    if merge == "naive":
        who = np.array([[r] for r, _ in scaled], np.int32)
        coefs = np.stack([c for _, c in scaled])[:, None, :]
    elif directions == "shared":
        who = np.zeros((1, 1), np.int32)
        coefs = sum(wi * c for wi, (_, c) in zip(w, scaled))[None, None, :]
    else:
        who = np.array([[r for r, _ in scaled]], np.int32)
        coefs = np.stack([wi * c for wi, (_, c) in zip(w, scaled)])[None, :, :]
    return who, coefs.astype(np.float32)


def _hash_tensors(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _describe(err: BaseException) -> str:
    """'SomeError: message' of a local or remote failure (the remote cause, not Ray's wrapper)."""
    cause = err if isinstance(err, FGWorkerError) else (getattr(err, "cause", None) or err)
    if isinstance(cause, FGWorkerError):
        return str(cause)
    return f"{type(cause).__name__}: {cause}"


class _FGHost:
    """One replica (model, optimizer) and the data shards of its logical workers.

    A plain class; ``ray.remote`` (or ``LocalActor``) wraps it.
    """

    def __init__(self, host: int, ranks: list[int], model: nn.Module, loss_fn: Callable, shards: list,
                 test, cfg: FGDPConfig, rounds_per_epoch: int) -> None:
        torch.set_num_threads(max(1, int(cfg.threads_per_worker)))
        self.host, self.ranks, self.cfg, self.loss_fn = host, list(ranks), cfg, loss_fn
        self.model = model.train()
        self.shards = [from_wire(s) for s in shards]
        self.test = None if test is None else from_wire(test)
        self.rounds = int(rounds_per_epoch)
        self.bs = [max(1, math.ceil(len(y) / self.rounds)) for _, y in self.shards]
        kw = dict(cfg.optimizer_kw)
        if kw.get("decay") == "cosine":
            kw.setdefault("total_steps", 1)  # the run's length comes with set_total_steps
        self.opt = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, guess=cfg.guess, **kw)
        self.heads = self.head_opt = None
        if cfg.guess == "local":
            torch.manual_seed(cfg.seed)  # identical heads on every replica
            self.heads = LocalHeads(self.model, self.shards[0][0][:2], blocks=cfg.blocks)
            self.head_opt = FGOptimizer(self.heads.parameters(), "adam", cfg.head_lr)
        self._orders: dict[int, tuple[int, torch.Tensor]] = {}
        self._drawn: dict[tuple, Any] = {}  # this round's directions, kept for the update
        # BatchNorm running statistics cannot be regenerated from a seed: as DDP does
        # (broadcast_buffers), worker 0's buffers travel with each update to every replica.
        self.sync_buffers = any(True for _ in self.model.buffers())

    # -- data -------------------------------------------------------------------------------
    def batch(self, j: int, epoch: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Logical worker ``ranks[j]``'s batch ``b`` of ``epoch`` (its own shuffle per epoch)."""
        x, y = self.shards[j]
        if j not in self._orders or self._orders[j][0] != epoch:
            g = make_generator(self.cfg.seed, 0xDA7A, self.ranks[j], epoch)
            self._orders[j] = (epoch, torch.randperm(len(y), generator=g))
        idx = self._orders[j][1][b * self.bs[j] : (b + 1) * self.bs[j]]
        return x[idx], y[idx]

    def _keys(self, t: int, worker: int) -> tuple[int, int]:
        return (int(t), 0 if self.cfg.directions == "shared" else int(worker))

    def _directions(self, keys: tuple[int, int]):
        cfg = self.cfg
        drawn = self._drawn.get(keys)
        if drawn is None:
            drawn = fge.draw(self.model, seed=cfg.seed, keys=keys, projections=cfg.projections,
                             dist=cfg.dist, scope=cfg.scope, blocks=cfg.blocks)
        return drawn

    # -- a round ----------------------------------------------------------------------------
    def set_total_steps(self, n: int) -> None:
        """The run's optimizer steps, for a cosine schedule (its length is the run's)."""
        if self.opt.decay == "cosine" and "total_steps" not in self.cfg.optimizer_kw:
            self.opt.total_steps = max(1, int(n))

    def step(self, t: int, update: Any) -> Any:
        """Apply the previous round's update, then compute this round's message."""
        if update is not None:
            self.apply(update)
        return self.compute(t)

    def compute(self, t: int) -> Any:
        epoch, b = divmod(int(t), self.rounds)
        rows = [self.compute_one(j, int(t), epoch, b) for j in range(len(self.ranks))]
        buffers = None
        if self.sync_buffers and self.host == 0:
            buffers = [to_wire(buf.detach().clone()) for buf in self.model.buffers()]
        if self.cfg.guess == "random":
            return np.stack(rows).astype(np.float32), buffers
        return {"rows": rows, "buffers": buffers}

    def compute_one(self, j: int, t: int, epoch: int, b: int):
        """Logical worker ``ranks[j]``'s message: ``[n, loss, d...]`` (random guess)."""
        cfg = self.cfg
        x, y = self.batch(j, epoch, b)
        stats = j == 0  # running statistics move once per replica per round
        if cfg.guess == "random":
            if len(y) == 0:
                return np.zeros(2 + self._width(), np.float32)
            keys = self._keys(t, self.ranks[j])
            drawn = self._directions(keys)
            self._drawn[keys] = drawn
            loss, d = fge.directional_derivatives(
                self.model, x, y, self.loss_fn, seed=cfg.seed, keys=keys, projections=cfg.projections,
                dist=cfg.dist, scope=cfg.scope, blocks=cfg.blocks, update_stats=stats, drawn=drawn,
            )
            return np.concatenate([[len(y), loss], torch.cat(d).numpy()]).astype(np.float32)
        if len(y) == 0:
            return {"n": 0, "loss": 0.0, "g": None, "h": None}
        est = fge.forward_gradient(self.model, x, y, self.loss_fn, guess="local", heads=self.heads,
                                   scope=cfg.scope, blocks=cfg.blocks, update_stats=stats)
        return {"n": int(len(y)), "loss": float(est.loss), "g": [to_wire(g) for g in est.grads],
                "h": [to_wire(g) for g in est.head_grads]}

    def _width(self) -> int:
        return sum(unit_sizes(self.model, self.cfg))

    def apply(self, update: Any) -> None:
        """Take the optimizer step(s) that every replica takes from this update."""
        kind, t, who, body, buffers = update
        params = list(self.model.parameters())
        if kind == "scalars":
            coefs = body  # (steps, entries, scalars); who[s, e] the worker, None: shared directions
            sizes = unit_sizes(self.model, self.cfg)
            cuts = np.cumsum(sizes)[:-1]
            for s in range(coefs.shape[0]):
                g = [torch.zeros_like(p, dtype=torch.float32) for p in params]
                for e in range(coefs.shape[1]):
                    drawn = self._directions(self._keys(t, 0 if who is None else int(who[s, e])))
                    fge.weigh(g, drawn, np.split(coefs[s, e], cuts))
                self.opt.step(grads=g)
            self._drawn.clear()
        else:
            steps, heads = body
            for gs, hs in zip(steps, heads):
                self.opt.step(grads=[from_wire(a) for a in gs])
                self.head_opt.step(grads=[from_wire(a) for a in hs])
        if buffers is not None:
            with torch.no_grad():
                for buf, a in zip(self.model.buffers(), buffers):
                    buf.copy_(from_wire(a))

    # -- checks and reports -------------------------------------------------------------------
    def param_hash(self) -> str:
        ts = list(self.model.parameters()) + list(self.model.buffers())
        if self.heads is not None:
            ts += list(self.heads.parameters())
        return _hash_tensors(ts)

    def evaluate(self) -> tuple[int, int, float]:
        """(correct, count, summed loss) on this host's slice of the test set."""
        if self.test is None or len(self.test[1]) == 0:
            return 0, 0, 0.0
        x, y = self.test
        was = self.model.training
        self.model.eval()
        correct, loss = 0, 0.0
        with torch.no_grad():
            for i in range(0, len(y), 500):
                out = self.model(x[i : i + 500])
                correct += int((out.argmax(1) == y[i : i + 500]).sum())
                loss += float(self.loss_fn(out, y[i : i + 500])) * len(out)  # a mean, summed
        self.model.train(was)
        return correct, int(len(y)), loss

    def state_dict(self) -> dict:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def ping(self) -> int:
        return self.host


def unit_sizes(model: nn.Module, cfg: FGDPConfig) -> list[int]:
    """Scalars per unit in one worker's row: the projection count of each unit."""
    if cfg.scope == "global":
        return [int(cfg.projections) if not isinstance(cfg.projections, tuple) else int(cfg.projections[0])]
    n = len(param_blocks(model, cfg.blocks))
    return fge._unit_counts(cfg.projections, n)


class _FGCoordinator:
    """Runs rounds: calls every host, merges the scalars, keeps the update for the next call.

    A plain class: a Ray actor (``coordinator='actor'``, the driver off the round path) or an
    object in the driver (``'driver'``, or the local backend).
    """

    def __init__(self, hosts: list, ranks: list[list[int]], cfg: FGDPConfig, sizes: list[int]) -> None:
        self.hosts, self.ranks, self.cfg, self.sizes = list(hosts), ranks, cfg, list(sizes)
        self.t = 0
        self.pending: Any = None

    def _get(self, refs: list, what: str) -> list:
        def failed(i: int, err: BaseException) -> None:
            raise FGWorkerError(self.ranks[i], f"{what}: {_describe(err)}") from err

        def silent(late: list[int]) -> None:
            raise FGWorkerError(sorted(r for i in late for r in self.ranks[i]),
                                f"no answer to {what} within {self.cfg.timeout_s:g} s")

        return wait_all(refs, self.cfg.timeout_s, failed, silent)

    def run(self, rounds: int) -> list[dict]:
        """``rounds`` rounds; one record each (loss, samples, bytes up/down, seconds)."""
        return [self._round() for _ in range(int(rounds))]

    def _round(self) -> dict:
        t = self.t
        t0 = time.perf_counter()
        args = (t, self.pending)
        down = wire_size(args) * len(self.hosts)
        results = self._get([h.step.remote(*args) for h in self.hosts], f"round {t}")
        up = sum(wire_size(r) for r in results)
        self.pending, n, loss = self._merge(results, t)
        self.t += 1
        return {"t": t, "epoch": None, "loss": loss, "samples": n, "bytes_up": up, "bytes_down": down,
                "bytes": up + down, "seconds": time.perf_counter() - t0}

    def _merge(self, results: list, t: int) -> tuple[Any, int, float]:
        cfg = self.cfg
        if cfg.guess == "random":
            rows = [(r, int(row[0]), row[2:]) for (mat, _), ranks in zip(results, self.ranks)
                    for r, row in zip(ranks, mat)]
            losses = [(int(row[0]), float(row[1])) for (mat, _) in results for row in mat]
            who, coefs = merge_scalars(cfg.merge, cfg.directions, rows, self.sizes)
            # shared directions: every entry weighs the round's one set; no worker ids travel
            update = ("scalars", t, None if cfg.directions == "shared" else who, coefs, results[0][1])
        else:
            rows = [(r, row) for res, ranks in zip(results, self.ranks) for r, row in zip(ranks, res["rows"])]
            live = [row for _, row in rows if row["n"] > 0]
            losses = [(row["n"], row["loss"]) for _, row in rows]
            total = sum(row["n"] for row in live)
            w = [row["n"] / total if cfg.merge == "weighted" else 1.0 / len(live) for row in live]
            if cfg.merge == "naive":
                steps, heads = [row["g"] for row in live], [row["h"] for row in live]
            else:
                steps = [[sum(wi * row["g"][j] for wi, row in zip(w, live)).astype(np.float32)
                          for j in range(len(live[0]["g"]))]]
                heads = [[sum(wi * row["h"][j] for wi, row in zip(w, live)).astype(np.float32)
                          for j in range(len(live[0]["h"]))]]
            update = ("tensors", t, None, (steps, heads), results[0]["buffers"])
        n = sum(k for k, _ in losses)
        loss = sum(k * v for k, v in losses) / max(n, 1)
        return update, n, loss

    def flush(self) -> None:
        """Apply the last aggregated update on every replica (before evaluating or saving)."""
        if self.pending is not None:
            upd, self.pending = self.pending, None
            self._get([h.apply.remote(upd) for h in self.hosts], "apply")

    def set_total_steps(self, n: int) -> None:
        self._get([h.set_total_steps.remote(n) for h in self.hosts], "set_total_steps")

    def evaluate(self) -> dict:
        """Test accuracy and loss, each host scoring its slice of the test set."""
        self.flush()
        parts = self._get([h.evaluate.remote() for h in self.hosts], "evaluate")
        correct, count, loss = (sum(p[i] for p in parts) for i in range(3))
        return {"accuracy": correct / count if count else float("nan"), "loss": loss / count if count else float("nan")}

    def hashes(self) -> list[str]:
        self.flush()
        return self._get([h.param_hash.remote() for h in self.hosts], "param_hash")

    def state_dict(self) -> dict:
        self.flush()
        return self._get([self.hosts[0].state_dict.remote()], "state_dict")[0]


def _split(n: int, parts: int, how: str, seed: int) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=make_generator(seed, 0x5A4D))
    if how == "equal":
        return [c for c in torch.tensor_split(perm, parts)]
    weights = np.arange(1, parts + 1, dtype=np.float64)  # shard i holds (i+1)/Σ of the data
    cuts = np.round(np.cumsum(weights) / weights.sum() * n).astype(int)[:-1]
    return [c for c in torch.tensor_split(perm, list(cuts))]


class ForwardGradientDP:
    """The driver's handle: starts hosts and coordinator, runs epochs, checks replicas.

    ``model`` is copied to every host once (start-up traffic, ``startup_bytes``); ``train``
    and ``test`` are ``(x, y)`` pairs or objects with ``.x`` and ``.y``; the training set is
    split into one shard per worker (``shards='uneven'``: shard i holds a share proportional
    to i+1, so that ``weighted`` and ``mean`` differ; ``shard_indices`` says which samples
    each worker holds), the test set into one slice per host. ``address`` joins an existing
    Ray cluster; without it a local one is started if none is running (``num_cpus``).
    ``backend='local'`` runs the same hosts and coordinator in this process, one after
    another (the seed report's simulation): same messages, same bytes, same replicas, no Ray.
    """

    def __init__(
        self,
        model: nn.Module,
        train,
        test=None,
        loss_fn: Callable | None = None,
        config: FGDPConfig | None = None,
        *,
        address: str | None = None,
        num_cpus: int | None = None,
        backend: str = "ray",
        **overrides,
    ) -> None:
        self.backend = choose("backend", backend, BACKENDS)
        cfg = config or FGDPConfig(**overrides)
        if config is not None and overrides:
            cfg = FGDPConfig(**{**asdict(config), **overrides})
        self.cfg = cfg
        self.loss_fn = loss_fn or nn.CrossEntropyLoss()
        x, y = (train.x, train.y) if hasattr(train, "x") else train
        N = cfg.workers
        if len(y) < N:
            raise ConfigError(f"{len(y)} training samples cannot feed {N} workers; use at most {len(y)} workers")
        self.shard_indices = _split(len(y), N, cfg.shards, cfg.seed)
        self.shard_sizes = [len(s) for s in self.shard_indices]
        self.rounds_per_epoch = max(1, math.ceil((len(y) / N) / cfg.batch_size))
        self._ray = None
        self._started_ray = False
        if self.backend == "ray":
            import ray

            from .ray_cluster import ensure_ray

            self._started_ray = ensure_ray(address, num_cpus)
            self._ray = ray
        if cfg.actors is None:
            cfg = self.cfg = FGDPConfig(**{**asdict(cfg), "actors": min(N, self._cpus())})
        self.ranks = host_ranks(N, cfg.actors)
        tests: list = [None] * cfg.actors
        if test is not None:
            tx, ty = (test.x, test.y) if hasattr(test, "x") else test
            tests = [to_wire((tx[c], ty[c])) for c in torch.tensor_split(torch.arange(len(ty)), cfg.actors)]
        model = model.cpu()
        self.num_params = sum(p.numel() for p in model.parameters())
        self.unit_sizes = unit_sizes(model, cfg) if cfg.guess == "random" else []
        self.placement_group = None
        self.actors: list = []
        self.coordinator: Any = None
        self.startup_bytes = 0
        self.history: list[dict] = []
        try:
            host_args = [
                (h, ranks, model, self.loss_fn,
                 [to_wire((x[self.shard_indices[r]], y[self.shard_indices[r]])) for r in ranks],
                 tests[h], cfg, self.rounds_per_epoch)
                for h, ranks in enumerate(self.ranks)
            ]
            self.startup_bytes = sum(wire_size(a) for a in host_args)
            self.actors = self._start_hosts(host_args)
            # a process start imports torch: on a loaded machine that alone can take a minute
            self._get([a.ping.remote() for a in self.actors], "start", self.ranks,
                      timeout_s=cfg.timeout_s + cfg.placement_timeout_s + 120)
            coord_args = (self.actors, self.ranks, cfg, self.unit_sizes)
            if self.backend == "ray" and cfg.coordinator == "actor":
                from .ray_backend import actor_env

                (self.coordinator,) = start_actors(_FGCoordinator, [coord_args], cpus=0, env=actor_env())
            else:
                self.coordinator = LocalActor(_FGCoordinator, coord_args, copy=False)
        except BaseException:
            self.shutdown()
            raise

    def _cpus(self) -> int:
        """CPUs to spread hosts over: more host processes than cores would only repeat the
        per-replica work (drawing directions, the optimizer step) on the same cores."""
        if self.backend == "ray":
            return max(1, int(self._ray.cluster_resources().get("CPU", 1)))
        import os

        return max(1, os.cpu_count() or 1)

    def _start_hosts(self, host_args: list[tuple]) -> list:
        cfg = self.cfg
        if self.backend == "local":
            return [LocalActor(_FGHost, a) for a in host_args]
        from .ray_backend import _place, actor_env

        self.placement_group = _place(len(host_args), cfg.cpus_per_worker, 0.0, cfg.placement,
                                      cfg.placement_timeout_s)
        return start_actors(_FGHost, host_args, cpus=cfg.cpus_per_worker, placement_group=self.placement_group,
                            env=actor_env())

    # -- remote calls -----------------------------------------------------------------------
    def _get(self, refs: list, what: str, ranks: list[list[int]] | None = None, timeout_s: float | None = None) -> list:
        """Results of one call per actor; a failure or a silence names the workers."""
        names = ranks if ranks is not None else [[]] * len(refs)

        def failed(i: int, err: BaseException) -> None:
            cause = err if isinstance(err, FGWorkerError) else getattr(err, "cause", None)
            if isinstance(cause, FGWorkerError):  # the coordinator named the workers
                raise FGWorkerError(cause.workers, cause.reason) from err
            who = "worker" if names[i] else "coordinator"
            raise FGWorkerError(names[i], f"{what}: {_describe(err)}", who) from err

        def silent(late: list[int]) -> None:
            raise FGWorkerError(sorted(r for i in late for r in names[i]),
                                f"no answer to {what} within {timeout:g} s")

        timeout = timeout_s or self.cfg.timeout_s
        return wait_all(refs, timeout, failed, silent)

    def _ask(self, method: str, *args, rounds: int = 0):
        """One call to the coordinator, given time for ``rounds`` rounds."""
        ref = getattr(self.coordinator, method).remote(*args)
        return self._get([ref], method, timeout_s=self.cfg.timeout_s * (rounds + 1) + 60)[0]

    # -- rounds -----------------------------------------------------------------------------
    def run(self, rounds: int) -> list[dict]:
        """``rounds`` rounds run by the coordinator, one driver call; their records."""
        recs = self._ask("run", int(rounds), rounds=int(rounds))
        for r in recs:
            r["epoch"] = r["t"] // self.rounds_per_epoch
        self.history.extend(recs)
        return recs

    def step(self) -> dict:
        """One round; returns loss, samples and bytes on the wire (up, down, total)."""
        return self.run(1)[0]

    def flush(self) -> None:
        self._ask("flush")

    def evaluate(self) -> dict:
        return self._ask("evaluate")

    def hashes(self) -> list[str]:
        """Every replica's hash (parameters, buffers, heads), one per host."""
        return self._ask("hashes")

    def replicas_identical(self) -> bool:
        """True when every replica's parameters (and buffers, heads) hash the same."""
        return len(set(self.hashes())) == 1

    def state_dict(self) -> dict:
        return self._ask("state_dict")

    def fit(
        self,
        epochs: int,
        *,
        on_round: Callable[[dict], None] | None = None,
        on_epoch: Callable[[int, dict], None] | None = None,
        evaluate_each_epoch: bool = True,
    ) -> dict:
        """Run ``epochs`` epochs (one coordinator call each); returns the report."""
        steps = int(epochs) * self.rounds_per_epoch * (self.cfg.workers if self.cfg.merge == "naive" else 1)
        self._ask("set_total_steps", steps)
        t0 = time.perf_counter()
        per_epoch: list[dict] = []
        for e in range(int(epochs)):
            recs = self.run(self.rounds_per_epoch)
            if on_round is not None:
                for r in recs:
                    on_round(r)
            n = sum(r["samples"] for r in recs)
            ep = {"epoch": e + 1, "train_loss": sum(r["loss"] * r["samples"] for r in recs) / max(n, 1)}
            if evaluate_each_epoch:
                ev = self.evaluate()
                ep.update(test_accuracy=ev["accuracy"], test_loss=ev["loss"])
            per_epoch.append(ep)
            if on_epoch is not None:
                on_epoch(e, ep)
        wall = time.perf_counter() - t0
        return self.report(per_epoch, wall)

    def report(self, per_epoch: list[dict], wall_s: float) -> dict:
        ev = self.evaluate()
        hs = self.hashes()
        hist = self.history
        steps = max(len(hist), 1)
        up = sum(r["bytes_up"] for r in hist) / steps
        down = sum(r["bytes_down"] for r in hist) / steps
        N = self.cfg.workers
        return {
            "final_test_accuracy": ev["accuracy"],
            "final_test_loss": ev["loss"],
            "train_loss": [e["train_loss"] for e in per_epoch],
            "test_accuracy": [e.get("test_accuracy") for e in per_epoch],
            "epochs": per_epoch,
            "wall_s": wall_s,
            "rounds": len(hist),
            "rounds_per_s": len(hist) / wall_s if wall_s > 0 else float("nan"),
            "round_s_median": float(np.median([r["seconds"] for r in hist])) if hist else float("nan"),
            "bytes_per_step": up + down,
            "bytes_up_per_step": up,
            "bytes_down_per_step": down,
            "bytes_per_worker_per_step": (up + down) / N,
            "bytes_up_per_worker_per_step": up / N,
            "bytes_down_per_worker_per_step": down / N,
            "startup_bytes": self.startup_bytes,
            "startup_bytes_per_worker": self.startup_bytes / N,
            "scalars_per_worker_per_step": sum(self.unit_sizes),
            "num_params": self.num_params,
            "param_bytes": 4 * self.num_params,
            "hosts": len(self.ranks),
            "replicas_identical": len(set(hs)) == 1,
            "param_hash": hs[0],
            "param_hashes": hs,
            "shard_sizes": self.shard_sizes,
            "config": asdict(self.cfg),
        }

    # -- lifetime ---------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Kill the coordinator and host actors; shut Ray down if this object started it."""
        ray = self._ray
        if ray is not None:
            for a in ([self.coordinator] if self.coordinator is not None else []) + list(self.actors):
                if isinstance(a, LocalActor):
                    continue
                try:
                    ray.kill(a, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
            pg, self.placement_group = self.placement_group, None
            if pg is not None:
                try:
                    ray.util.remove_placement_group(pg)
                except Exception:  # noqa: BLE001 - Ray already shut down
                    pass
        self.actors = []
        self.coordinator = None
        if self._started_ray and ray is not None and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> "ForwardGradientDP":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

