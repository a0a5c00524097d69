"""The Ray backend: one actor per worker, activations and gradients sent actor to actor.

Data path, chosen by measurement (``bench/transport.py``, 4 MB one way on this kind of
machine): a torch tensor argument of a Ray call goes through the object store pickled
(~18 ms); a numpy array argument is read zero-copy from shared memory (~4-6 ms); a gloo
send/recv between the two processes costs ~2 ms. So by default (``transport="p2p"``) the
actors connect to each other once, at start (:class:`~brigade.engine.transport.P2PTransport`):
actors on one host through a Unix socket and a shared-memory ring, others over a
torch.distributed gloo group (``transport="gloo"``: gloo for all); a message crosses as a
header and the tensor bytes, and a receiver thread per peer files it in the worker's mailbox. ``transport="ray"`` keeps the
Ray-call route: a fire-and-forget call ``peer.deliver.remote(key, array)`` with numpy arrays,
copied into torch tensors on arrival. Either way the driver's own messages (inputs, targets,
labels) travel as ``run_step`` arguments, and actors are threaded, so deliveries land while
the actor's step thread is blocked waiting for them.

The actors are reserved together as one Ray placement group, one bundle {CPU, GPU} per
worker, laid out by ``placement`` (pack, spread, strict_pack, strict_spread): a cluster that
could never hold it is refused at once, busy resources are waited for up to
``placement_timeout_s``, and the group is removed with the actors (shutdown or failure).

The actor class is private and plain (testable without Ray); ``ray.remote`` is applied here.
A remote failure becomes :class:`StageFailedError` naming the stage; every actor is killed.
"""

from __future__ import annotations

import os
import re
import threading
import time
import warnings
from typing import Any, NoReturn

import torch

from brigade.schedulers import Action

from .actors import from_wire, start_actors, to_wire, wait_all
from .clock import measure_offset, stamp
from .config import ClusterConfig
from .errors import PipelineConfigError, PipelineError, StageFailedError
from .ray_cluster import (gcs_alive, head_lost, joined_gcs_address, lost_cluster_error,
                          mark_lost)
from .placement import bundles, fair_share, shortfall, trusted_shortfall, trusted_workers
from .spec import WorkerSpec, build_worker
from .worker import StepResult

__all__ = ["RayBackend", "actor_env", "to_wire", "from_wire", "HEAD_CHECK_S"]

# How often a wait on the stages asks whether a joined cluster's head still answers (a TCP
# connect, milliseconds): Ray itself waits out a 60 s reconnect window.
HEAD_CHECK_S = 2.0


