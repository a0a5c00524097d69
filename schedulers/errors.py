"""The one error type of :mod:`brigade.schedulers`.

A bad schedule, a bad size or a bad cost is the user's to fix, so the error is a
``ValueError`` (the command line prints it as one line and exits with status 2) and its
message carries the numbers and says what would work.
"""

from __future__ import annotations

__all__ = ["ScheduleError"]


class ScheduleError(ValueError):
    """An invalid schedule, size, option or cost; the message says what would work."""
