"""Start-up and shut-down phases of a run, each timed, told as they end.

Why: a run that starts a Ray cluster, places actors and profiles blocks spends seconds
before its first step; a user who sees nothing for that long cannot tell a slow start from
a hang, nor where the time goes. Every phase (``ray``, ``placed``, ``profiled``,
``first step``, ``evaluated``, ``stopped``, ...) is recorded once with its own seconds and
the time since the process began (the command's start, imports included), and handed to a
listener (``brigade train`` prints one line per phase) as it ends.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

__all__ = ["Phase", "PhaseLog", "process_age_s"]

_IMPORTED_AT = time.monotonic()


def process_age_s() -> float:
    """Seconds since this process started (Linux: /proc; elsewhere: since this module was
    imported, which the CLI does first)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        started_ticks = int(fields[19])  # field 22 of stat(5): start time in clock ticks
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED_AT


@dataclass
class Phase:
    """One phase: its name, its own seconds, when it ended (seconds since the process
    began), a line that says what it did, and figures for ``--json``."""

    name: str
    seconds: float
    at_s: float
    text: str
    figures: dict[str, Any] = field(default_factory=dict)
    label: str = ""  # what the seconds are, in the line: ``(restore 0.3 s)``

    def line(self) -> str:
        """``[  4.2 s] started a local Ray cluster: ... (3.1 s)``: when, what, how long."""
        what = f"{self.label} " if self.label else ""
        return f"[{self.at_s:6.1f} s] {self.text} ({what}{self.seconds:.1f} s)"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PhaseLog:
    """The phases of one run, in order; ``listener`` hears each as it is recorded."""

    def __init__(self, listener: Callable[[Phase], None] | None = None) -> None:
        self.phases: list[Phase] = []
        self.listener = listener

    def record(self, name: str, seconds: float, text: str, label: str = "",
               **figures: Any) -> Phase:
        phase = Phase(name, float(seconds), process_age_s(), text, figures, label)
        self.phases.append(phase)
        if self.listener is not None:
            self.listener(phase)
        return phase

    def timed(self, name: str, text: str | Callable[[], str], **figures: Any) -> "_Timer":
        """``with log.timed("evaluated", "evaluated 1,000 samples"):`` records the block."""
        return _Timer(self, name, text, figures)

    def seconds(self, *names: str) -> float:
        """Total seconds of the named phases (each name may occur more than once)."""
        return sum(p.seconds for p in self.phases if p.name in names)

    def to_list(self) -> list[dict[str, Any]]:
        return [p.to_dict() for p in self.phases]


class _Timer:
    def __init__(self, log: PhaseLog, name: str, text, figures: dict) -> None:
        self.log, self.name, self.text, self.figures = log, name, text, figures

    def __enter__(self) -> "_Timer":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            text = self.text() if callable(self.text) else self.text
            self.log.record(self.name, time.perf_counter() - self.t0, text, **self.figures)
