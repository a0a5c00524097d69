"""A worker executes its action list from a schedule on the stages it holds.

One worker per process (a Ray actor, a torchrun rank) or several in one thread (the local
backend). Each action kind has a handler in a dispatch table; a handler takes the messages
the action needs from the worker's mailbox, calls the stage, and routes what it produces to
the worker that holds the next (or previous) stage. The worker also records the measured
timeline: every action's start and end, time spent waiting for a message, time spent sending.

Message keys: ``("x", s, j)`` the input of stage s for microbatch j, ``("g", s, j)`` the
gradient of stage s's output, ``("y", j)`` the target and loss weight of microbatch j.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import torch

from brigade.schedulers import Action

from .errors import PipelineError
from .mailbox import Mailbox

__all__ = ["Worker", "StepResult", "Send"]

# send(dest_worker, key, tensor): hand a message to another worker (or to this one).
Send = Callable[[int, Hashable, torch.Tensor], None]


@dataclass
class StepResult:
    """What one worker returns for one step."""

    worker: int
    losses: list[float] = field(default_factory=list)  # scaled losses (last stage only)
    outputs: dict[int, Any] = field(default_factory=dict)  # eval-mode logits per microbatch
    events: list[tuple] = field(default_factory=list)  # (worker, stage, kind, mb, t0, t1, cat)
    peak_stored_bytes: dict[int, int] = field(default_factory=dict)  # per stage


class Worker:
    """Runs actions on a set of stages; plain Python, driven by any executor."""

    def __init__(
        self,
        index: int,
        stages: dict[int, Any],
        worker_of: list[int],
        send: Send | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.index = index
        self.stages = stages
        self.worker_of = worker_of  # stage index -> worker index
        self.num_stages = len(worker_of)
        self.mailbox = Mailbox()
        self._send = send
        self._clock = clock
        self._training = True
        self._result = StepResult(index)
        self._handlers: dict[str, Callable[[Action], None]] = {
            "F": self._forward,
            "B": self._backward,
            "I": self._backward_input,
            "W": self._backward_weight,
            "U": self._update,
        }

    # -- the step protocol ----------------------------------------------------------------
    def begin(self, training: bool, messages: list[tuple[Hashable, Any]] = ()) -> None:
        """Start a step: set train/eval mode and deliver the step's inputs and targets."""
        self._training = training
        self._result = StepResult(self.index)
        for stage in self.stages.values():
            stage.module.train(training)
        for key, value in messages:
            self.mailbox.put(key, value)

    def end(self) -> StepResult:
        """Finish a step and hand back what it produced."""
        result = self._result
        for s, stage in self.stages.items():
            result.peak_stored_bytes[s] = getattr(stage, "peak_stored_bytes", 0)
            if hasattr(stage, "pop_losses"):
                result.losses.extend(stage.pop_losses())
        return result

    def run(self, actions: list[Action], timeout: float | None = None) -> None:
        """Execute ``actions`` in order, blocking on the mailbox where a message is due."""
        for action in actions:
            keys = self.needs(action)
            if keys and not self.mailbox.has(keys):
                t0 = self._clock()
                if not self.mailbox.wait(keys, timeout):
                    raise PipelineError(
                        f"worker {self.index}: waited {timeout:.0f} s for {keys} "
                        f"to run {action}; a neighbouring stage is stuck or gone"
                    )
                self._record(action, t0, self._clock(), "wait")
            self.execute(action)

    def ready(self, action: Action) -> bool:
        """Whether every message ``action`` needs has arrived."""
        return self.mailbox.has(self.needs(action))

    def execute(self, action: Action) -> None:
        """Run one action through the dispatch table and record its span."""
        handler = self._handlers.get(action.kind)
        if handler is None:
            raise PipelineError(
                f"worker {self.index}: no handler for action {action} (kind {action.kind!r}); "
                f"this worker runs kinds {sorted(self._handlers)}"
            )
        t0 = self._clock()
        handler(action)
        self._record(action, t0, self._clock(), "compute")

    # -- which messages an action consumes ------------------------------------------------
    def needs(self, action: Action) -> list[Hashable]:
        """Message keys that must be present before ``action`` can run."""
        s, j = action.stage, action.microbatch
        if action.kind == "F":
            keys: list[Hashable] = [("x", s, j)]
            if s == self.num_stages - 1:
                keys.append(("y", j))
            return keys
        if action.kind in ("B", "I") and s != self.num_stages - 1:
            return [("g", s, j)]
        return []

    # -- handlers ---------------------------------------------------------------------------
    def _forward(self, a: Action) -> None:
        stage = self.stages[a.stage]
        x = self.mailbox.take(("x", a.stage, a.microbatch))
        last = a.stage == self.num_stages - 1
        if not self._training:
            out = stage.infer(x)
            if last:
                self.mailbox.take(("y", a.microbatch))
                self._result.outputs[a.microbatch] = out
            else:
                self._route(a, ("x", a.stage + 1, a.microbatch), out)
            return
        if last:
            target, weight = self.mailbox.take(("y", a.microbatch))
            stage.forward(a.microbatch, x, target, weight)
        else:
            out = stage.forward(a.microbatch, x)
            self._route(a, ("x", a.stage + 1, a.microbatch), out)

    def _backward(self, a: Action) -> None:
        grad = self._take_grad(a)
        grad_in = self.stages[a.stage].backward(a.microbatch, grad)
        if a.stage > 0:
            self._route(a, ("g", a.stage - 1, a.microbatch), grad_in)

    def _backward_input(self, a: Action) -> None:
        grad = self._take_grad(a)
        grad_in = self.stages[a.stage].backward_input(a.microbatch, grad)
        if a.stage > 0:
            self._route(a, ("g", a.stage - 1, a.microbatch), grad_in)

    def _backward_weight(self, a: Action) -> None:
        self.stages[a.stage].backward_weight(a.microbatch)

    def _update(self, a: Action) -> None:
        self.stages[a.stage].update()

    def _take_grad(self, a: Action) -> torch.Tensor | None:
        if a.stage == self.num_stages - 1:
            return None
        return self.mailbox.take(("g", a.stage, a.microbatch))

    # -- routing and recording ----------------------------------------------------------------
    def _route(self, a: Action, key: tuple, tensor: torch.Tensor) -> None:
        """Deliver to the worker holding the destination stage (this one: no copy)."""
        dest = self.worker_of[key[1]]
        if dest == self.index or self._send is None:
            self.mailbox.put(key, tensor)
            return
        t0 = self._clock()
        self._send(dest, key, tensor)
        self._record(a, t0, self._clock(), "send")

    def _record(self, a: Action, t0: float, t1: float, category: str) -> None:
        self._result.events.append(
            (self.index, a.stage, a.kind, a.microbatch, t0, t1, category)
        )
