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

The rules are data: each kind's ``needs`` in :mod:`.kinds`, which this module interprets.
Lowered schedules (with send/receive actions) route every edge between workers through
them: ``sSFj`` needs the stage's forward of j, ``sRFj`` needs ``(s-1)SFj``; ``sSBj`` needs
the stage's backward of j (B, I, R or DNI's S; fwdgrad's last stage: its F), ``sRBj``
needs ``(s+1)SBj`` (before a D: the last stage's ``SBj``, one send that reaches every
stage); and a compute action whose producer sits on another worker waits for its receive
instead.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import TYPE_CHECKING

from .actions import Action
from .kinds import BACKWARD_KINDS, COMM_KINDS, KIND_NAMES, Need, kind_of, message_kinds

if TYPE_CHECKING:  # pragma: no cover
    from .schedule import Schedule

__all__ = ["Dependencies", "RULES"]


class _Rules(Mapping):
    """Why each kind waits for what it waits for (the table's ``rule``); errors quote it."""

    def __getitem__(self, code: str) -> str:
        if code not in KIND_NAMES:
            raise KeyError(code)
        return kind_of(code).rule

    def __iter__(self):
        return iter(KIND_NAMES)

    def __len__(self) -> int:
        return len(KIND_NAMES)


RULES: Mapping[str, str] = _Rules()


class Dependencies:
    """The dependency rules applied to one schedule (which actions exist decides, e.g.,
    whether the next stage's backward is a ``B`` or an ``I``). The rules are the kinds'
    :class:`~.kinds.Need` records; this class interprets them."""

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
        return kind_of(action.kind).rule

    def crosses(self, dep: Action, action: Action) -> bool:
        """Whether the edge dep -> action goes between two workers (a message)."""
        s = self.schedule
        return s.worker_of(dep.stage) != s.worker_of(action.stage)

    # -- the rules -------------------------------------------------------------------------
    def _first(self, stage: int, kinds: tuple[str, ...], j: int) -> Action:
        """The first of ``kinds`` that exists for (stage, j); the first kind if none does."""
        for kind in kinds:
            a = Action(stage, kind, j)
            if a in self.present:
                return a
        return Action(stage, kinds[0], j)

    def _stage(self, on: str, s: int) -> int:
        """The stage a Need names, relative to stage s."""
        return {"self": s, "prev": s - 1, "next": s + 1,
                "last": self.schedule.num_stages - 1}[on]

    def _base(self, a: Action) -> list[Action]:
        """The kind's needs (module docstring), before routing through receives."""
        out: list[Action] = []
        for need in kind_of(a.kind).needs:
            out += self._apply(need, a)
        return out

    def _apply(self, need: Need, a: Action) -> list[Action]:
        """What one Need of ``a`` resolves to (nothing where it does not apply)."""
        s, j = a.stage, a.microbatch
        if need.when is not None and Action(s, need.when, j) not in self.present:
            return []
        if need.unless is not None and Action(s, need.unless, j) in self.present:
            return []
        stage = self._stage(need.on, s)
        if not 0 <= stage < self.schedule.num_stages or (need.other and stage == s):
            return []
        if need.group == "update":
            group = self.schedule.update_microbatches(j)
            found = [b for b in self._backward_of.get(stage, ()) if b.microbatch in group
                     and (not need.kinds or b.kind in need.kinds)]
            return sorted(found, key=lambda b: (b.microbatch, b.kind))
        return [self._first(stage, need.kinds, j)]

    def _route(self, a: Action, dep: Action) -> Action:
        """In a lowered schedule, wait for the receive rather than the remote producer."""
        if not self.lowered or a.kind in COMM_KINDS or not self._valid(dep):
            return dep
        if not self.crosses(dep, a):
            return dep
        recv = Action(a.stage, message_kinds(forward=dep.stage < a.stage)[1], a.microbatch)
        return recv if recv in self.present else dep

    def _valid(self, dep: Action) -> bool:
        return 0 <= dep.stage < self.schedule.num_stages
