"""A live, read-only set over a registry: the names whose record satisfies a predicate.

Why live: ``KINDS``, ``FORWARD_KINDS`` and ``DECOUPLED`` are public constants that code
reads as sets, but a rule or schedule registered later (``register_action_kind``,
``register_schedule``) must be in them; a frozen set taken at import time would miss it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Set
from typing import Any, Callable

__all__ = ["LiveSet"]


class LiveSet(Set):
    """The keys of ``table()`` whose value ``keep`` accepts, looked up when asked.

    ``key`` turns a queried name into the table's spelling (e.g. lower case), so that a
    membership test is one dictionary look-up, not a scan.
    """

    def __init__(self, table: Callable[[], Mapping[str, Any]], keep: Callable[[Any], bool],
                 key: Callable[[str], str] = lambda name: name) -> None:
        self._table, self._keep, self._key = table, keep, key

    def _names(self) -> list[str]:
        return [name for name, record in self._table().items() if self._keep(record)]

    def __contains__(self, name: object) -> bool:
        record = self._table().get(self._key(name)) if isinstance(name, str) else None
        return record is not None and self._keep(record)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __hash__(self) -> int:
        return hash(frozenset(self._names()))

    @classmethod
    def _from_iterable(cls, it):  # set operations give plain frozensets
        return frozenset(it)

    def __repr__(self) -> str:
        return "{" + ", ".join(map(repr, sorted(self._names()))) + "}"
