"""In-order execution of a schedule under its dependencies: the core of the simulator,
of the unit-time grid and of the deadlock check.

Each worker runs its list in order; an action starts when its worker is free and every
action it waits for has finished (plus the delay of the edge). With no contention for
links, start times are a longest-path computation, so the order in which workers are
advanced here does not change the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from .actions import Action
from .deps import Dependencies

if TYPE_CHECKING:  # pragma: no cover
    from .schedule import Schedule

__all__ = ["Run", "run_in_order"]


@dataclass
class Run:
    """Start and end of every action that ran; for a deadlock, where each worker stuck."""

    start: dict[Action, float] = field(default_factory=dict)
    end: dict[Action, float] = field(default_factory=dict)
    # worker -> index in its list of the first action that never ran
    position: list[int] = field(default_factory=list)
    # worker -> (stuck action, the dependencies it never got)
    stuck: dict[int, tuple[Action, list[Action]]] = field(default_factory=dict)

    @property
    def deadlocked(self) -> bool:
        return bool(self.stuck)


def run_in_order(
    schedule: "Schedule",
    duration: Callable[[Action], float] = lambda a: 1.0,
    delay: Callable[[Action, Action], float] = lambda dep, a: 0.0,
    deps: Dependencies | None = None,
) -> Run:
    """Execute every worker's list in order; ``delay(dep, a)`` is the edge's message time."""
    deps = deps or Dependencies(schedule)
    lists = schedule.workers
    run = Run(position=[0] * len(lists))
    free = [0.0] * len(lists)
    waiting: dict[Action, set[int]] = {}
    todo = list(range(len(lists)))
    while todo:
        w = todo.pop()
        first = run.position[w]
        blocked = _advance(w, lists[w], run, free, deps, duration, delay)
        if blocked is not None:
            waiting.setdefault(blocked, set()).add(w)
        for a in lists[w][first:run.position[w]]:
            todo.extend(waiting.pop(a, ()))
    _collect_stuck(run, lists, deps)
    return run


def _advance(w, row, run, free, deps, duration, delay) -> Action | None:
    """Run worker ``w`` as far as it can go; return the dependency it blocks on, if any."""
    while run.position[w] < len(row):
        a = row[run.position[w]]
        reqs = deps.of(a)
        missing = next((d for d in reqs if d not in run.end), None)
        if missing is not None:
            return missing
        t0 = max([free[w]] + [run.end[d] + delay(d, a) for d in reqs])
        run.start[a] = t0
        run.end[a] = free[w] = t0 + duration(a)
        run.position[w] += 1
    return None


def _collect_stuck(run: Run, lists: list[list[Action]], deps: Dependencies) -> None:
    """For each worker that did not finish, its head action and what it still lacks."""
    for w, row in enumerate(lists):
        if run.position[w] < len(row):
            a = row[run.position[w]]
            run.stuck[w] = (a, [d for d in deps.of(a) if d not in run.end])
