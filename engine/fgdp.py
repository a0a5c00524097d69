"""Shared-seed data-parallel forward gradient on Ray (the seed report's system, done right).

N worker actors each hold a replica of the model, an optimizer and a shard of the data. The
coordinator (this process) and the workers share a seed, so the random direction ``v`` of
worker ``i`` at round ``t`` is regenerated anywhere from ``(seed, t, i)``
(``brigade.stages.fwdgrad.directions``). One round:

1. each worker takes its next batch and computes, by forward-mode AD, its loss and its
   directional derivatives ``d_i = ∇L_i·v_i`` (``projections`` scalars; one per block and
   projection with ``scope='block'``), and sends back only those scalars, its sample count
   ``n_i`` and its loss;
2. the coordinator aggregates the scalars (``merge``):

   ``naive``     apply each worker's estimate ``d_i v_i`` in turn: N optimizer steps;
   ``mean``      one step on ``(1/N) Σ_i d_i v_i``;
   ``weighted``  one step on ``Σ_i (n_i/Σn) d_i v_i`` (workers with more samples count more);

3. it sends the aggregated coefficients to every worker (folded into the next round's call);
   each replica regenerates the ``v_i``, forms the same gradient, and takes the same optimizer
   step. No parameter crosses the wire after start-up, and replicas stay bit-identical
   (``replicas_identical`` compares a hash of every replica's parameters).

``directions='independent'`` (default) gives every worker its own ``v_i``: the mean of N
independent estimates has 1/N of the variance. ``'shared'`` gives all workers the same
``v`` (the seed report's scheme): then ``Σ w_i d_i`` is the directional derivative of the
global batch loss and only ``projections`` scalars go down.

Bytes on the wire per round (``bytes_per_step``) are the pickled sizes of each call's
arguments and result, counted once per worker that receives or sends them: up, N messages of
``O(projections)`` scalars; down, N copies of the coefficients, ``O(N·projections)`` scalars
with independent directions, ``O(projections)`` shared. Nothing depends on the parameter
count. ``guess='local'`` is also offered, for comparison: a local-loss guess ``u_i`` depends
on the worker's data and cannot be regenerated from a seed, so each worker sends its
estimate (``O(parameters)``) and the coordinator sends back the aggregate: ordinary
data-parallel traffic, reported as such.

Failures: a worker that raises or dies becomes ``FGWorkerError`` naming the worker; a worker
that does not answer within ``timeout_s`` too. Actors are killed on ``shutdown()`` (also on
error, and on leaving the ``with`` block); a Ray cluster this class started is shut down.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from brigade.stages import fwdgrad as fg
from brigade.stages.errors import ConfigError, choose
from brigade.stages.fg_optim import FGOptimizer, make_optimizer

from .errors import PipelineError

__all__ = ["BACKENDS", "MERGES", "SHARING", "SHARDS", "FGDPConfig", "default_lr", "FGWorkerError", "ForwardGradientDP", "wire_size"]

MERGES = ("naive", "mean", "weighted")
SHARING = ("independent", "shared")
SHARDS = ("equal", "uneven")


def wire_size(obj: Any) -> int:
    """Bytes of ``obj`` pickled (protocol 5): what one message carries over the wire."""
    return len(pickle.dumps(obj, protocol=5))


class FGWorkerError(PipelineError):
    """A data-parallel worker raised, died or did not answer; names the worker."""

    def __init__(self, worker: int | list[int], cause: str) -> None:
        self.workers = [worker] if isinstance(worker, int) else list(worker)
        self.cause = cause
        who = ", ".join(str(w) for w in self.workers)
        super().__init__(f"fgdp worker {who} failed: {cause}")


@dataclass
class FGDPConfig:
    """Settings of the shared-seed data-parallel system; checked on construction."""

    workers: int = 2
    merge: str = "mean"
    directions: str = "independent"
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
    timeout_s: float = 600.0
    threads_per_worker: int = 1
    cpus_per_worker: float = 0.0

    def __post_init__(self) -> None:
        if int(self.workers) < 1:
            raise ConfigError(f"workers must be at least 1; got {self.workers}")
        self.merge = choose("merge", self.merge, MERGES)
        self.directions = choose("direction sharing", self.directions, SHARING)
        self.guess = choose("guess", self.guess, fg.GUESSES)
        self.dist = choose("direction distribution", self.dist, fg.DISTRIBUTIONS)
        self.scope = choose("scope", self.scope, fg.SCOPES)
        self.shards = choose("shards", self.shards, SHARDS)
        if self.blocks is not None:
            self.blocks = tuple(int(b) for b in self.blocks)
        _, _, _, _, self.projections = fg._check(self.guess, "weight", self.scope, self.dist, self.projections)
        if int(self.batch_size) < 1:
            raise ConfigError(f"batch_size must be at least 1; got {self.batch_size}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be positive; got {self.lr}")
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s must be positive; got {self.timeout_s}")
        # build one optimizer on a dummy parameter: an unknown name or option fails here
        opt = make_optimizer(self.optimizer, [nn.Parameter(torch.zeros(1))], self.lr, guess=self.guess, **self.optimizer_kw)
        self.optimizer = opt.kind
        if self.lr is None:
            self.lr = default_lr(self.optimizer, self.guess, self.merge, int(self.workers))


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


def _pack(units) -> list[bytes]:
    """Per-unit scalars as float32 bytes: 4 bytes a scalar on the wire, not 9 (pickled float)."""
    return [np.asarray(u, dtype=np.float32).tobytes() for u in units]


def _unpack(blobs: list[bytes]) -> list[np.ndarray]:
    return [np.frombuffer(b, dtype=np.float32) for b in blobs]


def _hash_tensors(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class _FGWorker:
    """One replica: model, optimizer, data shard. Plain class; ``ray.remote`` wraps it."""

    def __init__(
        self,
        rank: int,
        model: nn.Module,
        loss_fn: Callable,
        train: tuple[torch.Tensor, torch.Tensor],
        test: tuple[torch.Tensor, torch.Tensor] | None,
        cfg: FGDPConfig,
        rounds_per_epoch: int,
    ) -> None:
        torch.set_num_threads(max(1, int(cfg.threads_per_worker)))
        self.rank, self.cfg, self.loss_fn = rank, cfg, loss_fn
        self.model = model.train()
        self.x, self.y = train
        self.test = test
        self.rounds = int(rounds_per_epoch)
        self.bs = max(1, math.ceil(len(self.y) / self.rounds))
        self.opt = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, guess=cfg.guess, **cfg.optimizer_kw)
        self.heads = self.head_opt = None
        if cfg.guess == "local":
            torch.manual_seed(cfg.seed)  # identical heads on every replica
            self.heads = fg.LocalHeads(self.model, self.x[:2], blocks=cfg.blocks)
            self.head_opt = FGOptimizer(self.heads.parameters(), "adam", cfg.head_lr)
        self._order: tuple[int, torch.Tensor] | None = None
        # BatchNorm running statistics cannot be regenerated from a seed: as DDP does
        # (broadcast_buffers), worker 0's buffers travel with each update to every replica.
        self.sync_buffers = any(True for _ in self.model.buffers())

    # -- data ---------------------------------------------------------------------------
    def _batch(self, epoch: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._order is None or self._order[0] != epoch:
            g = fg.make_generator(self.cfg.seed, 0xDA7A, self.rank, epoch)
            self._order = (epoch, torch.randperm(len(self.y), generator=g))
        idx = self._order[1][b * self.bs : (b + 1) * self.bs]
        return self.x[idx], self.y[idx]

    def _keys(self, t: int, worker: int) -> tuple[int, int]:
        return (t, 0 if self.cfg.directions == "shared" else worker)

    # -- a round --------------------------------------------------------------------------
    def step(self, t: int, epoch: int, b: int, update: dict | None) -> dict:
        """Apply the previous round's update, then compute this round's message."""
        if update is not None:
            self.apply(update)
        return self.compute(t, epoch, b)

    def compute(self, t: int, epoch: int, b: int) -> dict:
        x, y = self._batch(epoch, b)
        if len(y) == 0:
            return {"d": None, "n": 0, "loss": 0.0}
        cfg = self.cfg
        if cfg.guess == "random":
            loss, d = fg.directional_derivatives(
                self.model, x, y, self.loss_fn, seed=cfg.seed, keys=self._keys(t, self.rank),
                projections=cfg.projections, dist=cfg.dist, scope=cfg.scope, blocks=cfg.blocks,
            )
            return self._with_buffers({"d": _pack([du.numpy() for du in d]), "n": int(len(y)), "loss": float(loss)})
        est = fg.forward_gradient(
            self.model, x, y, self.loss_fn, guess="local", heads=self.heads, scope=cfg.scope, blocks=cfg.blocks
        )
        return self._with_buffers({
            "g": [g.numpy() for g in est.grads],
            "h": [g.numpy() for g in est.head_grads],
            "n": int(len(y)),
            "loss": float(est.loss),
        })

    def _with_buffers(self, msg: dict) -> dict:
        if self.sync_buffers and self.rank == 0:
            msg["buffers"] = [b.detach().numpy().copy() for b in self.model.buffers()]
        return msg

    def apply(self, update: dict) -> None:
        """Take the optimizer step(s) that every replica takes from this update."""
        cfg = self.cfg
        if update["kind"] == "scalars":
            t = update["t"]
            for entries in update["steps"]:
                g = [torch.zeros_like(p) for p in self.model.parameters()]
                for worker, coefs in entries:
                    fg.combine(self.model, _unpack(coefs), cfg.seed, self._keys(t, worker), cfg.dist, cfg.scope, cfg.blocks, out=g)
                self.opt.step(grads=g)
        else:
            for gs, hs in zip(update["steps"], update["heads"]):
                self.opt.step(grads=[torch.tensor(a) for a in gs])
                self.head_opt.step(grads=[torch.tensor(a) for a in hs])
        if update.get("buffers") is not None:
            with torch.no_grad():
                for b, a in zip(self.model.buffers(), update["buffers"]):
                    b.copy_(torch.from_numpy(np.array(a)))

    # -- checks and reports ---------------------------------------------------------------
    def param_hash(self) -> str:
        ts = list(self.model.parameters()) + list(self.model.buffers())
        if self.heads is not None:
            ts += list(self.heads.parameters())
        return _hash_tensors(ts)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def evaluate(self) -> tuple[int, int, float]:
        """(correct, count, summed loss) on this worker's slice of the test set."""
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
        return self.rank


