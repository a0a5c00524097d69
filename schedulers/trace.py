"""Chrome/Perfetto trace files: open them in ui.perfetto.dev or chrome://tracing.

One process per timeline (schedule), one thread per worker, one complete event per span.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from .timeline import Timeline

__all__ = ["chrome_trace", "write_chrome_trace"]


def chrome_trace(timelines: Timeline | Mapping[str, Timeline]) -> dict:
    """The trace object: ``{"traceEvents": [...], "displayTimeUnit": "ms"}``."""
    if isinstance(timelines, Timeline):
        timelines = {str(timelines.meta.get("schedule", "run")): timelines}
    events: list[dict] = []
    for pid, (name, tl) in enumerate(timelines.items()):
        events.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
                       "args": {"name": name}})
        for w in range(tl.num_workers):
            events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": w,
                           "args": {"name": f"worker {w}"}})
        events += tl.to_chrome_trace(pid=pid)
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(timelines: Timeline | Mapping[str, Timeline], path: str | Path) -> Path:
    """Write the trace JSON of one timeline, or of several side by side, to ``path``."""
    path = Path(path)
    path.write_text(json.dumps(chrome_trace(timelines)) + "\n")
    return path