class _StageActor:
    """One worker process: builds its stages, receives messages, runs step programs."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.device = torch.device(spec.device)
        self.worker = build_worker(spec, send=self._send)
        self.peers: list[Any] = []
        self._in_flight: list[Any] = []
        self.transport: Any = None  # a P2PTransport once setup_transport has run
        self._staged: dict[int, list[tuple]] = {}  # token -> a later run's inputs (stage)
        self._staged_ready = threading.Condition()

    def connect(self, peers: list[Any]) -> tuple[int, str]:
        """Learn the other actors' handles (index = worker); returns this process's id and
        its node's IP address (the start-up line says on how many nodes the stages run)."""
        import ray

        self.peers = peers
        return os.getpid(), ray.util.get_node_ip_address()

    def endpoint(self) -> tuple[str, int]:
        """This node's IP address and a port free on it now (for rank 0's store)."""
        import ray

        from .transport import free_port

        return ray.util.get_node_ip_address(), free_port("")

    def setup_transport(
        self, rank: int, world_size: int, addr: str, port: int, timeout_s: float = 60.0,
        shared_memory: bool = True,
    ) -> None:
        """Join the p2p group (every actor calls this at once); from then on messages to
        peers go over it instead of Ray calls."""
        import ray

        from .transport import _LOOPBACK, P2PTransport

        host = None if addr in _LOOPBACK else ray.util.get_node_ip_address()
        self.transport = P2PTransport(
            rank, world_size, addr, port, self.worker.deliver, self.device,
            timeout_s=timeout_s, host=host, shared_memory=shared_memory,
        )

    def close_transport(self, timeout_s: float = 2.0) -> bool:
        """Stop the receiver threads (once every peer closes too); True when all ended."""
        if self.transport is None:
            return True
        return self.transport.close(timeout_s)

    def ping(self) -> tuple[float, str]:
        """This process's clock and which clock it is, to align timelines across processes
        (:mod:`brigade.engine.clock`)."""
        return stamp()

    def deliver(self, key: Any, value: Any) -> None:
        """Called by a neighbour: file one message in the mailbox."""
        self.worker.deliver(key, from_wire(value, self.device))

    def _send(self, dest: int, key: Any, payload: Any) -> None:
        if self.transport is not None:
            self.transport.send(dest, key, payload)
        else:
            self._in_flight.append(self.peers[dest].deliver.remote(key, to_wire(payload)))

    def stage(self, token: int, messages: list[tuple]) -> None:
        """Take a later run's inputs now, while this actor's step thread trains on the
        current run (the actor is threaded), copied into tensors here: the next
        ``run_step(messages=token)`` starts with them in place instead of waiting for them
        to arrive and be copied (``RayBackend._stage``)."""
        received = [(k, from_wire(v, self.device)) for k, v in messages]
        with self._staged_ready:
            self._staged[token] = received
            self._staged_ready.notify_all()

    def _take_staged(self, token: int, timeout: float) -> list[tuple]:
        """The inputs ``stage`` took under ``token`` (waiting for that call to finish:
        the staging of the run after this one may even land first, it is sent right after
        this call)."""
        with self._staged_ready:
            if not self._staged_ready.wait_for(lambda: token in self._staged, timeout):
                raise PipelineError(f"the inputs staged as run {token} did not arrive within "
                                    f"{timeout:.0f} s")
            for older in [t for t in self._staged if t < token]:
                del self._staged[older]  # staged for a run the driver ran otherwise
            return self._staged.pop(token)

    def run_step(
        self, training: bool, actions: list[Action], messages: list[tuple] | int,
        timeout: float, mode: str = "run", keep: dict | None = None,
    ) -> StepResult:
        """Run one step's program; returns losses, eval outputs and the timeline events.
        ``messages``: the run's inputs, or the token they were staged under."""
        import ray

        if isinstance(messages, int):
            received = self._take_staged(messages, timeout)
        else:
            received = [(k, from_wire(v, self.device)) for k, v in messages]
        self.worker.begin(training, received, actions, mode, keep)
        self.worker.run(actions, timeout, self.transport and self.transport.check)
        if self._in_flight:  # surface delivery failures and release the object refs
            ray.get(self._in_flight)
            self._in_flight = []
        result = self.worker.end()
        result.outputs = {j: to_wire(v) for j, v in result.outputs.items()}
        result.kept = [(t, s, at, {k: to_wire(v) for k, v in state.items()})
                       for t, s, at, state in result.kept]
        return result

    def state_dicts(self) -> dict[int, dict]:
        return {
            s: {k: v.detach().cpu() for k, v in st.module.state_dict().items()}
            for s, st in self.worker.stages.items()
        }

    def load_state_dicts(self, states: dict[int, dict]) -> None:
        for s, st in self.worker.stages.items():
            st.module.load_state_dict(states[s])

    def checkpoint_state(self) -> dict[int, dict]:
        return self.worker.checkpoint_state()

    def load_checkpoint_state(self, states: dict[int, dict]) -> None:
        self.worker.load_checkpoint_state(states)

    def pending_messages(self) -> list:
        return self.worker.mailbox.pending()

    def memory(self) -> dict[str, int]:
        """This process's resident bytes and glibc malloc's bytes in use (heap and mmapped
        blocks): RSS that grows while malloc's in-use stays flat is the heap's high-water
        mark (nothing is trimmed, see actor_env), not a leak (``bench/soak.py``)."""
        import sys

        return {"rss": _rss_bytes(), "malloc_in_use": _malloc_in_use(),
                "python_blocks": sys.getallocatedblocks(),  # pymalloc: not in malloc's count
                "pending_messages": len(self.worker.mailbox.pending())}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_in_use() -> int:
    """glibc ``mallinfo2``: bytes handed out (uordblks) plus mmapped blocks (hblkhd); -1
    where it is not glibc."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return -1
    return int(info.uordblks + info.hblkhd)


def _ship_by_value(rule: Any) -> None:
    """A rule declared outside brigade (a user's module, or ``__main__``) reaches the actors
    by value: Ray pickles that module's classes and functions with their code, so a worker
    builds a rule whose module it cannot import (cloudpickle's pickle-by-value)."""
    import sys

    from ray import cloudpickle

    handlers = [f for h in rule.handlers.values() for f in (h.run, h.needs)]
    for obj in (rule.stage_class, rule.options, rule.prepare, *handlers):
        name = getattr(obj, "__module__", None) or ""
        if not name or name.startswith("brigade.") or name in ("__main__", "builtins"):
            continue  # brigade is installed on every node; __main__ goes by value anyway
        module = sys.modules.get(name)
        if module is not None:
            try:
                cloudpickle.register_pickle_by_value(module)
            except ValueError:  # a module inside a package already by value
                pass


class RayBackend:
    """Starts one actor per worker on a Ray cluster and drives them step by step.

    ``transport``: "p2p" (default) sends activations and gradients actor to actor, through
    shared memory between actors on one host and over a torch.distributed gloo group
    between hosts; "gloo" sends everything over the gloo group; "ray" sends them as Ray
    actor calls carrying numpy arrays.
    """

    stages_inputs = True  # run_step(then=...) ships the next run's inputs ahead

    def __init__(self, specs: list[WorkerSpec], cluster: ClusterConfig | None = None) -> None:
        """``cluster``: resources per stage, placement, transport, timeout and the trusted
        resource (checked when it was built)."""
        cluster = cluster or ClusterConfig()
        self.timeout_s = cluster.timeout_s
        self.worker_stages = [sorted(s.modules) for s in specs]
        self.actors: list[Any] = []
        self.staged = 0  # the token of the inputs run_step(then=...) shipped last
        self.gcs_address = joined_gcs_address()  # watched: a dead head fails in seconds
        self.head_checked = time.monotonic()
        trusted_resource = cluster.trusted_resource
        trusted = None
        if trusted_resource:
            trusted = trusted_workers(specs[0].worker_of, specs[0].labels_to, len(specs))
        cpus, gpus = _resources(len(specs), cluster.cpus_per_stage, cluster.gpus_per_stage,
                                cluster.placement, trusted, trusted_resource)
        self.cpus, self.gpus = cpus, gpus
        self.placement_group = _place(len(specs), cpus, gpus, cluster.placement,
                                      cluster.placement_timeout_s, trusted, trusted_resource,
                                      specs[0].method)
        try:
            self._start_actors(specs, cpus, gpus)
            where = self._get([a.connect.remote(self.actors) for a in self.actors])
            self.pids = [pid for pid, _ in where]
            self.node_ips = [ip for _, ip in where]
            self.transport = "ray"
            if cluster.transport != "ray" and len(self.actors) > 1:
                self._setup_p2p(cluster.transport)
            self.offsets = self._clock_offsets()
        except BaseException:
            self._kill()  # also removes the placement group: nothing outlives a failed start
            raise

    def _start_actors(self, specs: list[WorkerSpec], cpus: float, gpus: float) -> None:
        """One actor per worker, worker i in bundle i of the placement group."""
        threads = max(1, int(cpus)) if cpus >= 1 else 1
        for spec in specs[:1]:
            _ship_by_value(spec.rule)
        for spec in specs:
            spec.num_threads = threads
            spec.device = "cuda" if gpus > 0 else "cpu"
        self.actors = start_actors(_StageActor, [(spec,) for spec in specs], cpus=cpus, gpus=gpus,
                                   placement_group=self.placement_group, max_concurrency=8,
                                   env=actor_env())

    def _setup_p2p(self, transport: str) -> None:
        """Connect the actors' transports ("p2p": same host, socket and shared memory,
        between hosts gloo; "gloo": gloo for all): rank i = worker i, the store on
        worker 0's node (loopback when every actor shares one node). Falls back to Ray calls
        where torch has no gloo."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_gloo_available()):
            warnings.warn("torch.distributed with gloo is not available here; stage actors "
                          "exchange tensors through Ray calls (transport='ray')", stacklevel=3)
            return
        endpoints = self._get([a.endpoint.remote() for a in self.actors])
        ips = {ip for ip, _ in endpoints}
        addr = "127.0.0.1" if len(ips) == 1 else endpoints[0][0]
        port = endpoints[0][1]
        rendezvous_s = min(60.0, self.timeout_s)
        try:
            self._get([
                a.setup_transport.remote(rank, len(self.actors), addr, port, rendezvous_s,
                                         transport == "p2p")
                for rank, a in enumerate(self.actors)
            ])
        except PipelineError as err:
            raise PipelineError(
                f"the stage actors could not open their torch.distributed group at "
                f"{addr}:{port} ({err}); pass transport='ray' to send tensors through Ray "
                "calls instead"
            ) from err
        self.transport = transport

    def _clock_offsets(self) -> list[float]:
        """Each actor's clock minus the driver's: 0 on the driver's host (one clock), else
        from the quickest of a few ping round trips (:mod:`brigade.engine.clock`)."""
        import ray

        return [measure_offset(lambda a=actor: ray.get(a.ping.remote())) for actor in self.actors]

    def clock_offsets(self) -> list[float]:
        return self.offsets

    def run_step(
        self, training: bool, programs: list[list[Action]], messages: list[list[tuple]] | int,
        mode: str = "run", keep: list[dict] | None = None,
        then: list[list[tuple]] | None = None,
    ) -> list[StepResult]:
        """Start every actor's program and wait, failing fast if any actor fails.

        ``messages``: per worker, the run's inputs, or the token an earlier run staged them
        under. ``then``: per worker, the next run's inputs, shipped once this run is under
        way (:meth:`_stage`); ``self.staged`` is their token afterwards. Why: shipping a run's
        inputs (22 MB for the main job's 109 steps) and copying them into tensors on the
        actors made the gap between runs 16-146 ms, every stage idle through it."""
        wire = ([messages] * len(self.actors) if isinstance(messages, int)
                else [[(k, to_wire(v)) for k, v in msgs] for msgs in messages])
        refs = [
            actor.run_step.remote(training, prog, msgs, self.timeout_s, mode,
                                  keep[w] if keep else None)
            for w, (actor, prog, msgs) in enumerate(zip(self.actors, programs, wire))
        ]
        staging = self._stage(then) if then is not None else []
        results = self._get(refs + staging)[:len(refs)]
        for r in results:  # eval outputs and kept weights travel as numpy: owned tensors
            r.outputs = {j: from_wire(v) for j, v in r.outputs.items()}
            r.kept = [(t, s, at, {k: from_wire(v) for k, v in state.items()})
                      for t, s, at, state in r.kept]
        return results

    def _stage(self, messages: list[list[tuple]]) -> list:
        """Hand each actor a later run's inputs under a new token (``self.staged``); the
        refs of those calls, to wait on with the current run's."""
        self.staged += 1
        return [actor.stage.remote(self.staged, [(k, to_wire(v)) for k, v in msgs])
                for actor, msgs in zip(self.actors, messages)]

    def _get(self, refs: list) -> list:
        """``ray.get`` in completion order, so the first failure is raised at once; the
        joined cluster's head is checked before (at most every HEAD_CHECK_S) and during
        the wait (after each poll that brought nothing). Refs past the first one per actor
        (a run's staging calls) are named by their actor too."""
        if time.monotonic() - self.head_checked >= HEAD_CHECK_S:
            self._check_cluster()  # steps may go on finishing without it (p2p needs no GCS)
        n = len(self.actors) or 1
        return wait_all(
            refs, self.timeout_s, lambda i, err: self._fail(i % n, err),
            lambda late: self._timed_out(sorted({i % n for i in late})), poll_s=HEAD_CHECK_S,
            on_idle=self._check_cluster,
        )

    def _timed_out(self, late: list[int]) -> None:
        self._kill()
        raise PipelineError(
            f"no progress for {self.timeout_s:.0f} s: workers {late} did not finish; raise "
            "timeout_s if steps are that slow"
        )

    def _head_gone(self) -> bool:
        """Whether the joined cluster's head stopped answering (asked again until it is
        known lost). Its actors and placement group went with it and are forgotten here:
        a Ray call about them would wait on the dead GCS. A private cluster's head dies
        with this process: never."""
        if not self.gcs_address:
            return False
        if not head_lost(self.gcs_address) and not gcs_alive(self.gcs_address):
            mark_lost(self.gcs_address)
        if head_lost(self.gcs_address):
            self.actors, self.placement_group = [], None
            return True
        return False

    def _lose(self, err: BaseException | None = None) -> NoReturn:
        """The one line naming the cluster whose head is gone (where stages died with it,
        their errors say only that they died)."""
        raise lost_cluster_error(self.gcs_address) from err

    def _check_cluster(self) -> None:
        """A joined cluster whose head stopped answering fails now, naming it (Ray's own
        reconnect window is 60 s)."""
        self.head_checked = time.monotonic()
        if self._head_gone():
            self._lose()

    def _fail(self, worker: int, err: Exception) -> None:
        if self._head_gone():  # actors die with their head node: say which it was
            self._lose(err)
        self._kill()  # no graceful close: a failure must surface at once
        raise StageFailedError(worker, self.worker_stages[worker], _root_cause(err)) from err

    def _merged(self, method: str) -> dict[int, dict]:
        """Call ``method`` on every actor and merge their per-stage dicts."""
        states: dict[int, dict] = {}
        for part in self._get([getattr(a, method).remote() for a in self.actors]):
            states.update(part)
        return states

    def state_dicts(self) -> dict[int, dict]:
        return self._merged("state_dicts")

    def load_state_dicts(self, states: dict[int, dict]) -> None:
        self._get([a.load_state_dicts.remote(states) for a in self.actors])

    def checkpoint_state(self) -> dict[int, dict]:
        return self._merged("checkpoint_state")

    def load_checkpoint_state(self, states: dict[int, dict]) -> None:
        self._get([a.load_checkpoint_state.remote({s: states[s] for s in stages})
                   for a, stages in zip(self.actors, self.worker_stages)])

    def shutdown(self, close_timeout_s: float = 2.0) -> None:
        """Close the p2p group (bounded by ``close_timeout_s``), then kill every actor."""
        import ray

        if self.actors and self.transport != "ray" and not self._head_gone():
            try:
                refs = [a.close_transport.remote(close_timeout_s) for a in self.actors]
                ray.wait(refs, num_returns=len(refs), timeout=close_timeout_s + 1.0)
            except Exception:  # noqa: BLE001 - Ray already shut down; killing is enough
                pass
        self._kill()

    def _kill(self) -> None:
        """Kill every actor now (a receiver thread blocked in recv dies with its process),
        then hand the placement group's resources back to the cluster."""
        import ray

        if self._head_gone():  # nothing to kill: they went with the head
            return
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
        pg, self.placement_group = self.placement_group, None
        if pg is not None:
            try:
                ray.util.remove_placement_group(pg)
            except Exception:  # noqa: BLE001 - Ray already shut down: the group went with it
                pass


_ERROR_LINE = re.compile(r"^(\w+\.)*\w*(Error|Exception|Interrupt|Exit)\b.*")
_RAY_WRAPPERS = ("RayTaskError", "RayActorError", "ActorDiedError")


def _root_cause(err: BaseException) -> str:
    """The innermost 'SomeError: message' line of a (possibly nested) remote failure."""
    lines = [ln.strip() for ln in str(err).splitlines()]
    for line in reversed(lines):
        if _ERROR_LINE.match(line) and not line.startswith(_RAY_WRAPPERS):
            return line
    if "died" in str(err).lower():
        return f"the worker process died ({type(err).__name__})"
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _resources(workers: int, cpus: float | None, gpus: float | None,
               placement: str = "pack", trusted: list[bool] | None = None,
               resource: str | None = None) -> tuple[float, float]:
    """CPUs and GPUs per actor: as asked, else a fair share that the cluster's alive nodes
    can hold ``workers`` times under ``placement``, the trusted workers on the nodes that
    carry ``resource`` (:func:`~.placement.fair_share`)."""
    import ray

    total = ray.cluster_resources()
    if gpus is None:
        gpus = 1.0 if total.get("GPU", 0) >= workers else 0.0
    elif gpus > 0 and total.get("GPU", 0) < gpus * workers:
        raise PipelineConfigError(
            f"{workers} stages x {gpus:g} GPU need {gpus * workers:g} GPUs; the cluster has "
            f"{total.get('GPU', 0):g}; pass --gpus-per-stage 0 (gpus_per_stage=0) to run on CPU"
        )
    if cpus is None:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        held = [n.get("CPU", 0.0) for n in nodes if resource and n.get(resource, 0) > 0]
        cpus = fair_share(workers, [n.get("CPU", 0.0) for n in nodes], placement, held,
                          sum(trusted or []))
    return cpus, gpus


# glibc malloc settings for stage processes; a value the user exported wins.
_MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),   # keep freed heap memory for the next step
    "MALLOC_TOP_PAD_": str(64 << 20),         # grow the heap in 64 MB steps
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),  # blocks up to 32 MB (glibc's cap) from the heap
}


