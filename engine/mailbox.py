"""A worker's inbox: tensors keyed by (what, stage, microbatch), waited on by key.

Why keyed rather than FIFO: a schedule fixes the order in which a worker *consumes* messages,
but messages from two neighbours (activations from the left, gradients from the right) arrive
in any interleaving. Waiting on the exact key the next action needs blocks only where the
schedule says the worker must wait.
"""

from __future__ import annotations

import threading
from typing import Any, Hashable, Iterable

__all__ = ["Mailbox"]


class Mailbox:
    """Thread-safe map of key -> payload with blocking ``take``."""

    def __init__(self) -> None:
        self._items: dict[Hashable, Any] = {}
        self._cond = threading.Condition()

    def put(self, key: Hashable, value: Any) -> None:
        """Deliver one message; a duplicate key means a schedule bug, so it is an error."""
        with self._cond:
            if key in self._items:
                raise KeyError(f"message {key!r} delivered twice")
            self._items[key] = value
            self._cond.notify_all()

    def has(self, keys: Iterable[Hashable]) -> bool:
        """Whether every key is present (non-blocking; used by the one-process executor)."""
        with self._cond:
            return all(k in self._items for k in keys)

    def wait(self, keys: list[Hashable], timeout: float | None) -> bool:
        """Block until every key is present; False when ``timeout`` seconds pass first."""
        with self._cond:
            return self._cond.wait_for(lambda: all(k in self._items for k in keys), timeout)

    def take(self, key: Hashable) -> Any:
        """Remove and return a present message."""
        with self._cond:
            return self._items.pop(key)

    def pending(self) -> list[Hashable]:
        """Keys delivered but not consumed yet (for leak checks and error messages)."""
        with self._cond:
            return list(self._items)

    def clear(self) -> None:
        with self._cond:
            self._items.clear()
