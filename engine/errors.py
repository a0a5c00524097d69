"""Errors the engine raises; remote failures become these, naming the stage."""

from __future__ import annotations

__all__ = ["PipelineError", "StageFailedError", "PipelineConfigError", "as_config_error"]


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


def as_config_error(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, with a ``ConfigError`` of brigade.stages (a rule's own
    checks, the registry's unknown names) raised as :class:`PipelineConfigError`, so the
    CLI reports it as one line."""
    from brigade.stages.errors import ConfigError

    try:
        return fn(*args, **kwargs)
    except PipelineConfigError:
        raise
    except ConfigError as err:
        raise PipelineConfigError(str(err)) from None
