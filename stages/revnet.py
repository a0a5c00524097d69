"""RevNet-18/34/50: ResNets whose same-shape residual blocks are exactly invertible.

A reversible block splits its channels in two halves ``x = (x1, x2)`` and couples them
additively (Gomez et al. 2017, "The Reversible Residual Network")::

    y1 = x1 + F(x2)            x2 = y2 - G(y1)
    y2 = x2 + G(y1)            x1 = y1 - F(x2)
         forward                    inverse

so a stage can rebuild its input from its output instead of storing it; PETRA (Rivaud et
al., ICLR 2025) relies on this. F and G are small residual functions on half the channels:
conv-BN-ReLU-conv-BN (3x3, for revnet18/34) or a 1x1-3x3-1x1 bottleneck (for revnet50).

Layout: the same stages as ResNet-18/34/50 (``brigade.stages.resnet``), so block counts
match (10, 18, 18). Only three kinds of block are NOT reversible, and their ``reversible``
attribute is False: the stem, the head, and the block that opens a stage where resolution
or channels change (``Downsample``: an ordinary residual block with a projection shortcut).
revnet18 has 5 reversible blocks of 10, revnet34 13 of 18, revnet50 12 of 18.

BatchNorm and the inverse. In train mode BatchNorm normalises with the statistics of the
batch it sees and updates its running statistics. The inverse calls G on ``y1`` (taken
from ``y`` as is) and F on ``x2`` (recovered before F is called): these are the very
inputs the forward gave G and F, so recomputing gives the same batch statistics and the
reconstruction is exact up to float rounding (< 1e-5 relative, tested). What must not
happen is a second update of the running statistics: ``inverse`` and ``reverse_backward``
run inside ``frozen_bn_stats``, which sets every BatchNorm's momentum to 0 for the
recompute (running = 1 * running + 0 * batch, bit-exact) and restores
``num_batches_tracked`` afterwards. A caller that recomputes a forward pass for its
gradient (e.g. a PETRA stage) should do it inside ``frozen_bn_stats`` too.

Precision: ``x1 = y1 - F(x2)`` cancels, so the error is about float32 rounding of ``F(x2)``
relative to ``x``: ~1e-7 for activations the model itself produced in the same mode (train
or eval), as in training. Feeding a train-mode block inputs far smaller than its
BatchNorm-normalised F output (e.g. computed in eval mode with untrained statistics)
loses digits to that cancellation; that is arithmetic, not a bug. On GPUs, TF32
convolutions (``torch.backends.cudnn.allow_tf32``, on by default) round F's and G's inputs
to 10-bit mantissas, which should be expected to cost reconstruction digits too (not
measured here: no GPU); turn TF32 off where exactness matters.

For PETRA: ``reverse_backward(y, dy)`` is the memory-free backward of one block (returns
the rebuilt input and its gradient, accumulates parameter gradients at the current
weights); ``invert(blocks, y)`` walks a run of reversible blocks backwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .resnet import LAYERS, BasicBlock, Bottleneck, Head, Stem, conv_bn

__all__ = [
    "RevBlock",
    "Downsample",
    "revnet",
    "is_reversible",
    "invert",
    "frozen_bn_stats",
]


def is_reversible(block: nn.Module) -> bool:
    """True when ``block`` has an exact ``inverse(y) -> x`` (its ``reversible`` attribute)."""
    return bool(getattr(block, "reversible", False))


@contextmanager
def frozen_bn_stats(module: nn.Module) -> Iterator[None]:
    """Run a recompute without touching any BatchNorm running statistics in ``module``.

    Why: rebuilding an input (or recomputing a forward for its gradient) must not count as a
    second training batch. Momentum 0 keeps running mean/var bit-exact while train-mode
    normalisation still uses the batch's own statistics, as the original forward did.
    """
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            count = m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None
            saved.append((m, m.momentum, count))
            m.momentum = 0.0
    try:
        yield
    finally:
        with torch.no_grad():
            for m, momentum, count in saved:
                m.momentum = momentum
                if count is not None:
                    m.num_batches_tracked.copy_(count)


def _residual_fn(channels: int, kind: str) -> nn.Sequential:
    """F or G: a residual function from ``channels`` to ``channels`` at the same resolution."""
    if kind == "basic":
        return nn.Sequential(conv_bn(channels, channels, 3), nn.ReLU(), conv_bn(channels, channels, 3))
    mid = max(1, channels // 2)
    return nn.Sequential(
        conv_bn(channels, mid, 1),
        nn.ReLU(),
        conv_bn(mid, mid, 3),
        nn.ReLU(),
        conv_bn(mid, channels, 1),
    )


class RevBlock(nn.Module):
    """Reversible residual block with additive coupling; ``reversible`` is True.

    ``channels`` must be even: F and G each act on one half. Shape in == shape out.
    """

    reversible = True

    def __init__(self, channels: int, kind: str = "basic") -> None:
        super().__init__()
        if channels % 2:
            raise ConfigError(f"a reversible block splits channels in two; got {channels}, use an even number")
        self.f = _residual_fn(channels // 2, kind)
        self.g = _residual_fn(channels // 2, kind)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=1)
        y1 = x1 + self.f(x2)
        y2 = x2 + self.g(y1)
        return torch.cat([y1, y2], dim=1)

    def inverse(self, y: Tensor) -> Tensor:
        """Rebuild the input from the output with the current weights; no stats update.

        Runs under the caller's grad mode (wrap in ``torch.no_grad()`` to save memory).
        """
        with frozen_bn_stats(self):
            y1, y2 = y.chunk(2, dim=1)
            x2 = y2 - self.g(y1)
            x1 = y1 - self.f(x2)
        return torch.cat([x1, x2], dim=1)

    def reverse_backward(self, y: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
        """From output ``y`` and ``dL/dy``, return ``(x, dL/dx)`` and accumulate ``.grad``.

        The RevNet backward pass: no stored activations, each half is rebuilt right before
        its function's gradient is taken, and parameter gradients land in ``p.grad`` as
        ``loss.backward()`` would put them (at the block's *current* weights).
        """
        dy1, dy2 = dy.detach().chunk(2, dim=1)
        with frozen_bn_stats(self), torch.enable_grad():
            y1, y2 = (h.detach().requires_grad_(i == 0) for i, h in enumerate(y.detach().chunk(2, dim=1)))
            g = self.g(y1)
            x2 = (y2 - g).detach().requires_grad_()
            g.backward(dy2)
            dz1 = dy1 + y1.grad
            f = self.f(x2)
            x1 = (y1 - f).detach()
            f.backward(dz1)
            dx2 = dy2 + x2.grad
        return torch.cat([x1, x2.detach()], dim=1), torch.cat([dz1, dx2], dim=1)


class Downsample(nn.Module):
    """The block that opens a stage where resolution or channel count changes.

    NOT reversible (``reversible`` is False): a stride-2 or channel-changing map loses
    information, so a PETRA stage stores this block's input. It is an ordinary residual
    block (basic or bottleneck) with a 1x1 projection shortcut.
    """

    reversible = False

    def __init__(self, cin: int, planes: int, stride: int, kind: str) -> None:
        super().__init__()
        self.block = (BasicBlock if kind == "basic" else Bottleneck)(cin, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


def invert(blocks: nn.Sequential, y: Tensor) -> Tensor:
    """Rebuild the input of a run of reversible blocks from its output (last block first)."""
    for i in reversed(range(len(blocks))):
        if not is_reversible(blocks[i]):
            raise ConfigError(
                f"block {i} ({type(blocks[i]).__name__}) is not reversible; "
                "only runs of RevBlocks can be inverted, store the input of the others"
            )
        y = blocks[i].inverse(y)
    return y


def revnet(
    depth: int,
    in_channels: int = 3,
    num_classes: int = 10,
    width: int = 64,
    stem: str = "cifar",
) -> nn.Sequential:
    """Build RevNet-``depth`` (18, 34 or 50) as ``Sequential(stem, blocks..., head)``.

    A block whose input and output shapes agree is a ``RevBlock`` on that many channels;
    the first block of a stage that changes shape is a ``Downsample``.
    """
    kind, counts = LAYERS[depth]
    expansion = 1 if kind == "basic" else 4
    blocks: list[nn.Module] = [Stem(in_channels, width, stem)]
    cin = width
    for stage, count in enumerate(counts):
        planes = width * 2**stage
        cout = planes * expansion
        for i in range(count):
            stride = 2 if stage > 0 and i == 0 else 1
            if stride == 1 and cin == cout:
                blocks.append(RevBlock(cout, kind))
            else:
                blocks.append(Downsample(cin, planes, stride, kind))
            cin = cout
    blocks.append(Head(cin, num_classes))
    return nn.Sequential(*blocks)
