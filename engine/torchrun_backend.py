"""The torchrun backend: one worker per rank, messages by torch.distributed send/recv.

SPMD: every rank runs the same program (``torchrun --nproc-per-node P -m
brigade.engine.launch ...``) and builds the same :class:`Pipeline`; this backend builds
only the rank's own worker. A step runs the rank's action list with the same Worker code
as the Ray backend; stages exchange activations and gradients over a torch.distributed
gloo group of their own (CUDA tensors are staged through host memory) through
:class:`~brigade.engine.transport.P2PTransport`, and each rank's step result is all-gathered
over the default group, so every rank's Pipeline sees the same losses, outputs and
timeline. Rank 0 writes what the run produces.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from brigade.schedulers import Action

from .config import ClusterConfig
from .errors import PipelineConfigError, StageFailedError
from .spec import WorkerSpec, build_worker
from .worker import StepResult

__all__ = ["TorchrunBackend", "in_torchrun", "init_torchrun", "broadcast_object", "is_rank0"]


def in_torchrun() -> bool:
    """Whether this process was started by torchrun (its environment says so)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or (
        "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
    )


def init_torchrun() -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment (once)."""
    if not in_torchrun():
        raise PipelineConfigError(
            "backend='torchrun' must run under torchrun: `torchrun --nproc-per-node P -m "
            "brigade.engine.launch <train flags>` (or `brigade train --backend torchrun`)"
        )
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (identity outside torch.distributed)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class TorchrunBackend:
    """Runs this rank's worker; gathers every rank's results."""

    stages_inputs = False  # run_step(then=...): every rank holds the batches itself

    def __init__(self, specs: list[WorkerSpec], cluster: ClusterConfig | None = None) -> None:
        """``cluster.transport``: "p2p" or "gloo" (``PipelineConfig`` has checked it)."""
        from .transport import P2PTransport, free_port

        cluster = cluster or ClusterConfig()
        timeout_s, transport = cluster.timeout_s, cluster.transport
        self.rank, self.world = init_torchrun()
        if self.world != len(specs):
            raise PipelineConfigError(
                f"torchrun started {self.world} processes for a pipeline of {len(specs)} "
                f"workers; use --nproc-per-node {len(specs)}"
            )
        self.timeout_s = timeout_s
        spec = specs[self.rank]
        spec.device = f"cuda:{self.rank % torch.cuda.device_count()}" \
            if torch.cuda.is_available() else "cpu"
        self.worker_stages = [sorted(s.modules) for s in specs]
        self.transport = None
        self.worker = build_worker(spec, send=self._send)
        # The stages' messages travel on a gloo group of their own (the default group
        # carries the all-gathers); rank 0 picks its port and tells the others.
        port = broadcast_object(free_port("") if self.rank == 0 else None)
        self.transport = P2PTransport(
            self.rank, self.world, os.environ.get("MASTER_ADDR", "127.0.0.1"), port,
            deliver=self.worker.deliver, device=spec.device,
            timeout_s=min(60.0, timeout_s), shared_memory=transport == "p2p",
        )
        self.pids = self._gather(os.getpid())

    def _send(self, dest: int, key: Any, payload: Any) -> None:
        self.transport.send(dest, key, payload)

    def _gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def run_step(
        self, training: bool, programs: list[list[Action]], messages: list[list[tuple]],
        mode: str = "run", keep: list[dict] | None = None, then: list | None = None,
    ) -> list[StepResult]:
        """Run this rank's program; a failure anywhere fails every rank, naming the stage.
        ``then`` (the next run's inputs) is ignored: every rank holds the batches itself."""
        error = None
        try:
            self.worker.begin(training, messages[self.rank], programs[self.rank], mode,
                              keep[self.rank] if keep else None)
            self.worker.run(programs[self.rank], self.timeout_s, self.transport.check)
            result: Any = self.worker.end()
        except Exception as err:  # noqa: BLE001 - reported to every rank below
            error = f"{type(err).__name__}: {err}"
            result = None
        gathered = self._gather((result, error))
        for rank, (_, err) in enumerate(gathered):
            if err is not None:
                raise StageFailedError(rank, self.worker_stages[rank], err)
        return [r for r, _ in gathered]

    def state_dicts(self) -> dict[int, dict]:
        mine = {s: {k: v.detach().cpu() for k, v in st.module.state_dict().items()}
                for s, st in self.worker.stages.items()}
        states: dict[int, dict] = {}
        for part in self._gather(mine):
            states.update(part)
        return states

    def load_state_dicts(self, states: dict[int, dict]) -> None:
        for s, st in self.worker.stages.items():
            st.module.load_state_dict(states[s])

    def checkpoint_state(self) -> dict[int, dict]:
        states: dict[int, dict] = {}
        for part in self._gather(self.worker.checkpoint_state()):
            states.update(part)
        return states

    def load_checkpoint_state(self, states: dict[int, dict]) -> None:
        self.worker.load_checkpoint_state({s: states[s] for s in self.worker.stages})

    def clock_offsets(self) -> list[float]:
        """Ranks on one host share CLOCK_MONOTONIC; across hosts offsets are not corrected
        (``engine/clock.measure_offset`` over the process group would do it; not built:
        nothing here has two hosts to test it on)."""
        return [0.0] * self.world

    def shutdown(self) -> None:
        if getattr(self, "transport", None) is not None:
            self.transport.close()
            self.transport = None
