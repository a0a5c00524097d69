"""ResNet-18/34/50 written out as a flat sequence of blocks (no torchvision).

A pipeline cuts a model between blocks, so the network is one ``nn.Sequential`` whose items
are: the stem, every residual block in order, and the head. Any contiguous slice is then a
valid stage. Block counts: resnet18 = 1 + 8 + 1 = 10, resnet34 = 1 + 16 + 1 = 18,
resnet50 = 1 + 16 + 1 = 18.

Two stems: ``"cifar"`` (3x3 conv, stride 1, no pooling: for 32x32 images) and ``"imagenet"``
(7x7 conv, stride 2, then a 3x3 stride-2 max-pool). The head (global average pool, flatten,
linear) is its own block. ``Stem`` and ``Head`` are shared with ``brigade.stages.revnet``.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = [
    "STEMS",
    "Stem",
    "Head",
    "BasicBlock",
    "Bottleneck",
    "resnet",
    "LAYERS",
    "conv_bn",
]

STEMS = ("cifar", "imagenet")

# Residual blocks per stage, and the block kind, for each depth (He et al. 2016, table 1).
LAYERS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
}


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Convolution (no bias: BatchNorm has one) followed by BatchNorm, 'same' padding."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
    )


class Stem(nn.Module):
    """First block: image -> ``width`` feature maps. Not reversible (channels change).

    ``cifar`` keeps the resolution (3x3 conv); ``imagenet`` divides it by 4 (7x7 stride-2
    conv, 3x3 stride-2 max-pool), as in the original ResNet.
    """

    reversible = False

    def __init__(self, in_channels: int, width: int, stem: str = "cifar") -> None:
        super().__init__()
        if stem == "cifar":
            self.body = nn.Sequential(conv_bn(in_channels, width, 3), nn.ReLU())
        elif stem == "imagenet":
            self.body = nn.Sequential(
                conv_bn(in_channels, width, 7, stride=2),
                nn.ReLU(),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            raise ValueError(f"unknown stem {stem!r}; valid: {', '.join(STEMS)}")

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class Head(nn.Module):
    """Last block: global average pool, flatten, linear classifier. Not reversible."""

    reversible = False

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.flatten(self.pool(x)))


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1 projection) shortcut; ResNet-18/34's block.

    Not reversible: a residual block ``y = relu(x + f(x))`` has no closed-form inverse.
    """

    expansion = 1
    reversible = False

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.residual = nn.Sequential(
            conv_bn(cin, planes, 3, stride), nn.ReLU(), conv_bn(planes, cout, 3)
        )
        self.shortcut = (
            conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()
        )
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.shortcut(x) + self.residual(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) with a shortcut; ResNet-50's block. Not reversible."""

    expansion = 4
    reversible = False

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.residual = nn.Sequential(
            conv_bn(cin, planes, 1),
            nn.ReLU(),
            conv_bn(planes, planes, 3, stride),
            nn.ReLU(),
            conv_bn(planes, cout, 1),
        )
        self.shortcut = (
            conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()
        )
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.shortcut(x) + self.residual(x))


def resnet(
    depth: int,
    in_channels: int = 3,
    num_classes: int = 10,
    width: int = 64,
    stem: str = "cifar",
) -> nn.Sequential:
    """Build ResNet-``depth`` as ``Sequential(stem, block, ..., block, head)``.

    Stage ``i`` (0..3) has ``width * 2**i`` planes; stages 1..3 start with stride 2.
    """
    kind, counts = LAYERS[depth]
    block = BasicBlock if kind == "basic" else Bottleneck
    blocks: list[nn.Module] = [Stem(in_channels, width, stem)]
    cin = width
    for stage, count in enumerate(counts):
        planes = width * 2**stage
        for i in range(count):
            stride = 2 if stage > 0 and i == 0 else 1
            blocks.append(block(cin, planes, stride))
            cin = planes * block.expansion
    blocks.append(Head(cin, num_classes))
    return nn.Sequential(*blocks)
