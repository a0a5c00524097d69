"""The one-process backend: every worker in the driver's thread, interleaved by readiness.

Why: the same Worker code and action lists as the Ray backend, with no processes, for tests
and for laptops. Workers take turns; each runs actions while their messages are present,
and a full round with no progress is a deadlock in the schedule, reported with the stuck
actions.
"""

from __future__ import annotations

import os
from collections import deque

from brigade.schedulers import Action

from .errors import PipelineError
from .spec import WorkerSpec, build_worker
from .worker import StepResult, Worker

__all__ = ["LocalBackend"]


class LocalBackend:
    """Runs all workers in this process."""

    stages_inputs = False  # run_step(then=...): the next run's inputs are here already

    def __init__(self, specs: list[WorkerSpec]) -> None:
        self.pids = [os.getpid()] * len(specs)
        self.workers: list[Worker] = []
        for spec in specs:
            self.workers.append(build_worker(spec, send=self._deliver))

    def _deliver(self, dest: int, key, tensor) -> None:
        self.workers[dest].deliver(key, tensor)

    def run_step(
        self, training: bool, programs: list[list[Action]], messages: list[list[tuple]],
        mode: str = "run", keep: list[dict] | None = None, then: list | None = None,
    ) -> list[StepResult]:
        """Execute one step's action lists; returns each worker's result (``keep``: per
        worker, the actions after which to copy weights, see ``Worker.begin``). ``then``
        (the next run's inputs) is ignored: they are in this process already."""
        for w, (worker, msgs, program) in enumerate(zip(self.workers, messages, programs)):
            worker.begin(training, msgs, program, mode, keep[w] if keep else None)
        queues = [deque(p) for p in programs]
        while any(queues):
            progressed = False
            for worker, queue in zip(self.workers, queues):
                while queue and worker.ready(queue[0]):
                    worker.execute(queue.popleft())
                    progressed = True
            if not progressed:
                stuck = ", ".join(f"worker {w}: {q[0]}" for w, q in enumerate(queues) if q)
                raise PipelineError(f"deadlock: no worker can proceed ({stuck})")
        return [worker.end() for worker in self.workers]

    def state_dicts(self) -> dict[int, dict]:
        """Each stage's module state, by global stage index."""
        return {s: st.module.state_dict() for w in self.workers for s, st in w.stages.items()}

    def load_state_dicts(self, states: dict[int, dict]) -> None:
        for w in self.workers:
            for s, st in w.stages.items():
                st.module.load_state_dict(states[s])

    def checkpoint_state(self) -> dict[int, dict]:
        states: dict[int, dict] = {}
        for w in self.workers:
            states.update(w.checkpoint_state())
        return states

    def load_checkpoint_state(self, states: dict[int, dict]) -> None:
        for w in self.workers:
            w.load_checkpoint_state({s: states[s] for s in w.stages})

    def clock_offsets(self) -> list[float]:
        return [0.0] * len(self.workers)

    def shutdown(self) -> None:
        self.workers = []
