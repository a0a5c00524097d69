"""Schedule generators: pure functions from sizes to per-worker action lists.

``p`` is the number of workers (pipeline depth, the ``stages`` argument), ``m`` the
microbatches per step, ``S`` the steps, ``v`` the stages per worker. Microbatch indices are
global: step ``t`` runs microbatches ``t*m .. t*m+m-1``.

Each generator declares itself (``@register_schedule``, :mod:`.registry`) with its facts:
options, decoupled, forward-only, stores activations.

Flush schedules (gpipe, 1f1b, interleaved, zb1p, fwdgrad) repeat one step's pattern S
times; each stage ends every step with ``U`` after all its backward work, and the next step
starts from an empty pipeline. Decoupled schedules (dni, petra) have no flush: over S steps the
fill and drain are paid once. ``stale`` runs a gpipe backprop step every k-th step and
forward-only steps (then ``U`` with the last gradient) in between.
"""

from __future__ import annotations

from typing import Callable

from .actions import Action
from .errors import ScheduleError
from .registry import register_schedule
from .schedule import Schedule

__all__ = [
    "gpipe",
    "one_f_one_b",
    "interleaved",
    "zb1p",
    "dni",
    "petra",
    "stale",
    "fwdgrad",
    "dgl",
    "interleaved_rounds",
]

StepPattern = Callable[[int], list[Action]]  # worker -> its actions for microbatches 0..m-1


