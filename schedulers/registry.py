"""The name registry: ``build("1F1B", ...)`` finds a generator by case-insensitive name.

Each entry names the options its generator accepts, so that an unknown option is an error
that lists the valid ones (and ``compare`` can pass each schedule only its own options).
"""

from __future__ import annotations

from typing import Any, Callable

from . import generators as g
from .errors import ScheduleError
from .schedule import Schedule

__all__ = ["build", "names", "options_of", "DECOUPLED"]

_REGISTRY: dict[str, tuple[Callable[..., Schedule], tuple[str, ...]]] = {
    "gpipe": (g.gpipe, ()),
    "1f1b": (g.one_f_one_b, ()),
    "interleaved": (g.interleaved, ()),
    "zb1p": (g.zb1p, ()),
    "dni": (g.dni, ("lag",)),
    "petra": (g.petra, ("accumulate",)),
    "stale": (g.stale, ("k",)),
    "fwdgrad": (g.fwdgrad, ()),
    "dgl": (g.dgl, ()),
}
# Schedules without a flush between steps: their fill and drain are paid once.
DECOUPLED: frozenset[str] = frozenset({"dni", "petra", "dgl"})


def names() -> list[str]:
    """The registered schedule names, in registry order."""
    return list(_REGISTRY)


def _entry(name: str) -> tuple[Callable[..., Schedule], tuple[str, ...]]:
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        raise ScheduleError(
            f"unknown schedule {name!r}; valid names: {', '.join(_REGISTRY)}"
        )
    return _REGISTRY[key]


def options_of(name: str) -> tuple[str, ...]:
    """The options schedule ``name`` accepts (``k`` for stale, ...)."""
    return _entry(name)[1]


def build(name: str, stages: int, microbatches: int, virtual: int = 1, steps: int = 1,
          **options: Any) -> Schedule:
    """Generate and validate schedule ``name`` for ``stages`` workers (pipeline depth p),
    ``microbatches`` per step, ``virtual`` stages per worker and ``steps`` steps."""
    from .validate import validate

    generator, accepted = _entry(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        valid = ", ".join(accepted) if accepted else "none"
        raise ScheduleError(
            f"schedule {name!r} takes no option {', '.join(unknown)}; its options: {valid}"
        )
    schedule = generator(stages, microbatches, virtual=virtual, steps=steps, **options)
    validate(schedule)
    return schedule
