"""Dependencies: what each action waits for. The validator, the simulator and the engine
all use these rules, so a schedule that validates runs the way it simulates.

Backprop (gpipe, 1f1b, interleaved, zb1p, stale)::

    sFj      needs (s-1)Fj
    sBj, sIj need  sFj and (s+1)Bj or (s+1)Ij   (the last stage: only its own sFj)
    sWj      needs sIj
    sUt      needs every B/I/W/R/T of stage s whose microbatch update t applies
             (none in stale's forward-only steps: that update reuses the last gradient)

DNI::

    sSj      needs (s-1)Sj          (forward, synthetic backward and update in one)
    sTj      needs sSj and (s+1)Sj  (stage s+1's S returns the gradient wrt s's output)

PETRA::

    sFj      needs (s-1)Fj
    sRj      needs sFj and (s+1)Rj  (the last stage: only its own sFj)

Forward gradients (fwdgrad)::

    sFj      needs (s-1)Fj          (the activation and its tangent)
    sDj      needs (p-1)Fj          (the last stage's forward computes d = ∇L·v of j and
                                     sends it to every stage at once, not stage by stage)
    sUt      needs every sDj of step t

Lowered schedules (with send/receive actions) route every edge between workers through
them: ``sSFj`` needs the stage's forward of j, ``sRFj`` needs ``(s-1)SFj``; ``sSBj`` needs
the stage's backward of j (B, I, R or DNI's S; fwdgrad's last stage: its F), ``sRBj``
needs ``(s+1)SBj`` (before a D: the last stage's ``SBj``, one send that reaches every
stage); and a compute action whose producer sits on another worker waits for its receive
instead.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

from .actions import BACKWARD_KINDS, COMM_KINDS, Action

if TYPE_CHECKING:  # pragma: no cover
    from .schedule import Schedule

__all__ = ["Dependencies", "RULES"]

# Why each kind waits for what it waits for; error messages quote these.
RULES: dict[str, str] = {
    "F": "a forward needs the previous stage's forward of the same microbatch",
    "B": "a backward needs its own forward and the next stage's backward of the same microbatch",
    "I": "a backward needs its own forward and the next stage's backward of the same microbatch",
    "W": "a weight-gradient backward needs the input-gradient backward (I) of its microbatch",
    "U": "an update needs all of its stage's backward work of the microbatches it applies",
    "S": "a DNI forward needs the previous stage's forward of the same microbatch",
    "T": "training the synthetic-gradient module needs the gradient that the next stage's "
         "forward (S) returns",
    "R": "a PETRA backward needs its own forward and the next stage's reconstruction (R)",
    "D": "folding d = ∇L·v into a stage's gradient needs the last stage's forward of the "
         "same microbatch, which computes d (forward gradients)",
    "SF": "a send needs the forward that produced the activation",
    "RF": "a receive needs the previous stage's send",
    "SB": "a send needs the backward that produced the gradient",
    "RB": "a receive needs the next stage's send",
}


class Dependencies:
    """The dependency rules applied to one schedule (which actions exist decides, e.g.,
    whether the next stage's backward is a ``B`` or an ``I``)."""

    def __init__(self, schedule: "Schedule") -> None:
        self.schedule = schedule
        self.present: set[Action] = {a for _, a in schedule}
        self.lowered = any(a.kind in COMM_KINDS for a in self.present)
        self._backward_of: dict[int, list[Action]] = defaultdict(list)
        for a in self.present:
            if a.kind in BACKWARD_KINDS:
                self._backward_of[a.stage].append(a)
        self._cache: dict[Action, tuple[Action, ...]] = {}

    def of(self, action: Action) -> tuple[Action, ...]:
        """The actions ``action`` waits for (cached)."""
        found = self._cache.get(action)
        if found is None:
            found = tuple(self._route(action, d) for d in self._base(action))
            self._cache[action] = found
        return found

    def rule(self, action: Action) -> str:
        """Why ``action`` waits for what it waits for, in words."""
        return RULES[action.kind]

    def crosses(self, dep: Action, action: Action) -> bool:
        """Whether the edge dep -> action goes between two workers (a message)."""
        s = self.schedule
        return s.worker_of(dep.stage) != s.worker_of(action.stage)

    # -- the rules -------------------------------------------------------------------------
    def _first(self, stage: int, kinds: str, j: int) -> Action:
        """The first of ``kinds`` that exists for (stage, j); the first kind if none does."""
        for kind in kinds.split():
            a = Action(stage, kind, j)
            if a in self.present:
                return a
        return Action(stage, kinds.split()[0], j)

    def _base(self, a: Action) -> list[Action]:
        """The rules of the module docstring, before routing through receives."""
        s, k, j = a.stage, a.kind, a.microbatch
        last = s == self.schedule.num_stages - 1
        if k in ("F", "S"):
            return [Action(s - 1, k, j)] if s > 0 else []
        if k in ("B", "I"):
            return [Action(s, "F", j)] + ([] if last else [self._first(s + 1, "B I", j)])
        if k == "W":
            return [Action(s, "I", j)]
        if k == "R":
            return [Action(s, "F", j)] + ([] if last else [Action(s + 1, "R", j)])
        if k == "T":
            return [Action(s, "S", j)] + ([] if last else [Action(s + 1, "S", j)])
        if k == "D":
            return [Action(self.schedule.num_stages - 1, "F", j)]
        if k == "U":
            group = self.schedule.update_microbatches(j)
            found = [b for b in self._backward_of.get(s, ()) if b.microbatch in group]
            return sorted(found, key=lambda b: (b.microbatch, b.kind))
        return self._comm(a)

    def _comm(self, a: Action) -> list[Action]:
        """Sends follow their producer; receives follow the neighbour's send."""
        s, k, j = a.stage, a.kind, a.microbatch
        if k == "SF":
            return [self._first(s, "F S", j)]
        if k == "SB":
            return [self._first(s, "B I R S F", j)]
        if k == "RF":
            return [Action(s - 1, "SF", j)] if s > 0 else []
        last = self.schedule.num_stages - 1
        if Action(s, "D", j) in self.present:  # d comes from the last stage directly
            return [Action(last, "SB", j)] if s < last else []
        return [Action(s + 1, "SB", j)] if s < last else []

    def _route(self, a: Action, dep: Action) -> Action:
        """In a lowered schedule, wait for the receive rather than the remote producer."""
        if not self.lowered or a.kind in COMM_KINDS or not self._valid(dep):
            return dep
        if not self.crosses(dep, a):
            return dep
        kind = "RF" if dep.stage < a.stage else "RB"
        recv = Action(a.stage, kind, a.microbatch)
        return recv if recv in self.present else dep

    def _valid(self, dep: Action) -> bool:
        return 0 <= dep.stage < self.schedule.num_stages