def actor_env() -> dict[str, str]:
    """Environment of a stage process (Ray actor or torchrun rank): glibc malloc settings
    that keep activation memory mapped from one step to the next.

    Why: a step frees its activations and the next one allocates them again. With glibc's
    defaults each thread gets an arena (a threaded actor runs steps on whichever of Ray's
    threads is free; receiver threads allocate incoming buffers), freed memory goes back to
    the OS and every step page-faults it in again. One arena (measured, bench/resnet_splits.py,
    resnet18 width 16, 2 stages, m=8): 7.5k faults per step under 1F1B and 19k under GPipe
    fell to 150-2,300; six GPipe steps took 0.97 s instead of 1.7-2.1 s. The first stage still faulted
    ~2,000 pages (8 MB) per step in again: blocks above the dynamic mmap threshold were
    mmapped fresh, and the heap top was trimmed after each backward. No trimming and a fixed
    32 MB threshold bring that to ~50 per step; the first stage's compute per step fell 2-6%
    in four side-by-side runs (1F1B and GPipe, two pipelines alternating in one Ray
    cluster). The cost: a process keeps its peak heap (which every step reaches again) instead of returning it.
    """
    return {k: os.environ.get(k, v) for k, v in _MALLOC_ENV.items()}


def _fmt(res: dict[str, float]) -> str:
    return f"{res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU"


