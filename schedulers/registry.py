"""Schedule declarations: each generator registers itself with the facts the rest of the
code asks about its schedule; ``build("1F1B", ...)`` finds it by case-insensitive name.

A :class:`ScheduleSpec` holds the generator, the options it accepts (its keyword
parameters beyond the sizes, so an unknown option is an error that lists the valid ones
and ``compare`` passes each schedule only its own), and facts: whether it flushes between
steps (``decoupled`` ones do not: fill and drain are paid once over S steps), whether it is
forward-only (no activation gradient travels backward, at most scalars), whether its
stages store activations, how many stages per worker it places by default, and whether
``brigade schedule compare`` lists it by default. Generators declare themselves with the
:func:`register_schedule` decorator (see :mod:`.generators`); this module names none.

Room for what comes next: a V-shaped placement (ZB-V, DualPipeV) is one more fact here
that ``Schedule.worker_of`` reads; a method-aware cost hook for the balancer belongs to
the learning rule's declaration, which names the schedules it runs under.
"""

from __future__ import annotations

import inspect
from collections.abc import Set
from dataclasses import dataclass
from typing import Any, Callable

from .errors import ScheduleError
from .live import LiveSet
from .schedule import Schedule

__all__ = ["ScheduleSpec", "register_schedule", "unregister_schedule", "schedule_spec", "specs", "build", "names",
           "options_of", "DECOUPLED"]

# The sizes every generator takes; its other keyword parameters are its options.
_SIZES = ("stages", "microbatches", "virtual", "steps")


@dataclass(frozen=True)
class ScheduleSpec:
    """One schedule's declaration (see the module docstring for each fact)."""

    name: str
    generator: Callable[..., Schedule]
    options: tuple[str, ...] = ()
    decoupled: bool = False
    forward_only: bool = False
    stores_activations: bool | None = None  # None: unless forward-only
    default_virtual: int = 1
    compared: bool = True
    summary: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name != self.name.strip().lower() \
                or not self.name:
            raise ScheduleError(f"schedule name {self.name!r} must be a non-empty lower-case "
                                "string without surrounding spaces")
        if isinstance(self.default_virtual, bool) or not isinstance(self.default_virtual, int) \
                or self.default_virtual < 1:
            raise ScheduleError(f"schedule {self.name}: default_virtual must be an integer "
                                f">= 1, got {self.default_virtual!r}")
        if self.stores_activations is None:
            object.__setattr__(self, "stores_activations", not self.forward_only)
        if not self.summary:
            doc = inspect.getdoc(self.generator) or ""
            object.__setattr__(self, "summary", doc.split("\n\n")[0].replace("\n", " "))

    @property
    def takes_virtual(self) -> bool:
        """Whether it places several stages per worker (``--virtual``)."""
        return self.default_virtual > 1


_SPECS: dict[str, ScheduleSpec] = {}


def _options(generator: Callable[..., Any]) -> tuple[str, ...]:
    """A generator's keyword parameters beyond the sizes."""
    params = inspect.signature(generator).parameters
    return tuple(n for n, p in params.items() if n not in _SIZES
                 and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def register_schedule(name: str, *, replace: bool = False, **facts: Any
                      ) -> Callable[[Callable[..., Schedule]], Callable[..., Schedule]]:
    """Decorator: declare the decorated generator as schedule ``name`` with ``facts``
    (:class:`ScheduleSpec` fields; ``options`` default to its keyword parameters). A name
    registered twice is an error unless ``replace``."""

    def declare(generator: Callable[..., Schedule]) -> Callable[..., Schedule]:
        spec = ScheduleSpec(name=str(name).strip().lower(), generator=generator,
                            options=tuple(facts.pop("options", _options(generator))),
                            **facts)
        if spec.name in _SPECS and not replace:
            raise ScheduleError(f"schedule {spec.name!r} is already registered; pass "
                                "replace=True to redefine it")
        _SPECS[spec.name] = spec
        return generator

    return declare


def unregister_schedule(name: str) -> None:
    """Remove a declaration (tests, reloads); an unknown name lists the valid ones."""
    del _table()[schedule_spec(name).name]


def _table() -> dict[str, ScheduleSpec]:
    """The declarations, the built-in generators' included (they register at import)."""
    from . import generators  # noqa: F401

    return _SPECS


def specs() -> list[ScheduleSpec]:
    """Every declaration, in registration order."""
    return list(_table().values())


def names() -> list[str]:
    """The registered schedule names, in registration order."""
    return list(_table())


def schedule_spec(name: str) -> ScheduleSpec:
    """The declaration of ``name`` (any case); an unknown name lists the valid ones."""
    table = _table()
    key = str(name).strip().lower()
    if key not in table:
        raise ScheduleError(f"unknown schedule {name!r}; valid names: {', '.join(table)}")
    return table[key]


def options_of(name: str) -> tuple[str, ...]:
    """The options schedule ``name`` accepts (``k`` for stale, ...)."""
    return schedule_spec(name).options


# Schedules without a flush between steps: their fill and drain are paid once.
DECOUPLED: Set = LiveSet(_table, lambda spec: spec.decoupled, key=lambda n: n.strip().lower())


def build(name: str, stages: int, microbatches: int, virtual: int = 1, steps: int = 1,
          **options: Any) -> Schedule:
    """Generate and validate schedule ``name`` for ``stages`` workers (pipeline depth p),
    ``microbatches`` per step, ``virtual`` stages per worker and ``steps`` steps."""
    from .validate import validate

    spec = schedule_spec(name)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        valid = ", ".join(spec.options) if spec.options else "none"
        raise ScheduleError(
            f"schedule {name!r} takes no option {', '.join(unknown)}; its options: {valid}"
        )
    schedule = spec.generator(stages, microbatches, virtual=virtual, steps=steps, **options)
    validate(schedule)
    return schedule