class _LocalRef:
    """The already-computed result (or error) of an in-process call."""

    def __init__(self, fn: Callable, args: tuple) -> None:
        try:
            # a pickle round trip, as over the wire: no object is shared with the caller
            self.value, self.error = fn(*pickle.loads(pickle.dumps(args, protocol=5))), None
        except Exception as err:  # noqa: BLE001 - re-raised by the coordinator, naming the worker
            self.value, self.error = None, err


class _LocalMethod:
    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def remote(self, *args) -> _LocalRef:
        return _LocalRef(self.fn, args)


class _LocalActor:
    """An in-process stand-in for a Ray actor handle: ``h.method.remote(...)`` runs at once."""

    def __init__(self, cls: type, args: tuple) -> None:
        self.obj = cls(*pickle.loads(pickle.dumps(args, protocol=5)))

    def __getattr__(self, name: str) -> _LocalMethod:
        return _LocalMethod(getattr(self.obj, name))


BACKENDS = ("ray", "local")


def _split(n: int, parts: int, how: str, seed: int) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=fg.make_generator(seed, 0x5A4D))
    if how == "equal":
        return [c for c in torch.tensor_split(perm, parts)]
    weights = np.arange(1, parts + 1, dtype=np.float64)  # shard i holds (i+1)/Σ of the data
    cuts = np.round(np.cumsum(weights) / weights.sum() * n).astype(int)[:-1]
    return [c for c in torch.tensor_split(perm, list(cuts))]


