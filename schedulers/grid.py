"""The text grid of a schedule: one row per worker, each action in its unit-time slot.

Every action takes one slot and messages are free, so the rows form the staircase that
torchgpipe draws in its ``clock_cycles`` comment::

    w0 | 0F0 0F1 0F2 0F3                 0B0 0B1 0B2 0B3 0U0
    w1 |     1F0 1F1 1F2 1F3         1B0 1B1 1B2 1B3 1U0
    w2 |         2F0 2F1 2F2 2F3 2B0 2B1 2B2 2B3 2U0

Marked actions (errors) get a caret line and ``<-- ERROR HERE``, as in
torch.distributed.pipelining. If the schedule deadlocks, the actions that never started
follow a blank gap column, in program order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Mapping

from .actions import Action
from .dataflow import run_in_order

if TYPE_CHECKING:  # pragma: no cover
    from .schedule import Schedule

__all__ = ["render_grid", "slots"]


def slots(schedule: "Schedule") -> tuple[dict[tuple[int, int], int], bool]:
    """Slot of every (worker, index) under unit times; and whether the run deadlocked."""
    run = run_in_order(schedule)
    placed: dict[tuple[int, int], int] = {}
    for w, row in enumerate(schedule.workers):
        for i, a in enumerate(row[: run.position[w]]):
            placed[(w, i)] = int(run.start[a])
    if not run.deadlocked:
        return placed, False
    base = int(max(run.end.values(), default=0.0)) + 1
    for w, row in enumerate(schedule.workers):
        for k, i in enumerate(range(run.position[w], len(row))):
            placed[(w, i)] = base + k
    return placed, True


def render_grid(
    schedule: "Schedule",
    marks: Mapping[Action, str] | Iterable[Action] | None = None,
    width: int | None = None,
) -> str:
    """The grid as text; ``marks`` flags actions, ``width`` wraps long rows into blocks."""
    marks = dict(marks) if isinstance(marks, Mapping) else {a: "" for a in (marks or ())}
    placed, deadlocked = slots(schedule)
    cell = max((len(str(a)) for _, a in schedule), default=3)
    ncols = max(placed.values(), default=-1) + 1
    label = len(f"w{schedule.num_workers - 1}")
    per_block = ncols
    if width is not None:
        per_block = max(1, (width - label - 3) // (cell + 1))
    blocks = []
    for first in range(0, max(ncols, 1), max(per_block, 1)):
        cols = range(first, min(first + per_block, ncols))
        header = [f"slots {cols.start}-{cols.stop - 1}:"] if per_block < ncols else []
        blocks.append("\n".join(header + _block(schedule, placed, cols, cell, label, marks)))
    text = "\n\n".join(blocks)
    if deadlocked:
        text += "\n(right of the blank gap: actions that never started)"
    return text


def _block(schedule, placed, cols, cell, label, marks) -> list[str]:
    """Rows (and caret lines under marked actions) for the slots in ``cols``."""
    lines = []
    for w, row in enumerate(schedule.workers):
        cells = [" " * cell] * len(cols)
        carets = [" " * cell] * len(cols)
        flagged = []
        for i, a in enumerate(row):
            slot = placed[(w, i)]
            if slot in cols:
                cells[slot - cols.start] = str(a).rjust(cell)
                if a in marks:
                    carets[slot - cols.start] = ("^" * len(str(a))).rjust(cell)
                    flagged.append(a)
        prefix = f"w{w}".ljust(label) + " | "
        line = (prefix + " ".join(cells)).rstrip()
        if flagged:
            notes = "; ".join(f"{a}: {marks[a]}" if marks[a] else str(a) for a in flagged)
            lines.append(f"{line}  <-- ERROR HERE ({notes})")
            lines.append((" " * len(prefix) + " ".join(carets)).rstrip())
        else:
            lines.append(line)
    return lines
