"""The Ray backend: one actor per worker, activations and gradients sent actor to actor.

Data path, chosen by measurement (DESIGN.md, 4 MB one way on this kind of machine): a torch
tensor argument goes through the object store pickled (~18 ms); a numpy array argument is
read zero-copy from shared memory (~3.8 ms). So a message crosses as a numpy array in a
fire-and-forget actor call ``peer.deliver.remote(key, array)``; the receiver copies it into a
torch tensor (0.1 ms) and files it in its mailbox. Actors are threaded, so deliveries land
while the actor's step thread is blocked waiting for them.

The actor class is private and plain (testable without Ray); ``ray.remote`` is applied here.
A remote failure becomes :class:`StageFailedError` naming the stage; every actor is killed.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import numpy as np
import torch

from brigade.schedulers import Action

from .errors import PipelineError, StageFailedError
from .spec import WorkerSpec, build_worker
from .worker import StepResult

__all__ = ["RayBackend", "to_wire", "from_wire"]


def to_wire(value: Any) -> Any:
    """Tensors become numpy arrays (zero-copy reads on the far side); tuples recurse."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: ship the tensor itself
            return t
        return t.numpy()
    if isinstance(value, tuple):
        return tuple(to_wire(v) for v in value)
    return value


def from_wire(value: Any, device: torch.device | str = "cpu") -> Any:
    """The inverse of :func:`to_wire`: numpy arrays become owned torch tensors."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value, copy=True)).to(device)
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(from_wire(v, device) for v in value)
    return value


class _StageActor:
    """One worker process: builds its stages, receives messages, runs step programs."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.device = torch.device(spec.device)
        self.worker = build_worker(spec, send=self._send)
        self.peers: list[Any] = []
        self._in_flight: list[Any] = []

    def connect(self, peers: list[Any]) -> int:
        """Learn the other actors' handles (index = worker)."""
        self.peers = peers
        return os.getpid()

    def ping(self) -> float:
        """This process's clock, to align timelines across processes."""
        return time.perf_counter()

    def deliver(self, key: Any, value: Any) -> None:
        """Called by a neighbour: file one message in the mailbox."""
        self.worker.mailbox.put(key, from_wire(value, self.device))

    def _send(self, dest: int, key: Any, tensor: torch.Tensor) -> None:
        self._in_flight.append(self.peers[dest].deliver.remote(key, to_wire(tensor)))

    def run_step(
        self, training: bool, actions: list[Action], messages: list[tuple], timeout: float
    ) -> StepResult:
        """Run one step's program; returns losses, eval outputs and the timeline events."""
        import ray

        self.worker.begin(
            training, [(k, from_wire(v, self.device)) for k, v in messages], actions
        )
        self.worker.run(actions, timeout)
        if self._in_flight:  # surface delivery failures and release the object refs
            ray.get(self._in_flight)
            self._in_flight = []
        result = self.worker.end()
        result.outputs = {j: to_wire(v) for j, v in result.outputs.items()}
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


class RayBackend:
    """Starts one actor per worker on a Ray cluster and drives them step by step."""

    def __init__(
        self,
        specs: list[WorkerSpec],
        cpus_per_stage: float | None,
        gpus_per_stage: float | None,
        timeout_s: float,
    ) -> None:
        import ray

        self.timeout_s = timeout_s
        self.worker_stages = [sorted(s.modules) for s in specs]
        cpus, gpus = _resources(len(specs), cpus_per_stage, gpus_per_stage)
        threads = max(1, int(cpus)) if cpus >= 1 else 1
        remote_cls = ray.remote(_StageActor)
        self.actors = []
        for spec in specs:
            spec.num_threads = threads
            spec.device = "cuda" if gpus > 0 else "cpu"
            self.actors.append(
                remote_cls.options(num_cpus=cpus, num_gpus=gpus, max_concurrency=8).remote(spec)
            )
        self.pids = self._get([a.connect.remote(self.actors) for a in self.actors])
        self.offsets = self._clock_offsets()

    def _clock_offsets(self) -> list[float]:
        """Each actor's clock minus the driver's, from one ping round trip each."""
        import ray

        offsets = []
        for actor in self.actors:
            t0 = time.perf_counter()
            remote = ray.get(actor.ping.remote())
            t1 = time.perf_counter()
            offsets.append(remote - (t0 + t1) / 2)
        return offsets

    def clock_offsets(self) -> list[float]:
        return self.offsets

    def run_step(
        self, training: bool, programs: list[list[Action]], messages: list[list[tuple]]
    ) -> list[StepResult]:
        """Start every actor's program and wait, failing fast if any actor fails."""
        refs = [
            actor.run_step.remote(
                training, prog, [(k, to_wire(v)) for k, v in msgs], self.timeout_s
            )
            for actor, prog, msgs in zip(self.actors, programs, messages)
        ]
        return self._get(refs)

    def _get(self, refs: list) -> list:
        """``ray.get`` in completion order, so the first failure is raised at once."""
        import ray

        index = {ref: i for i, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending = list(refs)
        deadline = time.monotonic() + self.timeout_s
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=5.0)
            for ref in ready:
                try:
                    results[index[ref]] = ray.get(ref)
                except Exception as err:  # noqa: BLE001 - becomes our own error below
                    self._fail(index[ref], err)
            if time.monotonic() > deadline:
                self.shutdown()
                raise PipelineError(
                    f"no progress for {self.timeout_s:.0f} s: workers "
                    f"{[index[r] for r in pending]} did not finish; raise timeout_s if "
                    "steps are that slow"
                )
        return results

    def _fail(self, worker: int, err: Exception) -> None:
        self.shutdown()
        raise StageFailedError(worker, self.worker_stages[worker], _root_cause(err)) from err

    def state_dicts(self) -> dict[int, dict]:
        states: dict[int, dict] = {}
        for part in self._get([a.state_dicts.remote() for a in self.actors]):
            states.update(part)
        return states

    def load_state_dicts(self, states: dict[int, dict]) -> None:
        self._get([a.load_state_dicts.remote(states) for a in self.actors])

    def checkpoint_state(self) -> dict[int, dict]:
        states: dict[int, dict] = {}
        for part in self._get([a.checkpoint_state.remote() for a in self.actors]):
            states.update(part)
        return states

    def load_checkpoint_state(self, states: dict[int, dict]) -> None:
        self._get([a.load_checkpoint_state.remote({s: states[s] for s in stages})
                   for a, stages in zip(self.actors, self.worker_stages)])

    def shutdown(self) -> None:
        """Kill every actor (they hold no state worth a graceful exit once a run ends)."""
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []


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


def _resources(workers: int, cpus: float | None, gpus: float | None) -> tuple[float, float]:
    """CPUs and GPUs per actor: as asked, else a fair share of the cluster."""
    import ray

    total = ray.cluster_resources()
    if gpus is None:
        gpus = 1.0 if total.get("GPU", 0) >= workers else 0.0
    elif gpus > 0 and total.get("GPU", 0) < gpus * workers:
        raise PipelineError(
            f"{workers} stages x {gpus} GPU need {gpus * workers:g} GPUs; the cluster has "
            f"{total.get('GPU', 0):g}; pass gpus_per_stage=0 to run on CPU"
        )
    if cpus is None:
        cpus = max(total.get("CPU", 1) / workers, 0.01)
        cpus = float(int(cpus)) if cpus >= 1 else round(cpus, 2)
    return cpus, gpus
