"""brigade.engine: processes and transport that run schedules on stages.

The public surface is :class:`Pipeline` (see DESIGN.md for its contract) and the errors it
raises; backends, actors and the wire format are private.
"""

from .errors import PipelineConfigError, PipelineError, StageFailedError
from .pipeline import Pipeline

__all__ = ["Pipeline", "PipelineError", "PipelineConfigError", "StageFailedError"]
