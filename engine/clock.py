"""One clock for a run's timeline: each worker process's ``time.perf_counter`` against the driver's.

Why it matters: the calibrated message latency (``brigade.schedulers.calibrate``) is the gap
between a producer's send ending on one worker and the waiting consumer starting on another,
often a fraction of a millisecond; an error in the two workers' relative offset lands in it
whole. Estimating the offset from one actor-call round trip (remote clock minus the midpoint)
was 0.2-1.5 ms off on one host, where the true offset is 0: the request and the reply of a
Ray call do not take equal time, and the first call is slow.

So: processes that read the same ``CLOCK_MONOTONIC`` (``perf_counter`` on Linux) - same
kernel boot, same time namespace - have offset 0, exactly. Across hosts the offset comes from
the round trip with the least time in flight among several (its midpoint error is at most half
that round trip).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence

__all__ = ["clock_id", "stamp", "offset_from_pings", "measure_offset", "PINGS"]

PINGS = 5  # round trips per process whose clock differs from the driver's


@functools.cache
def clock_id() -> str:
    """Names this process's ``perf_counter`` clock: equal ids read one clock. Linux: the
    kernel's boot id and the time namespace; elsewhere (no shared guarantee) the pid, so
    only this process matches itself. Read once per process: a ping's answer then costs no
    file reads after its clock reading."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        try:
            ns = os.stat("/proc/self/ns/time").st_ino  # Linux >= 5.6: namespaces can shift clocks
        except OSError:
            ns = 0
        return f"{boot}/{ns}"
    except OSError:
        return f"pid-{os.getpid()}"


def stamp() -> tuple[float, str]:
    """This process's clock reading and its :func:`clock_id` (what a worker answers a ping with)."""
    return time.perf_counter(), clock_id()


def offset_from_pings(pings: Sequence[tuple[float, float, float]]) -> float:
    """Remote clock minus local clock from ``(sent, remote reading, answered)`` triples:
    the midpoint estimate of the round trip with the least time in flight."""
    if not pings:
        raise ValueError("offset_from_pings needs at least one (sent, remote, answered) triple")
    sent, remote, answered = min(pings, key=lambda p: p[2] - p[0])
    return remote - (sent + answered) / 2


def measure_offset(ask: Callable[[], tuple[float, str]], pings: int = PINGS) -> float:
    """The offset of the process ``ask`` reaches (``ask()`` returns its :func:`stamp`): 0 when
    it reads this process's clock, else from ``pings`` round trips."""
    triples = []
    for _ in range(pings):
        sent = time.perf_counter()
        remote, their_clock = ask()
        answered = time.perf_counter()
        if their_clock == clock_id():
            return 0.0
        triples.append((sent, remote, answered))
    return offset_from_pings(triples)
