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
    "json_figures", "print_run_figures", "phase_printer",
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


def phase_printer(console, only: tuple[str, ...] | None = None) -> Callable:
    """A listener that prints each start-up phase's line as it ends (rank 0 only, under
    torchrun: the other ranks would print the same lines again); ``only``: just the
    phases of these names (``--quiet`` still says what it restored and wrote)."""
    from brigade.engine.torchrun_backend import is_rank0

    def say(phase) -> None:
        if is_rank0() and (only is None or phase.name in only):
            console.print(phase.line(), highlight=False, soft_wrap=True)

    return say


def _microbatch_text(batch: int, m: int) -> str:
    """``m=4 microbatches of 16 (batch 64)``; ``of 16-17`` where the split is uneven."""
    lo, hi = batch // m, -(-batch // m)
    size = f"{lo}" if lo == hi else f"{lo}-{hi}"
    return f"m={m} microbatch{'es' if m > 1 else ''} of {size} (batch {batch})"


def print_run_figures(report: dict, console) -> None:
    """m and the batch; the bubble and samples/s measured beside the simulation of the
    same schedule with the run's own costs; what the bubble means where it is not a
    pipeline's; the message latency's share where it sets the pace; where the time went."""
    from rich.table import Table

    from brigade.engine.simulated import LATENCY_DOMINATES

    window = report.get("window")
    console.print(_microbatch_text(report["batch_size"], report["microbatches"])
                  + (f", up to {window} steps per pipelined run" if window else ""), soft_wrap=True)
    sim = report.get("simulated")
    bubble = report.get("bubble_fraction")
    # where the stages take turns in one process, the measured idle share is no bubble
    turns = (report.get("config") or {}).get("backend") == "local"
    if sim is not None:
        table = Table(title="measured vs simulated")
        for col in ("", "measured", "simulated"):
            table.add_column(col, justify="right")
        measured = "-" if bubble is None or turns else f"{bubble:.3f}"
        table.add_row("bubble", measured, f"{sim['bubble_fraction']:.3f}")
        table.add_row("samples/s", f"{report['samples_per_s']:,.0f}",
                      f"{sim['samples_per_s']:,.0f}")
        console.print(table)
        console.print("(simulated: the same schedule, workers, m and steps, with the run's "
                      "own mean costs, message latency and send time; sends are not busy "
                      "time in either column)", soft_wrap=True)
    else:
        console.print("bubble: none")
    if report.get("bubble_note"):
        console.print(f"({report['bubble_note']})", soft_wrap=True)
    if sim is not None and sim["latency_share"] > LATENCY_DOMINATES:
        console.print(
            f"messages set the pace: {sim['latency_s'] * 1e3:.2f} ms per hand-off is "
            f"{sim['latency_share']:.0%} of the simulated time (more compute per "
            "microbatch, a larger batch, amortises it)", soft_wrap=True)
    _print_time(report, console)


def _print_time(report: dict, console) -> None:
    """Training seconds, and everything else since the command began."""
    parts = [f"time: {report['wall_s']:.1f} s training"]
    if report.get("outside_training_s") is not None:
        parts.append(f"{report['outside_training_s']:.1f} s outside it (start, evaluation, "
                     "stop)")
    if report.get("first_step_at_s") is not None:
        parts.append(f"first step done {report['first_step_at_s']:.1f} s after the command "
                     "began")
    if report.get("restore_s"):
        parts.append(f"restore {report['restore_s']:.1f} s (not in the throughput)")
    console.print("; ".join(parts), soft_wrap=True)
