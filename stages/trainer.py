"""Single-process reference training: the baseline every pipelined method is compared with.

``reference_step`` takes one optimizer step exactly as a pipeline does with the same
microbatch split (gradient accumulated over microbatches, microbatch j's mean loss scaled by
its share n_j / N of the batch); with one microbatch it is plain full-batch training.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["reference_step", "evaluate"]


def reference_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    microbatches: int = 1,
) -> float:
    """One optimizer step on (x, y); returns the batch's mean loss."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    n = x.shape[0]
    total = 0.0
    for xj, yj in zip(torch.tensor_split(x, microbatches), torch.tensor_split(y, microbatches)):
        loss = loss_fn(model(xj), yj) * (xj.shape[0] / n)
        loss.backward()
        total += float(loss.detach())
    optimizer.step()
    return total


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on (x, y) in eval mode."""
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return correct / max(1, x.shape[0])
