"""The built-in models, by name: ``build_model("resnet18", width=8) -> nn.Sequential``.

Every model is a FLAT ``nn.Sequential`` of blocks, so any contiguous cut is a valid pipeline
stage, and takes image tensors ``(N, C, H, W)`` as the loaders give them. Blocks never share
parameters; the classifier head is its own block(s).

==========  ======  ==========================================================================
name        blocks  structure (``width`` is what scales it)
==========  ======  ==========================================================================
mlp         3       [flatten+linear+relu] [linear+relu] [linear]; width = hidden units (1024)
cnn         6       [conv+relu] [conv+relu+pool] [conv+relu] [conv+relu+pool]
                    [flatten+linear+relu] [linear]; width = conv channels (64), dense 4*width
resnet18    10      stem, 8 basic blocks, head (pool+flatten+linear); width = base channels
resnet34    18      stem, 16 basic blocks, head
resnet50    18      stem, 16 bottleneck blocks, head
revnet18    10      as resnet18; 5 blocks reversible (see ``brigade.stages.revnet``)
revnet34    18      as resnet34; 13 blocks reversible
revnet50    18      as resnet50; 12 blocks reversible
==========  ======  ==========================================================================

Defaults: mlp and cnn are shaped for MNIST (1x28x28, 10 classes), resnets and revnets for
CIFAR-10 (3x32x32, 10 classes, ``stem="cifar"``). Options: ``in_channels``, ``num_classes``,
``image_size`` (int or (H, W)), ``width``, and ``stem`` ("cifar" | "imagenet", resnets and
revnets only). Names are case-insensitive; a bad name or option raises ``ConfigError``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ConfigError, choose
from .resnet import STEMS, resnet
from .revnet import is_reversible, revnet

__all__ = [
    "ModelConfig",
    "ModelInfo",
    "build_model",
    "model_names",
    "model_info",
    "model_options",
    "model_config",
    "shape_kwargs",
    "count_params",
    "mlp",
    "cnn",
]

OPTIONS = ("in_channels", "num_classes", "image_size", "width", "stem")


@dataclass(frozen=True)
class ModelConfig:
    """The options of one model, checked before anything is built."""

    name: str
    in_channels: int
    num_classes: int
    image_size: tuple[int, int]
    width: int
    stem: str = "cifar"

    def __post_init__(self) -> None:
        size = self.image_size
        if isinstance(size, int) and not isinstance(size, bool):
            size = (size, size)
        if not (isinstance(size, (tuple, list)) and len(size) == 2
                and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
            raise ConfigError(
                f"{self.name}: image_size must be a positive int or (height, width); got {self.image_size!r}"
            )
        object.__setattr__(self, "image_size", (int(size[0]), int(size[1])))
        for key in ("in_channels", "num_classes", "width"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{self.name}: {key} must be a positive integer; got {value!r}")
        object.__setattr__(self, "stem", choose("stem", self.stem, STEMS))


@dataclass(frozen=True)
class _Spec:
    """A registry entry: how to build a model, its defaults and the options it accepts."""

    build: Callable[[ModelConfig], nn.Sequential]
    defaults: dict = field(default_factory=dict)
    options: tuple[str, ...] = OPTIONS
    check: Callable[[ModelConfig], None] | None = None


_MNIST = {"in_channels": 1, "num_classes": 10, "image_size": 28}
_CIFAR = {"in_channels": 3, "num_classes": 10, "image_size": 32, "width": 64, "stem": "cifar"}
_DENSE_OPTIONS = ("in_channels", "num_classes", "image_size", "width")


def mlp(cfg: ModelConfig) -> nn.Sequential:
    """The seed report's MNN: flatten, two dense ``width``-unit ReLU layers, a linear output.

    Flatten is folded into the first block so that every block holds parameters.
    """
    h, w = cfg.image_size
    return nn.Sequential(
        nn.Sequential(nn.Flatten(1), nn.Linear(cfg.in_channels * h * w, cfg.width), nn.ReLU()),
        nn.Sequential(nn.Linear(cfg.width, cfg.width), nn.ReLU()),
        nn.Sequential(nn.Linear(cfg.width, cfg.num_classes)),
    )


def _check_cnn(cfg: ModelConfig) -> None:
    """Two 2x2 max-pools need at least 4x4 images."""
    if min(cfg.image_size) < 4:
        raise ConfigError(f"cnn: image_size must be at least 4 (two 2x2 max-pools); got {cfg.image_size}")


def cnn(cfg: ModelConfig) -> nn.Sequential:
    """The seed report's CNN: four ``width``-channel 3x3 convs, two max-pools, a dense head.

    Each conv (with its ReLU, and the pool after convs 2 and 4) is a block; the head is a
    dense ``4*width``-unit ReLU layer and a linear output, one block each.
    """
    c, (h, w) = cfg.width, cfg.image_size

    def conv(cin: int, pool: bool) -> nn.Sequential:
        layers = [nn.Conv2d(cin, c, 3, padding=1), nn.ReLU()]
        return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)

    features = c * (h // 4) * (w // 4)
    return nn.Sequential(
        conv(cfg.in_channels, False),
        conv(c, True),
        conv(c, False),
        conv(c, True),
        nn.Sequential(nn.Flatten(1), nn.Linear(features, 4 * c), nn.ReLU()),
        nn.Sequential(nn.Linear(4 * c, cfg.num_classes)),
    )


def _check_even_width(cfg: ModelConfig) -> None:
    """Reversible basic blocks split the channels in two halves."""
    if cfg.width % 2:
        raise ConfigError(
            f"{cfg.name}: width must be even (reversible blocks split channels in two); "
            f"got {cfg.width}, try {cfg.width + 1}"
        )


def _resnet_builder(depth: int) -> Callable[[ModelConfig], nn.Sequential]:
    def build(cfg: ModelConfig) -> nn.Sequential:
        return resnet(depth, cfg.in_channels, cfg.num_classes, cfg.width, cfg.stem)
    return build


def _revnet_builder(depth: int) -> Callable[[ModelConfig], nn.Sequential]:
    def build(cfg: ModelConfig) -> nn.Sequential:
        return revnet(depth, cfg.in_channels, cfg.num_classes, cfg.width, cfg.stem)
    return build


_REGISTRY: dict[str, _Spec] = {
    "mlp": _Spec(mlp, {**_MNIST, "width": 1024}, _DENSE_OPTIONS),
    "cnn": _Spec(cnn, {**_MNIST, "width": 64}, _DENSE_OPTIONS, _check_cnn),
    **{f"resnet{d}": _Spec(_resnet_builder(d), _CIFAR) for d in (18, 34, 50)},
    "revnet18": _Spec(_revnet_builder(18), _CIFAR, OPTIONS, _check_even_width),
    "revnet34": _Spec(_revnet_builder(34), _CIFAR, OPTIONS, _check_even_width),
    "revnet50": _Spec(_revnet_builder(50), _CIFAR),
}


def model_names() -> list[str]:
    """The registered model names, in table order."""
    return list(_REGISTRY)


def model_options(name: str) -> dict:
    """The options ``name`` accepts, with their defaults."""
    spec = _REGISTRY[choose("model", name, _REGISTRY)]
    return {k: spec.defaults.get(k) for k in spec.options}


def model_config(name: str, **kwargs) -> ModelConfig:
    """Resolve ``name`` and ``kwargs`` against the registry into a checked ``ModelConfig``.

    ``None`` values mean "the default", so a CLI can pass its unset options through.
    """
    canonical = choose("model", name, _REGISTRY)
    spec = _REGISTRY[canonical]
    given = {k: v for k, v in kwargs.items() if v is not None}
    unknown = sorted(set(given) - set(spec.options))
    if unknown:
        raise ConfigError(
            f"{canonical} does not take {', '.join(unknown)}; it accepts {', '.join(spec.options)}"
        )
    cfg = ModelConfig(name=canonical, **{**spec.defaults, **given})
    if spec.check is not None:
        spec.check(cfg)
    return cfg


def build_model(name: str, **kwargs) -> nn.Sequential:
    """Build model ``name`` as a flat ``nn.Sequential`` of blocks (see the module table)."""
    cfg = model_config(name, **kwargs)
    return _REGISTRY[cfg.name].build(cfg)


def shape_kwargs(shape: tuple[int, int, int], num_classes: int) -> dict:
    """The model options that fit a data set of image ``shape`` (C, H, W) and classes."""
    c, h, w = shape
    return {"in_channels": c, "image_size": (h, w), "num_classes": num_classes}


def count_params(module: nn.Module) -> int:
    """Number of parameters (elements) in ``module``."""
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class ModelInfo:
    """What ``brigade models`` prints about one model."""

    name: str
    blocks: int
    reversible_blocks: int
    params: int
    input_shape: tuple[int, int, int]
    num_classes: int
    width: int
    stem: str | None


def model_info(name: str, **kwargs) -> ModelInfo:
    """Block and parameter counts of a model, built on the meta device (no memory, fast)."""
    cfg = model_config(name, **kwargs)
    with torch.device("meta"):
        model = _REGISTRY[cfg.name].build(cfg)
    return ModelInfo(
        name=cfg.name,
        blocks=len(model),
        reversible_blocks=sum(is_reversible(b) for b in model),
        params=count_params(model),
        input_shape=(cfg.in_channels, *cfg.image_size),
        num_classes=cfg.num_classes,
        width=cfg.width,
        stem=cfg.stem if "stem" in _REGISTRY[cfg.name].options else None,
    )
