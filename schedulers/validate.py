"""The validator: a schedule is accepted only if the engine could run it to the end.

Checks, in the order a reader would want to hear about problems:

1. placement: each action's stage exists and lives on the worker whose list holds it;
   microbatch (or update) indices are in range; no action appears twice;
2. coverage: every stage runs one forward (a forward kind) of every microbatch; each
   backward family of a step (B/I, W, R, T, D: the kinds' ``family``) is all-or-none per
   stage (stale's forward-only steps have none); a kind with a ``partner`` (I and W) has it;
3. order: what an action waits for exists, and on its own worker comes earlier;
4. no deadlock between workers (a dry run under the rules of :mod:`.deps`).

Each failure raises :class:`ScheduleError` whose message prints the grid with the
offending actions marked ``<-- ERROR HERE``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Iterable

from .actions import BACKWARD_KINDS, FORWARD_KINDS, Action
from .dataflow import run_in_order
from .deps import Dependencies
from .errors import ScheduleError
from .kinds import kind_of

if TYPE_CHECKING:  # pragma: no cover
    from .schedule import Schedule

__all__ = ["validate", "check_placement", "check_coverage", "check_order", "check_deadlock"]


def _families() -> dict[str, list[str]]:
    """Backward work that comes all-or-none per stage and step, by family; the kinds of one
    family are alternatives (B or I for a microbatch)."""
    out: dict[str, list[str]] = {}
    for code in BACKWARD_KINDS:
        out.setdefault(kind_of(code).family, []).append(code)
    return out


def validate(schedule: "Schedule") -> None:
    """Raise :class:`ScheduleError` (with the marked grid) unless ``schedule`` can run."""
    check_placement(schedule)
    deps = Dependencies(schedule)
    check_coverage(schedule, deps)
    check_order(schedule, deps)
    check_deadlock(schedule, deps)


def _fail(schedule: "Schedule", message: str, marks: dict[Action, str] | Iterable[Action]
          ) -> None:
    """Raise with the message, then the grid with ``marks`` flagged."""
    try:
        grid = schedule.grid(marks=marks)
    except ScheduleError:  # the grid itself needs a sound placement
        grid = "\n".join(f"w{w} | " + " ".join(map(str, row))
                         for w, row in enumerate(schedule.workers))
    raise ScheduleError(f"{message}\n{grid}")


# -- 1. placement ----------------------------------------------------------------------------
def check_placement(schedule: "Schedule") -> None:
    """Stages exist and sit on their worker; indices in range; no duplicates."""
    seen: dict[Action, int] = {}
    for w, a in schedule:
        _check_one(schedule, w, a)
        if a in seen:
            _fail(schedule, f"{a} appears twice (worker {seen[a]} and worker {w}); each "
                  "action runs exactly once", {a: "duplicate"})
        seen[a] = w


def _check_one(schedule: "Schedule", w: int, a: Action) -> None:
    """One action's stage, worker and index."""
    p, n = schedule.num_stages, schedule.total_microbatches
    if a.stage >= p:
        raise ScheduleError(f"{a} on worker {w}: stage {a.stage} does not exist; this "
                            f"schedule has stages 0..{p - 1}")
    if schedule.worker_of(a.stage) != w:
        raise ScheduleError(
            f"{a} is in worker {w}'s list, but stage {a.stage} lives on worker "
            f"{schedule.worker_of(a.stage)} (stage % {schedule.num_workers}); move it there")
    kind = kind_of(a.kind)
    limit = schedule.num_updates if kind.index == "update" else n
    if a.microbatch >= limit:
        raise ScheduleError(f"{a} on worker {w}: {kind.index} {a.microbatch} is out of range; "
                            f"valid {kind.index} indices are 0..{limit - 1}")
    if kind.not_on_last and a.stage == p - 1:
        raise ScheduleError(f"{a}: {kind.not_on_last}")