def _place(workers: int, cpus: float, gpus: float, placement: str, timeout_s: float,
           trusted: list[bool] | None = None, resource: str | None = None,
           method: str = "backprop"):
    """Reserve one bundle {CPU: cpus, GPU: gpus} per worker in a placement group, laid out
    by ``placement``; wait up to ``timeout_s`` for it. None when nothing is asked for.
    Workers flagged in ``trusted`` also ask for a sliver of ``resource``, so that they land
    only on nodes that carry it.

    A cluster that could never hold the group fails at once (PipelineConfigError, the
    user's numbers are wrong); one whose resources are busy fails after ``timeout_s``
    (PipelineError). Either message says what was asked, what the cluster has, the fix.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    group = bundles(workers, cpus, gpus, trusted, resource)
    if resource and not all(group):
        raise PipelineConfigError(
            f"--trusted-resource {resource} needs every stage to reserve some CPU or GPU "
            f"(got {cpus:g} CPU, {gpus:g} GPU per stage); raise --cpus-per-stage")
    if not any(group):
        return None
    bundle = {k: v for k, v in group[0].items() if k in ("CPU", "GPU")}
    ask = f"{workers} stages x {{{_fmt(bundle)}}} (placement {placement})"
    fix = ("use fewer --stages, a smaller --cpus-per-stage / --gpus-per-stage, "
           "or add nodes to the cluster")
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    total, free = ray.cluster_resources(), ray.available_resources()
    has = f"the cluster has {_fmt(total)} on {len(nodes)} node(s) ({_fmt(free)} free now)"
    why = shortfall(workers, bundle, placement, nodes) if bundle else None
    if why is not None:
        raise PipelineConfigError(f"cannot place {ask}: {has}; {why}; {fix}")
    if resource:
        why = trusted_shortfall(group, resource, placement, nodes, method)
        if why is not None:
            raise PipelineConfigError(f"cannot place {ask}: {why}")
    name = f"brigade-{os.getpid()}-{time.monotonic_ns()}"
    pg = placement_group([dict(b) for b in group], strategy=placement.upper(), name=name)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)  # pg.wait takes whole seconds
    if not ready:
        remove_placement_group(pg)
        free = ray.available_resources()
        raise PipelineError(
            f"could not place {ask} within {timeout_s:g} s: the cluster has {_fmt(total)} "
            f"({_fmt(free)} free now: other jobs hold the rest); wait for them, raise "
            f"--placement-timeout, or {fix}"
        )
    return pg
