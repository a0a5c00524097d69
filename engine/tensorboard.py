"""TensorBoard output of ``brigade train`` and ``brigade race`` (``--tensorboard DIR``).

A thin layer over ``torch.utils.tensorboard.SummaryWriter`` (the tool the seed report used)
so the rest of the engine writes ``writer.scalar(tag, value, step, seconds)`` and never
imports tensorboard itself: the package is an optional extra (``pip install
brigade[tensorboard]``), needed only when ``--tensorboard`` is given, and a missing package
is a one-line error before training starts (``check_available``).

Scalars carry the training step as their x value and the run's charged training seconds as
their wall time (``start + seconds``), so TensorBoard's "relative" horizontal axis shows
accuracy against training time with evaluation pauses left out, which is what a race
compares.
"""

from __future__ import annotations

import os
import time
from typing import Any

from .errors import PipelineConfigError

__all__ = ["RunWriter", "open_writer", "check_available"]


def check_available() -> None:
    """Raise a PipelineConfigError naming the fix when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as err:  # tensorboard itself missing
        raise PipelineConfigError(
            f"--tensorboard needs the tensorboard package ({err}); pip install "
            "'brigade[tensorboard]' or drop --tensorboard") from None


class RunWriter:
    """Scalars and figures of one run, in ``root/name``."""

    def __init__(self, root: str, name: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.path = os.path.join(root, name)
        self._writer = SummaryWriter(self.path)
        self._start = time.time()

    def scalar(self, tag: str, value: float, step: int, seconds: float | None = None) -> None:
        """One value; ``seconds`` (training time charged so far) becomes its wall time."""
        walltime = None if seconds is None else self._start + seconds
        self._writer.add_scalar(tag, float(value), int(step), walltime=walltime)

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        """Several values under ``prefix/``, one scalar each."""
        for key, value in values.items():
            if value is not None:
                self.scalar(f"{prefix}/{key}", value, step)

    def figure(self, tag: str, fig: Any, step: int) -> None:
        """A matplotlib figure as an image."""
        self._writer.add_figure(tag, fig, int(step))

    def text(self, tag: str, text: str) -> None:
        self._writer.add_text(tag, text)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


def open_writer(root: str | None, name: str) -> RunWriter | None:
    """A writer under ``root`` (None: no TensorBoard output)."""
    if root is None:
        return None
    check_available()
    return RunWriter(root, name)