# -- 2. coverage -----------------------------------------------------------------------------
def check_coverage(schedule: "Schedule", deps: Dependencies) -> None:
    """Every forward present; backward families complete per step; updates complete."""
    by_stage: dict[int, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
    for _, a in schedule:
        by_stage[a.stage][a.kind].add(a.microbatch)
    everything = set(range(schedule.total_microbatches))
    for s in range(schedule.num_stages):
        kinds = by_stage[s]
        _forwards(schedule, deps, s, kinds, everything)
        _backwards(schedule, s, kinds)
        _updates(schedule, s, kinds)


def _forwards(schedule, deps, s, kinds, everything) -> None:
    """Stage s runs exactly one forward (F, DNI's S, ...) of every microbatch."""
    forwards = sorted(FORWARD_KINDS)
    clash = _overlap(kinds, forwards)
    if clash:
        k1, k2, j = clash
        _fail(schedule, f"stage {s} runs microbatch {j} forward twice ({s}{k1}{j} and "
              f"{s}{k2}{j})", [Action(s, k1, j), Action(s, k2, j)])
    missing = sorted(everything.difference(*(kinds[k] for k in forwards)))
    if missing:
        j = missing[0]
        _fail(schedule, f"stage {s} never runs a forward of microbatch {j} (missing: "
              f"{_short(missing)}); every stage must run F for microbatches "
              f"0..{schedule.total_microbatches - 1}", _touching(schedule, deps, s, j))


def _overlap(kinds: dict[str, set[int]], codes: list[str]) -> tuple[str, str, int] | None:
    """The first pair of mutually exclusive kinds that both ran one microbatch, and that
    microbatch (the lowest), or None: what the forward and backward-family checks share."""
    for x, k1 in enumerate(codes):
        for k2 in codes[x + 1:]:
            both = kinds[k1] & kinds[k2]
            if both:
                return k1, k2, min(both)
    return None


def _touching(schedule: "Schedule", deps: Dependencies, s: int, j: int) -> list[Action]:
    """Actions about (s, j) on stage s, or those that wait for a forward of it."""
    own = [a for _, a in schedule if a.stage == s and a.microbatch == j
           and kind_of(a.kind).index != "update"]
    if own:
        return own
    wanted = {Action(s, k, j) for k in FORWARD_KINDS}
    return [a for _, a in schedule if wanted & set(deps.of(a))]


def _backwards(schedule: "Schedule", s: int, kinds: dict[str, set[int]]) -> None:
    """Per step: each backward family present for all of the step's microbatches or none;
    alternatives of one family never both; partners (I, W) together."""
    families = _families()
    for family in families.values():
        clash = _overlap(kinds, family)
        if clash:
            k1, k2, j = clash
            _fail(schedule, f"stage {s} runs both {s}{k1}{j} and {s}{k2}{j}; they are "
                  f"alternatives ({kind_of(k1).label}, {kind_of(k2).label}): run one",
                  [Action(s, k1, j), Action(s, k2, j)])
    for code in sorted(BACKWARD_KINDS):
        partner = kind_of(code).partner
        lone = sorted(kinds[code] - kinds[partner]) if partner else []
        if lone:
            j = lone[0]
            _fail(schedule, f"stage {s} runs {s}{code}{j} but no {s}{partner}{j}; "
                  f"{kind_of(code).label} ({code}) and {kind_of(partner).label} ({partner}) "
                  "come in pairs: run both", [Action(s, code, j)])
    m = schedule.microbatches
    for family in families.values():
        done = set().union(*(kinds[k] for k in family))
        for t in sorted({j // m for j in done}):
            step = set(range(t * m, (t + 1) * m))
            missing = sorted(step - done)
            if missing:
                kind = family[0]
                present = [Action(s, k, j) for k in family for j in sorted(done & step)
                           if j in kinds[k]]
                _fail(schedule, f"stage {s} runs {kind} for some microbatches of step {t} "
                      f"but not for {_short(missing)}; a step's backward work covers all "
                      f"its microbatches {t * m}..{t * m + m - 1}", present[-1:])


def _updates(schedule: "Schedule", s: int, kinds: dict[str, set[int]]) -> None:
    """A stage that updates at all runs every update 0..num_updates-1."""
    for code in [c for c in kinds if kind_of(c).index == "update"]:
        if not kinds[code]:
            continue
        missing = sorted(set(range(schedule.num_updates)) - kinds[code])
        if missing:
            have = Action(s, code, min(kinds[code]))
            _fail(schedule, f"stage {s} runs updates but not {code}{_short(missing)}; it needs "
                  f"{s}{code}0..{s}{code}{schedule.num_updates - 1} (one per "
                  f"{schedule.accumulate} microbatches)", [have])


def _short(items: list[int]) -> str:
    """A list of indices, cut short when long."""
    text = ", ".join(map(str, items[:6]))
    return text + (", ..." if len(items) > 6 else "")


# -- 3. order --------------------------------------------------------------------------------
def check_order(schedule: "Schedule", deps: Dependencies) -> None:
    """What each action needs exists, and on the same worker comes earlier."""
    where = {a: (w, i) for w, row in enumerate(schedule.workers) for i, a in enumerate(row)}
    for w, row in enumerate(schedule.workers):
        for i, a in enumerate(row):
            for d in deps.of(a):
                _check_edge(schedule, deps, where, a, (w, i), d)


def _check_edge(schedule, deps, where, a, at, d) -> None:
    """One dependency edge d -> a."""
    if d not in where:
        _fail(schedule, f"{a} needs {d}, which no worker runs ({deps.rule(a)})",
              {a: f"needs {d}"})
    w, i = at
    dw, di = where[d]
    if dw == w and di > i:
        _fail(schedule, f"{a} comes before {d} on worker {w} (positions {i} and {di}), but "
              f"{deps.rule(a)}: move {a} after {d}", {a: f"needs {d}, which comes later"})


# -- 4. deadlock -----------------------------------------------------------------------------
def check_deadlock(schedule: "Schedule", deps: Dependencies) -> None:
    """Dry-run the lists; if workers wait for each other in a cycle, say who waits for what."""
    run = run_in_order(schedule, deps=deps)
    if not run.deadlocked:
        return
    waits = [f"worker {w} waits at {a} for {', '.join(map(str, lack))}"
             for w, (a, lack) in sorted(run.stuck.items())]
    marks = {a: "waits for " + ", ".join(map(str, lack)) for a, lack in run.stuck.values()}
    _fail(schedule, "deadlock: " + "; ".join(waits) + ". Reorder the lists so that each "
          "worker reaches what the others wait for.", marks)