class ForwardGradientDP:
    """The coordinator: starts the workers, runs rounds, aggregates scalars, checks replicas.

    ``model`` is copied to every worker once (start-up traffic, ``startup_bytes``);
    ``train`` and ``test`` are ``(x, y)`` pairs or objects with ``.x`` and ``.y``, split
    into one shard per worker (``shards='uneven'``: shard i holds a share proportional to
    i+1, so that ``weighted`` and ``mean`` differ). ``address`` joins an existing Ray
    cluster; without it a local one is started if none is running (``num_cpus``).
    ``backend='local'`` runs the same workers in this process, one after another (the seed
    report's simulation): same messages, same bytes, same replicas, no Ray.
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
        shards = _split(len(y), N, cfg.shards, cfg.seed)
        sizes = [len(s) for s in shards]
        self.rounds_per_epoch = max(1, math.ceil((len(y) / N) / cfg.batch_size))
        tests: list = [None] * N
        if test is not None:
            tx, ty = (test.x, test.y) if hasattr(test, "x") else test
            tests = [(tx[c], ty[c]) for c in torch.tensor_split(torch.arange(len(ty)), N)]
        self.shard_sizes = sizes
        self.num_params = sum(p.numel() for p in model.parameters())
        self._ray = None
        self._started_ray = False
        self.actors: list = []
        self.startup_bytes = 0
        self.t = 0
        self._pending: dict | None = None
        self.history: list[dict] = []
        if self.backend == "ray":
            import ray

            from .ray_cluster import ensure_ray

            self._started_ray = ensure_ray(address, num_cpus)
            self._ray = ray
        try:
            if self.backend == "ray":
                remote_cls = self._ray.remote(_FGWorker).options(
                    num_cpus=cfg.cpus_per_worker, max_restarts=0, max_task_retries=0
                )
                start = remote_cls.remote
            else:
                def start(*args):
                    return _LocalActor(_FGWorker, args)
            model = model.cpu()
            for i in range(N):
                args = (i, model, self.loss_fn, (x[shards[i]], y[shards[i]]), tests[i], cfg, self.rounds_per_epoch)
                self.startup_bytes += wire_size(args)
                self.actors.append(start(*args))
            self._get([a.ping.remote() for a in self.actors], "start")
        except BaseException:
            self.shutdown()
            raise

    # -- remote calls -----------------------------------------------------------------------
    def _get(self, refs: list, what: str) -> list:
        """Results of one call per worker; a failure or a silence names the worker."""
        if self.backend == "local":
            for i, ref in enumerate(refs):
                if ref.error is not None:
                    err = ref.error
                    raise FGWorkerError(i, f"{what}: {type(err).__name__}: {err}") from err
            return [ref.value for ref in refs]
        ray = self._ray
        index = {ref: i for i, ref in enumerate(refs)}
        results: list = [None] * len(refs)
        pending = list(refs)
        deadline = time.monotonic() + self.cfg.timeout_s
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                late = sorted(index[r] for r in pending)
                raise FGWorkerError(late, f"no answer to {what} within {self.cfg.timeout_s:g} s")
            ready, pending = ray.wait(pending, num_returns=1, timeout=min(left, 5.0))
            for ref in ready:
                try:
                    results[index[ref]] = ray.get(ref)
                except Exception as err:  # noqa: BLE001 - becomes our own error, naming the worker
                    cause = getattr(err, "cause", None) or err
                    raise FGWorkerError(index[ref], f"{what}: {type(cause).__name__}: {cause}") from err
        return results

    # -- rounds -----------------------------------------------------------------------------
    def _aggregate(self, results: list[dict], t: int) -> dict:
        update = self._merge(results, t)
        update["buffers"] = results[0].get("buffers")
        return update

    def _merge(self, results: list[dict], t: int) -> dict:
        cfg = self.cfg
        live = [(i, r) for i, r in enumerate(results) if r["n"] > 0]
        total = sum(r["n"] for _, r in live)
        if cfg.merge == "weighted":
            w = {i: r["n"] / total for i, r in live}
        else:
            w = {i: 1.0 / len(live) for i, r in live}
        if cfg.guess == "random":
            # per worker, per unit: d / n (the average over that unit's projections)
            scaled = {i: [du.astype(np.float64) / max(len(du), 1) for du in _unpack(r["d"])] for i, r in live}
            units = len(live[0][1]["d"])
            if cfg.merge == "naive":
                steps = [[(i, _pack(scaled[i]))] for i, _ in live]
            elif cfg.directions == "shared":
                steps = [[(0, _pack([sum(w[i] * scaled[i][u] for i, _ in live) for u in range(units)]))]]
            else:
                steps = [[(i, _pack([w[i] * c for c in scaled[i]])) for i, _ in live]]
            return {"kind": "scalars", "t": t, "steps": steps}
        if cfg.merge == "naive":
            return {"kind": "tensors", "steps": [r["g"] for _, r in live], "heads": [r["h"] for _, r in live]}
        g = [sum(w[i] * r["g"][j] for i, r in live).astype(np.float32) for j in range(len(live[0][1]["g"]))]
        h = [sum(w[i] * r["h"][j] for i, r in live).astype(np.float32) for j in range(len(live[0][1]["h"]))]
        return {"kind": "tensors", "steps": [g], "heads": [h]}

    def step(self) -> dict:
        """One round; returns loss, samples and bytes on the wire (up, down, total)."""
        t = self.t
        epoch, b = divmod(t, self.rounds_per_epoch)
        up = down = 0
        refs = []
        for a in self.actors:
            args = (t, epoch, b, self._pending)
            down += wire_size(args)
            refs.append(a.step.remote(*args))
        results = self._get(refs, f"round {t}")
        up = sum(wire_size(r) for r in results)
        self._pending = self._aggregate(results, t)
        self.t += 1
        n = sum(r["n"] for r in results)
        loss = sum(r["loss"] * r["n"] for r in results) / max(n, 1)
        rec = {"t": t, "epoch": epoch, "loss": loss, "samples": n, "bytes_up": up, "bytes_down": down, "bytes": up + down}
        self.history.append(rec)
        return rec

    def flush(self) -> None:
        """Apply the last aggregated update on every replica (before evaluating or saving)."""
        if self._pending is not None:
            upd, self._pending = self._pending, None
            self._get([a.apply.remote(upd) for a in self.actors], "apply")

    def evaluate(self) -> dict:
        """Test accuracy and loss, each worker scoring its slice of the test set."""
        self.flush()
        parts = self._get([a.evaluate.remote() for a in self.actors], "evaluate")
        correct = sum(p[0] for p in parts)
        count = sum(p[1] for p in parts)
        loss = sum(p[2] for p in parts)
        return {"accuracy": correct / count if count else float("nan"), "loss": loss / count if count else float("nan")}

    def hashes(self) -> list[str]:
        self.flush()
        return self._get([a.param_hash.remote() for a in self.actors], "param_hash")

    def replicas_identical(self) -> bool:
        """True when every replica's parameters (and buffers, heads) hash the same."""
        return len(set(self.hashes())) == 1

    def state_dict(self) -> dict:
        self.flush()
        return self._get([self.actors[0].state_dict.remote()], "state_dict")[0]

    def fit(
        self,
        epochs: int,
        *,
        on_round: Callable[[dict], None] | None = None,
        on_epoch: Callable[[int, dict], None] | None = None,
        evaluate_each_epoch: bool = False,
    ) -> dict:
        """Run ``epochs`` epochs of rounds; returns the report (see ``report``)."""
        t0 = time.perf_counter()
        per_epoch: list[dict] = []
        for e in range(int(epochs)):
            recs = []
            for _ in range(self.rounds_per_epoch):
                recs.append(self.step())
                if on_round is not None:
                    on_round(recs[-1])
            n = sum(r["samples"] for r in recs)
            ep = {"epoch": e, "train_loss": sum(r["loss"] * r["samples"] for r in recs) / max(n, 1)}
            if evaluate_each_epoch:
                ep["test_accuracy"] = self.evaluate()["accuracy"]
            per_epoch.append(ep)
            if on_epoch is not None:
                on_epoch(e, ep)
        wall = time.perf_counter() - t0
        return self.report(per_epoch, wall)

    def report(self, per_epoch: list[dict], wall_s: float) -> dict:
        ev = self.evaluate()
        hs = self.hashes()
        steps = max(len(self.history), 1)
        return {
            "final_test_accuracy": ev["accuracy"],
            "final_test_loss": ev["loss"],
            "train_loss": [e["train_loss"] for e in per_epoch],
            "epochs": per_epoch,
            "wall_s": wall_s,
            "rounds": len(self.history),
            "bytes_per_step": sum(r["bytes"] for r in self.history) / steps,
            "bytes_up_per_step": sum(r["bytes_up"] for r in self.history) / steps,
            "bytes_down_per_step": sum(r["bytes_down"] for r in self.history) / steps,
            "startup_bytes": self.startup_bytes,
            "num_params": self.num_params,
            "param_bytes": 4 * self.num_params,
            "replicas_identical": len(set(hs)) == 1,
            "param_hash": hs[0],
            "shard_sizes": self.shard_sizes,
            "config": asdict(self.cfg),
        }

    # -- lifetime ---------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Kill the worker actors; shut Ray down if this object started it."""
        ray = self._ray
        if ray is not None:
            for a in self.actors:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
        self.actors = []
        if self._started_ray and ray is not None and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> "ForwardGradientDP":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
