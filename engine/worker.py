"""A worker executes its action list from a schedule on the stages it holds.

One worker per process (a Ray actor, a torchrun rank) or several in one thread (the local
backend). Each action kind has a handler in a dispatch table; a handler takes the messages
the action needs from the worker's mailbox, calls the stage, and routes what it produces to
the worker that holds the next (or previous) stage. The worker also records the measured
timeline: every action's start and end, time spent waiting for a message, time spent sending.

Each action kind's handler, and the messages it waits for, come from the learning rule's
declaration (``MethodSpec.handlers``, see ``brigade.stages.handlers`` for the message keys):
the worker knows no rule, and of the letters only ``F`` (evaluation runs every rule's F;
a replayed step drops forwards whose backward is gone). It is the handlers' ``Port``: it hands them
messages, routes what they send, and records losses and outputs.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import torch

from brigade.schedulers import FORWARD_KINDS, Action
from brigade.stages.base import StageBase
from brigade.stages.handlers import BACKPROP_HANDLERS, Handler

from .errors import PipelineError
from .mailbox import Mailbox

__all__ = ["Worker", "StepResult", "Send", "MODES"]

# How a step runs (``Worker.begin``): "run" trains or evaluates; "record" is a run that also
# keeps the messages it took (after a snapshot of the training state); "replay" runs a
# program without waiting for any message, each one it needs stood in for by the recorded
# one of the same kind, stage and microbatch (modulo the recorded step's count); what it
# sends goes out for microbatch -1 - j, which the receiving worker drops (``deliver``); the
# snapshot is restored at its end. Record then replay is an in-place profile: every action timed where
# and as it runs, sends and receives paid as in a run, without waiting on anyone.
MODES = ("run", "record", "replay")

# Under ``autocast`` the forward kinds (the kinds table's FORWARD_KINDS: F, DNI's S) run in
# a torch.autocast region, as a one-process model's forward would; backward follows the
# dtypes autograd recorded (torch's advice: no backward inside the region).
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16}

# send(dest_worker, key, payload): hand a message (a tensor, or a tuple of tensors) on.
Send = Callable[[int, Hashable, Any], None]


@dataclass
class StepResult:
    """What one worker returns for one step."""

    worker: int
    losses: list[tuple[int, float]] = field(default_factory=list)  # (mb, weighted loss)
    outputs: dict[int, Any] = field(default_factory=dict)  # eval-mode logits per microbatch
    events: list[tuple] = field(default_factory=list)  # (worker, stage, kind, mb, t0, t1, cat)
    peak_stored_bytes: dict[int, int] = field(default_factory=dict)  # per stage
    # (step, stage, clock, module state): a stage's weights as a kept step left them
    kept: list[tuple[int, int, float, dict]] = field(default_factory=list)


class Worker:
    """Runs actions on a set of stages; plain Python, driven by any executor."""

    def __init__(
        self,
        index: int,
        stages: dict[int, StageBase],
        worker_of: list[int],
        send: Send | None = None,
        clock: Callable[[], float] = time.perf_counter,
        handlers: dict[str, Handler] | None = None,
        labels_to: frozenset[int] = frozenset(),
        autocast: str | None = None,
    ) -> None:
        self.index = index
        self.stages = stages
        self.worker_of = worker_of  # stage index -> worker index
        self.num_stages = len(worker_of)
        self.mailbox = Mailbox()
        self._send = send
        self._clock = clock
        self._labels_to = frozenset(labels_to)  # earlier stages the rule shows labels to
        self.training = True
        self._forward_only: set[tuple[int, int]] = set()
        self._result = StepResult(index)
        self._mode = "run"
        self._snapshot: dict[int, dict[str, Any]] | None = None
        self._recorded: dict[Hashable, Any] = {}
        self._keep: dict[Action, int] = {}
        # action kind -> handler: the rule's declaration (backprop's by default)
        self._handlers: dict[str, Handler] = dict(BACKPROP_HANDLERS if handlers is None
                                                  else handlers)
        self._autocast = _AUTOCAST_DTYPES[autocast] if autocast else None

    # -- the step protocol ----------------------------------------------------------------
    def begin(
        self,
        training: bool,
        messages: list[tuple[Hashable, Any]] = (),
        program: list[Action] = (),
        mode: str = "run",
        keep: dict[Action, int] | None = None,
    ) -> None:
        """Start a run: set train/eval mode, deliver its inputs and targets, and note which
        forwards have no backward in ``program`` (they keep no activations). ``mode``: see
        ``MODES``. ``keep`` maps an action to a step: after it, a copy of its stage's
        weights goes into the result as that step left them (:func:`keep_points`)."""
        if mode not in MODES:
            raise PipelineError(f"unknown step mode {mode!r}; modes are {', '.join(MODES)}")
        if mode == "record":
            # Not checkpoint_state(): a neighbour that began this step first may already
            # have delivered its messages for it; they are this step's, not state.
            self._snapshot = copy.deepcopy(self._training_state())
            self._recorded = {}
        elif mode == "replay":
            messages = list(messages) + self._stand_ins(messages, program)
        self._mode = mode
        self.training = training
        self._keep = dict(keep or {})
        self._result = StepResult(self.index)
        frees = {kind for kind, h in self._handlers.items() if h.frees}
        backward = {(a.stage, a.microbatch) for a in program if a.kind in frees}
        self._forward_only = {
            (a.stage, a.microbatch) for a in program
            if a.kind == "F" and (a.stage, a.microbatch) not in backward
        }
        for stage in self.stages.values():
            stage.module.train(training)
        for key, value in messages:
            self.mailbox.put(key, value)

    def deliver(self, key: tuple, value: Any) -> None:
        """A neighbour's message for this worker (what backends and transports call): into
        the mailbox, unless its microbatch is negative, a profile replay's (see ``MODES``),
        dropped whenever it arrives (a replay's message may outlive the replay)."""
        if key[-1] >= 0:
            self.mailbox.put(key, value)

    def end(self) -> StepResult:
        """Finish a step and hand back what it produced (after a replay, the training state
        is put back as the record step found it)."""
        if self._mode == "replay":
            self.mailbox.clear()
            self.load_checkpoint_state(self._snapshot)
            self._snapshot, self._recorded = None, {}
        self._mode = "run"
        result = self._result
        for s, stage in self.stages.items():
            result.peak_stored_bytes[s] = stage.peak_stored_bytes
            stage.pop_losses()  # the worker keeps its own (mb, loss) record
        return result

    def run(self, actions: list[Action], timeout: float | None = None,
            check: Callable[[], None] | None = None) -> None:
        """Execute ``actions`` in order, blocking on the mailbox where a message is due.

        ``check`` (a transport's) runs when the program stalls and after it ends: a receiver
        thread stopped by a lost peer or a failed delivery says more than the stall does.
        """
        try:
            self._run(actions, timeout)
        except PipelineError:
            if check is not None:
                check()
            raise
        if check is not None:
            check()

    def _run(self, actions: list[Action], timeout: float | None) -> None:
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
        handler = self._handler(action)
        events = self._result.events
        mark = len(events)
        t0 = self._clock()
        if self._autocast is not None and action.kind in FORWARD_KINDS:
            stage = self.stages[action.stage]
            with torch.autocast(torch.device(stage.device).type, dtype=self._autocast):
                handler.run(self, action)
        else:
            handler.run(self, action)
        t1 = self._clock()
        # A handler's sends come last (each recorded as its own "send" span): the compute
        # span ends where the first send starts, as the simulator's lowering charges them.
        end = events[mark][4] if len(events) > mark else t1
        events.insert(mark, (self.index, action.stage, action.kind, action.microbatch,
                             t0, end, "compute"))
        if self._keep and action in self._keep:  # most runs keep nothing: no hashing
            self._keep_weights(action, t1)

    def _keep_weights(self, action: Action, done: float) -> None:
        """A copy of ``action``'s stage's weights, stamped ``done`` (this worker's clock):
        when the kept step's work on the stage ended. The copy itself is the run's time."""
        state = {k: v.detach().to("cpu", copy=True)
                 for k, v in self.stages[action.stage].module.state_dict().items()}
        self._result.kept.append((self._keep[action], action.stage, done, state))

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[int, dict[str, Any]]:
        """Each stage's full training state, taken between runs (nothing is in flight)."""
        pending = self.mailbox.pending()
        if pending:
            raise PipelineError(f"worker {self.index}: cannot checkpoint with messages "
                                f"still queued ({pending[:4]}...)")
        return self._training_state()

    def _training_state(self) -> dict[int, dict[str, Any]]:
        """Each stage's weights, optimizer state and extras, and the RNG state."""
        rng = torch.get_rng_state()
        out = {}
        for s, stage in self.stages.items():
            opt = stage.optimizer
            out[s] = {
                "module": {k: v.detach().cpu() for k, v in stage.module.state_dict().items()},
                "optimizer": opt.state_dict() if opt is not None else None,
                "extra": stage.state_dict_extra(),
                "rng": rng,
            }
        return out

    def load_checkpoint_state(self, states: dict[int, dict[str, Any]]) -> None:
        """Restore what :meth:`checkpoint_state` returned."""
        for s, stage in self.stages.items():
            state = states[s]
            stage.module.load_state_dict(state["module"])
            if state["optimizer"] is not None and stage.optimizer is not None:
                stage.optimizer.load_state_dict(state["optimizer"])
            if state["extra"] is not None:
                stage.load_state_dict_extra(state["extra"])
            torch.set_rng_state(state["rng"])

    def _stand_ins(self, given: list[tuple[Hashable, Any]], program: list[Action]
                   ) -> list[tuple[Hashable, Any]]:
        """For a replay: every message ``program`` needs and ``given`` lacks, taken from the
        record step (microbatch j stands in for j + k * m, m the recorded microbatches)."""
        if self._snapshot is None:
            raise PipelineError(f"worker {self.index}: a replay needs a record step first")
        m = 1 + max((k[-1] for k in self._recorded), default=0)
        have = {k for k, _ in given}
        out = []
        for a in program:
            for key in self.needs(a):
                if key in have:
                    continue
                stand_in = (*key[:-1], key[-1] % m)
                if stand_in not in self._recorded:
                    raise PipelineError(
                        f"worker {self.index}: nothing recorded to stand in for {key} "
                        f"(recorded {sorted(self._recorded)[:6]}...); record a step of the "
                        "same schedule first")
                out.append((key, self._recorded[stand_in]))
                have.add(key)
        return out

    # -- the handlers' port ----------------------------------------------------------------
    def _handler(self, action: Action) -> Handler:
        handler = self._handlers.get(action.kind)
        if handler is None:
            raise PipelineError(
                f"worker {self.index}: no handler for action {action} (kind {action.kind!r}); "
                f"this worker's rule runs kinds {sorted(self._handlers)}"
            )
        return handler

    def needs(self, action: Action) -> list[Hashable]:
        """Message keys that must be present before ``action`` can run (its handler's)."""
        return self._handler(action).needs(self, action)

    def stage(self, s: int) -> StageBase:
        return self.stages[s]

    def take(self, key: Hashable) -> Any:
        """Take a message from the mailbox (keeping it when recording)."""
        value = self.mailbox.take(key)
        if self._mode == "record":
            self._recorded[key] = value
        return value

    def send(self, action: Action, key: tuple, value: Any) -> None:
        self._route(action, key, value)

    def loss(self, mb: int, value: float) -> None:
        self._result.losses.append((mb, value))

    def output(self, mb: int, value: Any) -> None:
        self._result.outputs[mb] = value

    def forward_only(self, s: int, mb: int) -> bool:
        return (s, mb) in self._forward_only

    def gets_labels(self, s: int) -> bool:
        return s in self._labels_to

    # -- routing and recording ----------------------------------------------------------------
    def _route(self, a: Action, key: tuple, tensor: Any) -> None:
        """Deliver to the worker holding the destination stage (this one: no copy)."""
        dest = self.worker_of[key[1]]
        if self._mode == "replay":  # sent, so both ends pay for it, but dropped on arrival
            if dest == self.index:
                return
            key = (*key[:-1], -1 - key[-1])
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