# -- shared pieces ---------------------------------------------------------------------------
def _sizes(stages: int, microbatches: int, virtual: int, steps: int) -> None:
    """Positive integer sizes, or an error that names the bad one."""
    for name, value in (("stages", stages), ("microbatches", microbatches),
                        ("virtual", virtual), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ScheduleError(f"{name} must be a positive integer, got {value!r}")


def _one_stage_per_worker(name: str, virtual: int) -> None:
    """Only interleaved places several stages on a worker."""
    if virtual != 1:
        raise ScheduleError(
            f"{name} runs one stage per worker, so virtual must be 1 (got {virtual}); "
            "for several stages per worker use 'interleaved'"
        )


def _enough_microbatches(name: str, p: int, m: int) -> None:
    """1F1B-style schedules need a steady state: at least one microbatch per worker."""
    if m < p:
        raise ScheduleError(
            f"{name} needs microbatches >= stages so that every worker reaches its steady "
            f"state: got m={m} with p={p}; use m >= {p}, or 'gpipe' for m={m}"
        )


def _shift(actions: list[Action], offset: int) -> list[Action]:
    """The same actions for microbatches ``offset + j`` (the next step's)."""
    return [Action(a.stage, a.kind, a.microbatch + offset) for a in actions]


def _flush(name: str, p: int, m: int, v: int, steps: int, pattern: StepPattern,
           **options: int) -> Schedule:
    """Repeat one step's pattern ``steps`` times, each step ending in ``U`` per stage."""
    workers = []
    for w in range(p):
        one = pattern(w)
        row: list[Action] = []
        for t in range(steps):
            row += _shift(one, t * m)
            row += [Action(s, "U", t) for s in range(w, p * v, p)]
        workers.append(row)
    return Schedule(name, p * v, p, m, steps, v, workers, options=options)


def _f(s: int, j: int) -> Action:
    return Action(s, "F", j)


def _b(s: int, j: int) -> Action:
    return Action(s, "B", j)


# -- backprop with a flush --------------------------------------------------------------------
@register_schedule("gpipe")
def gpipe(stages: int, microbatches: int, virtual: int = 1, steps: int = 1) -> Schedule:
    """GPipe: all forwards, then all backwards (in microbatch order), then the update."""
    _sizes(stages, microbatches, virtual, steps)
    _one_stage_per_worker("gpipe", virtual)
    m = microbatches

    def pattern(s: int) -> list[Action]:
        return [_f(s, j) for j in range(m)] + [_b(s, j) for j in range(m)]

    return _flush("gpipe", stages, m, 1, steps, pattern)


@register_schedule("1f1b")
def one_f_one_b(stages: int, microbatches: int, virtual: int = 1, steps: int = 1) -> Schedule:
    """1F1B (PipeDream-Flush): p-1-s warm-up forwards, then one forward, one backward."""
    _sizes(stages, microbatches, virtual, steps)
    _one_stage_per_worker("1f1b", virtual)
    p, m = stages, microbatches
    _enough_microbatches("1f1b", p, m)

    def pattern(s: int) -> list[Action]:
        warm = min(p - 1 - s, m)
        order = [_f(s, j) for j in range(warm)]
        for j in range(m - warm):
            order += [_f(s, warm + j), _b(s, j)]
        return order + [_b(s, j) for j in range(m - warm, m)]

    return _flush("1f1b", p, m, 1, steps, pattern)


def interleaved_rounds(stages: int, microbatches: int, virtual: int) -> int:
    """Microbatches per round of interleaved 1F1B, or an error that says which m work.

    As in torch.distributed.pipelining: ``rounds = m // p`` and each round must hold the
    same number (>= p) of microbatches; any multiple of p works.
    """
    p, m = stages, microbatches
    if virtual < 2:
        raise ScheduleError(
            f"interleaved needs virtual >= 2 stages per worker (got {virtual}); "
            "with one stage per worker use '1f1b'"
        )
    if m < p:
        raise ScheduleError(
            f"interleaved needs microbatches >= stages: got m={m} with p={p}; use m={p} "
            f"(any multiple of {p} works)"
        )
    rounds = m // p
    if m % rounds:
        fits = [n for n in range(p, 4 * m + p) if n % (n // p) == 0]
        below = max(n for n in fits if n < m)
        above = min(n for n in fits if n > m)
        raise ScheduleError(
            f"interleaved splits m={m} microbatches into m//p={rounds} rounds of equal size, "
            f"but {m} is not a multiple of {rounds}; use m={below} or m={above} "
            f"(any multiple of p={p} works)"
        )
    return m // rounds


@register_schedule("interleaved", default_virtual=2)
def interleaved(stages: int, microbatches: int, virtual: int = 2, steps: int = 1) -> Schedule:
    """Interleaved 1F1B (Megatron-LM order): worker w holds stages w, w+p, ...; it runs
    ``(v-1)*g + 2*(p-1-w)`` warm-up forwards, then alternates, chunk by chunk in rounds of
    g microbatches (g = p when m is a multiple of p)."""
    _sizes(stages, microbatches, virtual, steps)
    p, m, v = stages, microbatches, virtual
    g = interleaved_rounds(p, m, v)
    n = v * m

    def op(w: int, k: int, kind: str) -> Action:
        chunk = (k // g) % v
        if kind == "B":
            chunk = v - 1 - chunk
        return Action(chunk * p + w, kind, (k // (g * v)) * g + k % g)

    def pattern(w: int) -> list[Action]:
        warm = min((v - 1) * g + 2 * (p - 1 - w), n)
        order = [op(w, k, "F") for k in range(warm)]
        for k in range(n - warm):
            order += [op(w, warm + k, "F"), op(w, k, "B")]
        return order + [op(w, k, "B") for k in range(n - warm, n)]

    return _flush("interleaved", p, m, v, steps, pattern)


@register_schedule("zb1p")
def zb1p(stages: int, microbatches: int, virtual: int = 1, steps: int = 1) -> Schedule:
    """Zero-bubble H1 (Qi et al. 2023): 1F1B with B split into I (input gradient, on the
    critical path) and W (weight gradient, deferred). Stage s defers s of its W's to the
    drain, where 1F1B would sit idle; in-flight microbatches stay at p."""
    _sizes(stages, microbatches, virtual, steps)
    _one_stage_per_worker("zb1p", virtual)
    p, m = stages, microbatches
    _enough_microbatches("zb1p", p, m)

    def pattern(s: int) -> list[Action]:
        order = [_f(s, j) for j in range(p - 1 - s)]
        f, b, w = p - 1 - s, 0, 0
        for _ in range(s):  # forward and input-backward, weight-backward deferred
            order += [_f(s, f), Action(s, "I", b)]
            f, b = f + 1, b + 1
        while f < m:
            order += [_f(s, f), Action(s, "I", b), Action(s, "W", w)]
            f, b, w = f + 1, b + 1, w + 1
        while b < m:
            order += [Action(s, "I", b), Action(s, "W", w)]
            b, w = b + 1, w + 1
        return order + [Action(s, "W", j) for j in range(w, m)]

    return _flush("zb1p", p, m, 1, steps, pattern)


# -- decoupled: no flush ---------------------------------------------------------------------
@register_schedule("dni", decoupled=True)
def dni(stages: int, microbatches: int, virtual: int = 1, steps: int = 1,
        lag: int = 1) -> Schedule:
    """Decoupled neural interfaces (Jaderberg 2016): ``S`` runs forward, backward from the
    synthetic gradient and the update at once, so no stage waits for the ones after it.
    ``T`` trains the synthetic-gradient module when the true gradient comes back; stage s
    runs it ``lag`` microbatches later. The last stage has no module, hence no ``T``.
    Updates happen inside ``S``: there are no ``U`` actions."""
    _sizes(stages, microbatches, virtual, steps)
    _one_stage_per_worker("dni", virtual)
    if isinstance(lag, bool) or not isinstance(lag, int) or lag < 0:
        raise ScheduleError(f"dni option lag must be an integer >= 0, got {lag!r}")
    p, n = stages, microbatches * steps

    def row(s: int) -> list[Action]:
        order: list[Action] = []
        for j in range(n):
            order.append(Action(s, "S", j))
            if s < p - 1 and j >= lag:
                order.append(Action(s, "T", j - lag))
        if s < p - 1:
            order += [Action(s, "T", j) for j in range(max(0, n - lag), n)]
        return order

    return Schedule("dni", p, p, microbatches, steps, 1, [row(s) for s in range(p)],
                    options={"lag": lag})


# reversible stages rebuild their input: they store no activations
@register_schedule("petra", decoupled=True, stores_activations=False)
def petra(stages: int, microbatches: int, virtual: int = 1, steps: int = 1,
          accumulate: int | None = None) -> Schedule:
    """PETRA (Rivaud et al. 2025): every tick a stage runs one forward and one delayed
    backward ``R`` (rebuild the input from the output, then backprop), with one weight
    version and no flush. Stage s backprops microbatch j at tick ``j + 2(p-1) - s``;
    ``U`` applies every ``accumulate`` microbatches of gradient (default m)."""
    _sizes(stages, microbatches, virtual, steps)
    _one_stage_per_worker("petra", virtual)
    p, m = stages, microbatches
    k = m if accumulate is None else accumulate
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ScheduleError(
            f"petra option accumulate must be a positive integer, got {accumulate!r}; "
            f"the default is one step's microbatches ({m})"
        )
    n = m * steps

    def row(s: int) -> list[Action]:
        order: list[Action] = []
        for tick in range(n + 2 * (p - 1)):
            if 0 <= tick - s < n:
                order.append(_f(s, tick - s))
            j = tick - 2 * (p - 1) + s
            if 0 <= j < n:
                order.append(Action(s, "R", j))
                if (j + 1) % k == 0 or j == n - 1:
                    order.append(Action(s, "U", j // k))
        return order

    return Schedule("petra", p, p, m, steps, 1, [row(s) for s in range(p)],
                    options={"accumulate": k})


@register_schedule("stale")
def stale(stages: int, microbatches: int, virtual: int = 1, steps: int = 1,
          k: int = 4) -> Schedule:
    """The synthetic-gradients blog's baseline: every k-th step (0, k, 2k, ...) is a gpipe
    backprop step; the steps between run forward only (for the loss, keeping no
    activations) and update with the gradient of the last backprop step."""
    _sizes(stages, microbatches, virtual, steps)
    _one_stage_per_worker("stale", virtual)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ScheduleError(f"stale option k must be a positive integer, got {k!r}")
    p, m = stages, microbatches

    def row(s: int) -> list[Action]:
        order: list[Action] = []
        for t in range(steps):
            mbs = range(t * m, (t + 1) * m)
            order += [_f(s, j) for j in mbs]
            if t % k == 0:
                order += [_b(s, j) for j in mbs]
            order.append(Action(s, "U", t))
        return order

    return Schedule("stale", p, p, m, steps, 1, [row(s) for s in range(p)],
                    options={"k": k})


# -- forward only: forward gradients ---------------------------------------------------------
# not in compare's default list: its F is a forward with tangents, which the same
# costs as the others' F would misprice
@register_schedule("fwdgrad", forward_only=True, compared=False)
def fwdgrad(stages: int, microbatches: int, virtual: int = 1, steps: int = 1) -> Schedule:
    """The forward-only pipeline (forward gradients, Baydin 2022): ``F`` pushes a
    microbatch's activation and its tangent downstream; on the last stage it also yields
    ``d = ∇L·v``, one scalar per projection, which goes straight back to every stage;
    ``D`` adds it to the stage's coefficients for the step; ``U`` forms the gradient
    ``Σ d·v / n`` from the directions drawn during F, and steps. No activation gradient travels backward: GPipe with B replaced by D::

        w0 | 0F0 0F1 0F2 0F3 0D0 0D1 0D2 0D3 0U0
        w1 |     1F0 1F1 1F2 1F3 1D0 1D1 1D2 1D3 1U0
        w2 |         2F0 2F1 2F2 2F3 2D0 2D1 2D2 2D3 2U0

    (unit slots; the simulator charges ``D`` nothing). A flush per step, because the
    estimator is synchronous: step t+1's forward on stage s must see the weights after
    update t, which needs d of all step t's microbatches, which exists only once the last
    stage has run them. So every stage idles p-1 forward slots per step, as in GPipe, but
    the slots are forwards only. Running on without the flush would mean forwards with
    weights one update old, a different (delayed-gradient) algorithm."""
    _sizes(stages, microbatches, virtual, steps)
    _one_stage_per_worker("fwdgrad", virtual)
    m = microbatches

    def pattern(s: int) -> list[Action]:
        return [_f(s, j) for j in range(m)] + [Action(s, "D", j) for j in range(m)]

    return _flush("fwdgrad", stages, m, 1, steps, pattern)


# not in compare's default list: its F is a forward plus the local head's backward, which
# the shared costs would misprice
@register_schedule("dgl", decoupled=True, stores_activations=False, compared=False)
def dgl(stages: int, microbatches: int, virtual: int = 1, steps: int = 1) -> Schedule:
    """Decoupled greedy learning (Belilovsky et al. 2020): each stage trains on the loss of
    its own auxiliary head, so ``F`` is the forward, the local loss and its backward in one,
    and the activation goes on detached; nothing comes back. ``U`` ends each step's
    microbatches. No flush: a stage starts step t+1 as soon as its input arrives, since no
    stage ever waits for a later one (fill and drain are paid once per run)::

        w0 | 0F0 0F1 0U0 0F2 0F3 0U1
        w1 |     1F0 1F1 1U0 1F2 1F3 1U1
    """
    _sizes(stages, microbatches, virtual, steps)
    _one_stage_per_worker("dgl", virtual)
    p, m = stages, microbatches

    def row(s: int) -> list[Action]:
        order: list[Action] = []
        for t in range(steps):
            order += [_f(s, j) for j in range(t * m, (t + 1) * m)]
            order.append(Action(s, "U", t))
        return order

    return Schedule("dgl", p, p, m, steps, 1, [row(s) for s in range(p)])
