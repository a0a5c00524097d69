"""brigade.stages: models, partitioning, data and the per-stage learning rules.

Nothing here knows about processes: a stage is a plain class driven one action at a time.
"""

from .data import Dataset, batches, dataset_spec, load_dataset
from .errors import ConfigError
from .models import build_model, model_info, model_names, shape_kwargs
from .partition import (
    Partition,
    balance_by_params,
    balance_by_time,
    balance_uniform,
    min_max_partition,
    partition,
    profile_blocks,
    split,
)
from .revnet import is_reversible
from .stage import Stage, StageSpec

__all__ = [
    "ConfigError", "build_model", "model_names", "model_info", "shape_kwargs",
    "is_reversible", "split", "partition", "Partition", "profile_blocks",
    "min_max_partition", "balance_uniform", "balance_by_params", "balance_by_time",
    "Dataset", "load_dataset", "dataset_spec", "batches", "Stage", "StageSpec",
]
