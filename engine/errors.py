"""Errors the engine raises; remote failures become these, naming the stage."""

from __future__ import annotations

__all__ = ["PipelineError", "StageFailedError", "PipelineConfigError"]


class PipelineError(RuntimeError):
    """The pipeline could not run a step (deadlock, timeout, lost worker)."""


class PipelineConfigError(ValueError):
    """An invalid Pipeline argument; the message names the value and what would work."""


class StageFailedError(PipelineError):
    """A stage raised or its process died; carries the worker and stage indices."""

    def __init__(self, worker: int, stages: list[int], cause: str) -> None:
        self.worker = worker
        self.stages = stages
        self.cause = cause
        names = ", ".join(str(s) for s in stages)
        super().__init__(f"stage {names} (worker {worker}) failed: {cause}")
