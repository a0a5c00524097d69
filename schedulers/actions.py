"""Actions: the instructions a worker executes, printed and parsed as ``1F3``.

An action is ``(stage, kind, microbatch)``, the way torch.distributed.pipelining's
``_Action`` is: ``str(Action(1, "F", 3)) == "1F3"`` and ``Action.parse("1F3")`` gives it
back. ``stage`` is the global (virtual) stage index; ``microbatch`` is global across steps
(``step * m + j``), except for ``U`` whose field holds the index of the update.

Kinds (letters between the two numbers, so every text form parses one way)::

    F   forward of one microbatch through the stage
    B   full backward (input and weight gradients)
    I   backward for the input gradient only (zero-bubble split)
    W   backward for the weight gradient only (zero-bubble split)
    U   optimizer update; the number is the update index, not a microbatch
    S   DNI: forward, predict the synthetic gradient of the output, backward with it
        and update the stage's weights, all in one action
    T   DNI: train the synthetic-gradient module on the gradient that came back
    R   PETRA: reconstruct the input from the output, then backward
    D   forward gradients: add the scalars d = ∇L·v, which the last stage's F computed
        for this microbatch, to the step's coefficients (U forms Σ d·v); nothing but d
        travels backward
    SF RF   send / receive a forward activation (added by the lowering pass only)
    SB RB   send / receive a backward gradient (added by the lowering pass only)

What each kind means to the passes (what it waits for, what it costs, ...) is one record
in :mod:`.kinds`; a rule adds a kind with :func:`.kinds.register_action_kind`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ScheduleError
from .kinds import (BACKWARD_KINDS, COMM_KINDS, COMPUTE_KINDS, FORWARD_KINDS, KIND_NAMES,
                    KINDS)

__all__ = [
    "Action",
    "KINDS",
    "COMPUTE_KINDS",
    "COMM_KINDS",
    "FORWARD_KINDS",
    "BACKWARD_KINDS",
    "KIND_NAMES",
    "parse_actions",
]

_TEXT = re.compile(r"^\s*(\d+)([A-Z]{1,2})(\d+)\s*$")


@dataclass(frozen=True, repr=False)
class Action:
    """One instruction: run ``kind`` for ``microbatch`` on (virtual) ``stage``."""

    stage: int
    kind: str
    microbatch: int

    def __post_init__(self) -> None:
        if not isinstance(self.stage, int) or self.stage < 0:
            raise ScheduleError(f"action stage must be an integer >= 0, got {self.stage!r}")
        if not isinstance(self.microbatch, int) or self.microbatch < 0:
            raise ScheduleError(
                f"action microbatch must be an integer >= 0, got {self.microbatch!r}"
            )
        if self.kind not in KINDS:
            raise ScheduleError(
                f"unknown action kind {self.kind!r}; valid kinds: {', '.join(sorted(KINDS))}"
            )

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"

    __repr__ = __str__

    @classmethod
    def parse(cls, text: str) -> "Action":
        """Read the compact form ``"1F3"`` (stage, kind letters, microbatch)."""
        match = _TEXT.match(text) if isinstance(text, str) else None
        if match is None:
            raise ScheduleError(
                f"cannot read action {text!r}: write stage, kind, microbatch as in '1F3' "
                f"or '0SF2' (kinds: {', '.join(sorted(KINDS))})"
            )
        stage, kind, microbatch = match.groups()
        return cls(int(stage), kind, int(microbatch))

    @property
    def is_compute(self) -> bool:
        """Whether the action computes (as opposed to moving a message)."""
        return self.kind in COMPUTE_KINDS


def parse_actions(text: str) -> list[Action]:
    """Read a whitespace-separated list such as ``"0F0 0F1 0B0"``."""
    return [Action.parse(token) for token in text.split()]
