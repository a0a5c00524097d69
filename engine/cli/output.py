"""Writing what commands produce: atomically, so a crash never leaves half a file."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from typing import Any, Callable, Iterator

__all__ = [
    "atomic_write_text", "write_json", "save_state_dict", "fmt_bytes", "progress_bar",
    "json_figures",
]


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def save_state_dict(state: dict, path: str) -> None:
    """``torch.save`` to a temporary name and rename: a reader never sees half a file."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def json_figures(report: dict) -> dict:
    """The report minus what is not JSON (state dict, timeline object)."""
    skip = {"state_dict", "timeline", "pid"}
    return {k: v for k, v in report.items() if k not in skip}


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


@contextlib.contextmanager
def progress_bar(console, label: str, disable: bool = False) -> Iterator[Callable]:
    """A rich progress bar; yields ``update(done, total, info)``."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=disable, transient=False) as bar:
        task = bar.add_task(label, total=None, info="")

        def update(done: int, total: int, info: dict) -> None:
            text = "  ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items()
            )
            bar.update(task, completed=done, total=total, info=text)

        yield update
