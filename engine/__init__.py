"""brigade.engine: processes and transport that run schedules on stages.

The public surface is :class:`Pipeline` (the README's "Python API" is its contract) and the errors it
raises; backends, actors and the wire format are private. Names load on first use (module
``__getattr__``), so that importing a submodule such as the command line
(``brigade.engine.cli``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Pipeline", "PipelineError", "PipelineConfigError", "StageFailedError"]

_WHERE = {
    "Pipeline": ".pipeline",
    "PipelineError": ".errors",
    "PipelineConfigError": ".errors",
    "StageFailedError": ".errors",
}


def __getattr__(name: str) -> Any:
    """A public name from its module, or a submodule (``brigade.engine.pipeline``) that
    code reached as an attribute when this package imported it eagerly."""
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    else:
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
