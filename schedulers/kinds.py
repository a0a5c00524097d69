"""The table of action kinds: everything the pure room knows about a letter such as ``F``.

One :class:`ActionKind` record per kind says, as data: its label, whether it is a forward
(may store activations) or backward work (an update waits for it), whether it frees the
activations its forward stored, what it waits for (:class:`Need` records that
:mod:`.deps` interprets), which per-stage cost the simulator charges it (:mod:`.costs`
fields, summed) and which one a measured span of it calibrates, the size of what it sends
backward, and its colour in pictures. :mod:`.actions`, :mod:`.deps`, :mod:`.validate`,
:mod:`.simulate`, :mod:`.calibrate`, :mod:`.timeline`, :mod:`.plot`, :mod:`.lowering` and
:mod:`.report` read this table, not letter tables of their own; ``KINDS``,
``COMPUTE_KINDS``, ``FORWARD_KINDS``, ``BACKWARD_KINDS`` and ``KIND_NAMES`` are live views
of it.

A learning rule that needs a kind of its own registers it from its own module with
:func:`register_action_kind`; every pass then knows it. What the table leaves room for:

- stages that receive a synthetic input instead of waiting for the forward pass: a forward
  kind whose ``needs`` omit the previous stage (``Need`` lists only what really arrives);
- split backwards (ZB-V, DualPipeV) already are ``I`` + ``W``; DualPipeV's overlapped
  forward-and-backward chunk is one more kind (needs of both, ``cost=("f", "b")``); the
  V-shaped placement is a fact of the schedule (its declaration and ``Schedule.worker_of``),
  not of a kind, and the ``prev``/``next`` stages a ``Need`` names stay model order;
- emulated-compute blocks change what a kind costs, not its rules: costs per stage;
- per-token losses count tokens, not samples: ``Costs.microbatch_size`` is the unit of
  throughput, and no kind depends on it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Set
from dataclasses import dataclass
from typing import Callable

from .errors import ScheduleError
from .live import LiveSet

__all__ = [
    "ActionKind",
    "Need",
    "register_action_kind",
    "unregister_action_kind",
    "kind_of",
    "kinds",
    "message_kinds",
    "KINDS",
    "COMPUTE_KINDS",
    "COMM_KINDS",
    "FORWARD_KINDS",
    "BACKWARD_KINDS",
    "FREEING_KINDS",
    "KIND_NAMES",
    "STAGES",
    "CATEGORIES",
]

# Which stage a Need points at, relative to the waiting action's stage s (model order).
STAGES = ("self", "prev", "next", "last")
# What an action is, on a timeline: computing, or moving a message (lowered schedules).
CATEGORIES = ("compute", "send", "recv")
# Cost fields a kind may be charged (per stage; see costs.Costs).
_COST_FIELDS = ("f", "b", "i", "w", "u", "sg", "r")
_CODE = re.compile(r"^[A-Z]{1,2}$")


@dataclass(frozen=True)
class Need:
    """One thing an action ``(s, kind, j)`` waits for: the action of the first of ``kinds``
    that the schedule has (else the first) on stage ``on`` (relative to s) for the same j.

    ``when`` / ``unless``: the need holds only if the schedule has / lacks ``(s, when, j)``.
    ``other``: skip it when ``on`` is s itself. ``group="update"``: instead, every action
    of ``kinds`` (empty: every backward kind) on s whose microbatch the update applies.
    A need whose stage does not exist (before the first, after the last) is dropped.
    """

    on: str
    kinds: tuple[str, ...] = ()
    when: str | None = None
    unless: str | None = None
    other: bool = False
    group: str | None = None

    def __post_init__(self) -> None:
        if self.on not in STAGES:
            raise ScheduleError(f"Need.on {self.on!r} is not one of {', '.join(STAGES)}")
        if self.group not in (None, "update"):
            raise ScheduleError(f"Need.group {self.group!r} must be None or 'update'")
        if not self.kinds and self.group is None:
            raise ScheduleError("a Need names at least one kind (or group='update')")


@dataclass(frozen=True)
class ActionKind:
    """What one kind of action is, to every pass of the pure room (see the module doc)."""

    code: str
    label: str
    rule: str  # why it waits for what it waits for; errors quote it
    needs: tuple[Need, ...] = ()
    category: str = "compute"
    forward: bool = False   # runs a microbatch forward through the stage
    backward: bool = False  # backward work of a microbatch: an update waits for it
    frees: bool = False     # ends the hold on the activations its forward stored
    family: str = ""        # backward work all-or-none per step; one family = alternatives
    partner: str = ""       # a kind that must run for the same (stage, microbatch)
    cost: tuple[str, ...] = ()     # Costs fields the simulator charges it, summed
    measured_as: str | None = None  # the Costs field a measured span of it calibrates
    grad_size: float = 1.0  # what it sends backward, in activations of the receiver's output
    colour: str = "#888888"
    index: str = "microbatch"  # or "update": what the action's number counts
    not_on_last: str = ""   # why the last stage may not run it (empty: it may)
    direction: str = ""     # messages: "forward" or "backward"
    glyph: str = ""         # the character of a to-scale text timeline

    def __post_init__(self) -> None:
        if not isinstance(self.code, str) or not _CODE.match(self.code):
            raise ScheduleError(f"action kind code {self.code!r} must be 1 or 2 capital "
                                "letters (it is read between two numbers, as in '1F3')")
        if self.category not in CATEGORIES:
            raise ScheduleError(f"kind {self.code}: category {self.category!r} is not one of "
                                f"{', '.join(CATEGORIES)}")
        bad = [c for c in self.cost + ((self.measured_as,) if self.measured_as else ())
               if c not in _COST_FIELDS]
        if bad:
            raise ScheduleError(f"kind {self.code}: unknown cost field {bad[0]!r}; cost "
                                f"fields: {', '.join(_COST_FIELDS)}")
        if self.index not in ("microbatch", "update"):
            raise ScheduleError(f"kind {self.code}: index must be 'microbatch' or 'update'")
        if self.category != "compute" and self.direction not in ("forward", "backward"):
            raise ScheduleError(f"message kind {self.code} needs direction 'forward' or "
                                "'backward'")
        if not self.glyph:
            object.__setattr__(self, "glyph", self.code[0])
        if not self.family and self.backward:
            object.__setattr__(self, "family", self.code)

    @property
    def is_compute(self) -> bool:
        return self.category == "compute"


_TABLE: dict[str, ActionKind] = {}


def register_action_kind(kind: ActionKind, replace: bool = False) -> ActionKind:
    """Add ``kind`` to the table (a rule's own module calls this at import); every pass
    reads it from then on. Registering a code twice is an error unless ``replace``."""
    if not isinstance(kind, ActionKind):
        raise ScheduleError(f"register_action_kind takes an ActionKind, got {kind!r}")
    if kind.code in _TABLE and not replace:
        raise ScheduleError(f"action kind {kind.code!r} is already registered "
                            f"({_TABLE[kind.code].label}); pass replace=True to redefine it")
    for need in kind.needs:
        unknown = [k for k in need.kinds if k not in _TABLE and k != kind.code]
        if unknown:
            raise ScheduleError(f"kind {kind.code} waits for unknown kind {unknown[0]!r}; "
                                f"known kinds: {', '.join(_TABLE)}")
    _TABLE[kind.code] = kind
    return kind


def unregister_action_kind(code: str) -> None:
    """Remove a kind registered by :func:`register_action_kind` (tests, reloads)."""
    if code not in _TABLE:
        raise ScheduleError(f"no action kind {code!r} is registered")
    del _TABLE[code]


def kind_of(code: str) -> ActionKind:
    """The record of ``code``; an unknown code lists the valid ones."""
    try:
        return _TABLE[code]
    except (KeyError, TypeError):
        raise ScheduleError(f"unknown action kind {code!r}; valid kinds: "
                            f"{', '.join(sorted(_TABLE))}") from None


def kinds() -> list[ActionKind]:
    """Every registered kind, in table order."""
    return list(_TABLE.values())


def message_kinds(forward: bool) -> tuple[str, str]:
    """(send, receive) kinds of a message going forward (activations) or backward."""
    direction = "forward" if forward else "backward"
    found = {k.category: k.code for k in _TABLE.values()
             if k.category != "compute" and k.direction == direction}
    return found["send"], found["recv"]


class _Names(Mapping):
    """A live ``code -> label`` mapping of the table."""

    def __getitem__(self, code: str) -> str:
        if code not in _TABLE:
            raise KeyError(code)
        return _TABLE[code].label

    def __iter__(self) -> Iterator[str]:
        return iter(list(_TABLE))

    def __len__(self) -> int:
        return len(_TABLE)


def _kinds(keep: Callable[[ActionKind], bool]) -> Set:
    """The codes of the kinds ``keep`` accepts, live (a kind registered later is in it)."""
    return LiveSet(lambda: _TABLE, keep)


KINDS: Set = _kinds(lambda k: True)
COMPUTE_KINDS: Set = _kinds(lambda k: k.is_compute)
COMM_KINDS: Set = _kinds(lambda k: not k.is_compute)
FORWARD_KINDS: Set = _kinds(lambda k: k.forward)
BACKWARD_KINDS: Set = _kinds(lambda k: k.backward)
FREEING_KINDS: Set = _kinds(lambda k: k.frees)
KIND_NAMES: Mapping = _Names()


# -- the built-in kinds ------------------------------------------------------------------------
def _builtins() -> list[ActionKind]:
    """Backprop (F B I W U), DNI (S T), PETRA (R), forward gradients (D), and messages."""
    backward_of_next = Need("next", ("B", "I"))
    return [
        ActionKind("F", "forward", "a forward needs the previous stage's forward of the same "
                   "microbatch", (Need("prev", ("F",)),), forward=True, cost=("f",),
                   measured_as="f", grad_size=0.0, colour="#4878CF"),
        ActionKind("B", "backward", "a backward needs its own forward and the next stage's "
                   "backward of the same microbatch", (Need("self", ("F",)), backward_of_next),
                   backward=True, frees=True, family="BI", cost=("b",), measured_as="b",
                   colour="#EE8434"),
        ActionKind("I", "backward (input)", "a backward needs its own forward and the next "
                   "stage's backward of the same microbatch",
                   (Need("self", ("F",)), backward_of_next), backward=True, frees=True,
                   family="BI", partner="W", cost=("i",), measured_as="i", colour="#D65F5F"),
        ActionKind("W", "backward (weights)", "a weight-gradient backward needs the "
                   "input-gradient backward (I) of its microbatch", (Need("self", ("I",)),),
                   backward=True, frees=True, partner="I", cost=("w",), measured_as="w",
                   colour="#F2C14E"),
        ActionKind("U", "update", "an update needs all of its stage's backward work of the "
                   "microbatches it applies", (Need("self", group="update"),), cost=("u",),
                   measured_as="u", colour="#2B2B2B", index="update"),
        ActionKind("S", "forward + synthetic-gradient update (DNI)", "a DNI forward needs the "
                   "previous stage's forward of the same microbatch", (Need("prev", ("S",)),),
                   forward=True, cost=("f", "b", "u"), measured_as="f", colour="#3AA67A"),
        ActionKind("T", "train synthetic-gradient module (DNI)", "training the "
                   "synthetic-gradient module needs the gradient that the next stage's "
                   "forward (S) returns", (Need("self", ("S",)), Need("next", ("S",))),
                   backward=True, cost=("sg",), measured_as="sg", colour="#9B6FC3",
                   not_on_last="the last stage computes the true gradient and has no "
                   "synthetic-gradient module to train; drop its T actions"),
        ActionKind("R", "reconstruct + backward (PETRA)", "a PETRA backward needs its own "
                   "forward and the next stage's reconstruction (R)",
                   (Need("self", ("F",)), Need("next", ("R",))), backward=True, frees=True,
                   cost=("r", "b"), measured_as="b", grad_size=2.0, colour="#20A3B5"),
        ActionKind("D", "add d = ∇L·v to the step's coefficients (forward gradients)",
                   "folding d = ∇L·v into a stage's gradient needs the last stage's forward "
                   "of the same microbatch, which computes d (forward gradients)",
                   (Need("last", ("F",)),), backward=True, colour="#C4507A"),
        ActionKind("SF", "send activation", "a send needs the forward that produced the "
                   "activation", (Need("self", ("F", "S")),), category="send",
                   direction="forward", colour="#B8B8B8", glyph=">"),
        ActionKind("RF", "receive activation", "a receive needs the previous stage's send",
                   (Need("prev", ("SF",)),), category="recv", direction="forward",
                   colour="#D9D9D9", glyph="<"),
        ActionKind("SB", "send gradient", "a send needs the backward that produced the "
                   "gradient", (Need("self", ("B", "I", "R", "S", "F")),), category="send",
                   direction="backward", colour="#B8B8B8", glyph=">"),
        # d of forward gradients comes from the last stage directly, to every stage
        ActionKind("RB", "receive gradient", "a receive needs the next stage's send",
                   (Need("last", ("SB",), when="D", other=True),
                    Need("next", ("SB",), unless="D")), category="recv",
                   direction="backward", colour="#D9D9D9", glyph="<"),
    ]


for _kind in _builtins():  # checked as a whole: B waits for I, defined after it
    _TABLE[_kind.code] = _kind
del _kind
