"""Profiling: every block's forward and backward on one thread, and the stage table of a
split."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn

from brigade.stages.models import build_model, shape_kwargs
from brigade.stages.partition import BlockProfile, Partition, profile_blocks

from .config import BenchConfig, SHAPES

__all__ = ["ModelProfile", "make_batch", "make_model", "profile_model", "stage_table"]


# -- profiling -------------------------------------------------------------------------------
@dataclass
class ModelProfile:
    """One model on one input shape: block costs for ONE microbatch, and how they were got.

    ``scale`` is microbatch / profiled batch: 1 when profiled at the microbatch size, else the
    factor the times and bytes were multiplied by (linear scaling, an approximation).
    """

    model: str
    shape: str
    blocks: list[BlockProfile]
    scale: float
    profile_batch: int

    @property
    def source(self) -> str:
        """What the costs rest on, as the tables print it."""
        return "profiled" if self.scale == 1 else f"scaled x{self.scale:g} from batch {self.profile_batch}"

    @property
    def block_seconds(self) -> list[float]:
        """Forward + backward seconds per block: what the balance minimises the max of."""
        return [b.forward_s + b.backward_s for b in self.blocks]


def make_model(cfg: BenchConfig, name: str, shape: str) -> nn.Sequential:
    """The model as both runners build it: same seed, same options, so the same weights.
    ``--width`` and the stem are the convolutional nets'; the MLP keeps its own width (the
    README main job's model)."""
    dims, classes, stem = SHAPES[shape]
    torch.manual_seed(cfg.seed)
    conv = {} if name == "mlp" else {"width": cfg.width, "stem": stem or "cifar"}
    return build_model(name, **conv, **shape_kwargs(dims, classes))


def make_batch(cfg: BenchConfig, shape: str, n: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic batch (normal images, uniform labels) from the config's seed."""
    dims, classes, _ = SHAPES[shape]
    g = torch.Generator().manual_seed(cfg.seed + 1 + offset)
    return torch.randn(n, *dims, generator=g), torch.randint(0, classes, (n,), generator=g)


def _profile_batch(cfg: BenchConfig, shape: str) -> int:
    """Microbatch size, or fewer samples for ImageNet shapes (times are scaled up)."""
    if shape == "imagenet":
        return min(cfg.microbatch_size, cfg.imagenet_profile_batch)
    return cfg.microbatch_size


def profile_model(cfg: BenchConfig, name: str, shape: str) -> ModelProfile:
    """Every block's forward and backward seconds for one microbatch, on one thread."""
    model = make_model(cfg, name, shape)
    batch = _profile_batch(cfg, shape)
    x, _ = make_batch(cfg, shape, batch)
    with _threads(1):
        blocks = profile_blocks(model, x, "cpu", cfg.repeats)
    scale = cfg.microbatch_size / batch
    if scale != 1:
        blocks = [replace(b, forward_s=b.forward_s * scale, backward_s=b.backward_s * scale,
                          input_s=b.input_s * scale, weight_s=b.weight_s * scale,
                          batch=cfg.microbatch_size,
                          out_shape=(cfg.microbatch_size, *b.out_shape[1:]),
                          out_bytes=int(b.out_bytes * scale)) for b in blocks]
    return ModelProfile(name, shape, blocks, scale, batch)


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """Run a block with ``n`` torch threads (the engines' workers use one each)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def stage_table(mp: ModelProfile, balance: list[int], model: nn.Sequential) -> Partition:
    """The partition table of ``balance`` from the profile (no second profiling pass)."""
    return Partition.from_profile(model, balance, mp.blocks, "time")
