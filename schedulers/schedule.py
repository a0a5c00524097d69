"""A schedule: one ordered action list per worker, plus the sizes that produced it.

A schedule is data. The simulator and the engine execute the very same lists, so what
:func:`~brigade.schedulers.simulate.simulate` predicts is what the engine runs. Stage ``s``
lives on worker ``s % num_workers`` (Megatron-LM's placement: worker ``w`` holds stages
``w, w + p, w + 2p, ...``); with one stage per worker, stage and worker coincide.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from .actions import Action, parse_actions
from .errors import ScheduleError

__all__ = ["Schedule"]


def _positive(name: str, value: Any) -> None:
    """Sizes are positive integers; say which one is not."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ScheduleError(f"{name} must be a positive integer, got {value!r}")


def _as_actions(row: Any) -> list[Action]:
    """Accept ``[Action, ...]``, ``["0F0", ...]`` or ``"0F0 0F1 ..."`` for one worker."""
    if isinstance(row, str):
        return parse_actions(row)
    return [a if isinstance(a, Action) else Action.parse(a) for a in row]


@dataclass
class Schedule:
    """Per-worker ordered action lists for ``steps`` steps of ``microbatches`` each.

    ``num_stages`` counts virtual stages (``num_workers * virtual``). ``options`` keeps the
    generator's options (``k`` for stale, ``accumulate`` for petra, ...).
    """

    name: str
    num_stages: int
    num_workers: int
    microbatches: int
    steps: int
    virtual: int
    workers: list[list[Action]]
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for size in ("num_stages", "num_workers", "microbatches", "steps", "virtual"):
            _positive(size, getattr(self, size))
        if self.num_stages != self.num_workers * self.virtual:
            raise ScheduleError(
                f"num_stages ({self.num_stages}) must equal num_workers ({self.num_workers}) "
                f"x virtual ({self.virtual}) = {self.num_workers * self.virtual}"
            )
        self.workers = [_as_actions(row) for row in self.workers]
        if len(self.workers) != self.num_workers:
            raise ScheduleError(
                f"a schedule for {self.num_workers} workers needs {self.num_workers} action "
                f"lists, got {len(self.workers)}"
            )
        self.options = dict(self.options)

    # -- placement -------------------------------------------------------------------------
    def worker_of(self, stage: int) -> int:
        """The worker that holds ``stage`` (Megatron-LM placement: ``stage % workers``)."""
        if not 0 <= stage < self.num_stages:
            raise ScheduleError(
                f"stage {stage} is out of range: this schedule has stages 0..{self.num_stages - 1}"
            )
        return stage % self.num_workers

    def stages_of(self, worker: int) -> list[int]:
        """The stages ``worker`` holds, in model order."""
        if not 0 <= worker < self.num_workers:
            raise ScheduleError(
                f"worker {worker} is out of range: this schedule has workers "
                f"0..{self.num_workers - 1}"
            )
        return list(range(worker, self.num_stages, self.num_workers))

    # -- sizes derived from the options ----------------------------------------------------
    @property
    def total_microbatches(self) -> int:
        """Microbatches over all steps; action microbatch indices run 0..this-1."""
        return self.steps * self.microbatches

    @property
    def accumulate(self) -> int:
        """Microbatches whose gradients one update ``U`` applies (default: one step's)."""
        return int(self.options.get("accumulate", self.microbatches))

    @property
    def num_updates(self) -> int:
        """How many update groups there are (the range of ``U`` indices)."""
        return -(-self.total_microbatches // self.accumulate)

    def update_microbatches(self, update: int) -> range:
        """Microbatches whose backward work update ``update`` (``xU<update>``) applies."""
        k = self.accumulate
        return range(update * k, min((update + 1) * k, self.total_microbatches))

    def step_of(self, microbatch: int) -> int:
        """The step a (global) microbatch index belongs to."""
        return microbatch // self.microbatches

    # -- iteration -------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[int, Action]]:
        """``(worker, action)`` pairs, worker by worker, in program order."""
        for w, row in enumerate(self.workers):
            for a in row:
                yield w, a

    def __len__(self) -> int:
        return sum(len(row) for row in self.workers)

    # -- text and JSON ---------------------------------------------------------------------
    def grid(self, marks: Mapping[Action, str] | None = None, width: int | None = None) -> str:
        """The staircase: one row per worker, actions at their unit-time slots."""
        from .grid import render_grid

        return render_grid(self, marks=marks, width=width)

    def __str__(self) -> str:
        return self.grid()

    def to_json(self, path: str | Path | None = None) -> dict[str, Any]:
        """A JSON-ready dict (actions as ``"1F3"`` strings); also written to ``path``."""
        data = {
            "name": self.name,
            "num_stages": self.num_stages,
            "num_workers": self.num_workers,
            "microbatches": self.microbatches,
            "steps": self.steps,
            "virtual": self.virtual,
            "options": dict(self.options),
            "workers": [[str(a) for a in row] for row in self.workers],
        }
        if path is not None:
            Path(path).write_text(json.dumps(data, indent=1) + "\n")
        return data

    @classmethod
    def from_json(cls, source: Mapping[str, Any] | str | Path) -> "Schedule":
        """Read what :meth:`to_json` wrote: a dict, JSON text, or a file path."""
        data = _load_json(source)
        try:
            return cls(**{k: data[k] for k in (
                "name", "num_stages", "num_workers", "microbatches", "steps", "virtual",
                "workers")}, options=data.get("options", {}))
        except KeyError as err:
            raise ScheduleError(f"schedule JSON lacks the key {err}") from None


def _load_json(source: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """A dict from a dict, a JSON text (starting with ``{``) or a path to a JSON file."""
    if isinstance(source, Mapping):
        return dict(source)
    text = str(source)
    if not text.lstrip().startswith("{"):
        text = Path(text).read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ScheduleError(f"not valid JSON: {err}") from None
