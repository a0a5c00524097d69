"""Splitting a batch into microbatches, and each microbatch's share of the loss.

A batch of N samples splits into m chunks with ``torch.tensor_split``: the first ``N % m``
chunks hold ``N // m + 1`` samples, the rest ``N // m``. Microbatch j's mean loss is scaled by
``n_j / N`` so the accumulated gradient is that of the batch's mean loss, as in
single-process training on the same split.
"""

from __future__ import annotations

import torch

from .errors import PipelineConfigError

__all__ = ["split_batch", "loss_weights"]


def split_batch(x: torch.Tensor, microbatches: int) -> list[torch.Tensor]:
    """Split along dim 0 into ``microbatches`` chunks whose sizes differ by at most one."""
    n = x.shape[0]
    if n < microbatches:
        raise PipelineConfigError(
            f"batch of {n} samples cannot be split into {microbatches} microbatches; "
            f"use a batch size >= {microbatches} or fewer microbatches"
        )
    return list(torch.tensor_split(x, microbatches))


def loss_weights(chunks: list[torch.Tensor]) -> list[float]:
    """Each chunk's share n_j / N of the batch."""
    total = sum(c.shape[0] for c in chunks)
    return [c.shape[0] / total for c in chunks]
