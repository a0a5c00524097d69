"""Synthetic-gradient modules: small networks that predict dL/dh from an activation h.

Decoupled neural interfaces (Jaderberg et al. 2016, arXiv 1608.05343) put one of these at a
stage boundary: the stage updates at once with ``sg(h)`` in place of the true gradient, and
the module is trained later, by L2 regression, onto the gradient that comes back. cDNI
(conditional DNI) also gives the module the label of each example (Czarnecki et al. 2017),
which makes the regression far easier: most of dL/dh is a function of (h, y).

Two kinds, picked by the activation's rank (``make_synthesizer``):

- ``MLPSynthesizer`` for flat activations ``(N, F)`` (any other rank is flattened and the
  prediction reshaped back): ``hidden_layers`` (0..2) Linear+ReLU layers, then a Linear to F.
  cDNI concatenates the one-hot label to the (flattened) input.
- ``ConvSynthesizer`` for feature maps ``(N, C, H, W)``: ``hidden_layers`` Conv+ReLU layers
  and a final Conv to C, all with resolution-preserving ("same") padding and no pooling, so
  the prediction has h's shape. cDNI appends ``num_classes`` label planes: the one-hot label
  broadcast over H x W.

The LAST layer (weight and bias) starts at zero, so a fresh module predicts exactly zero:
training starts as if the stage received no gradient, rather than a random one.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError

__all__ = ["MLPSynthesizer", "ConvSynthesizer", "make_synthesizer", "one_hot"]


def one_hot(labels: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """Class indices ``(N,)`` as a float ``(N, num_classes)`` one-hot; a 2-D float input
    (already one-hot, or soft labels) is passed through as is."""
    if labels.ndim == 2 and labels.is_floating_point():
        if labels.shape[1] != num_classes:
            raise ConfigError(f"soft labels have {labels.shape[1]} classes, the synthesizer {num_classes}")
        return labels.to(dtype)
    if labels.ndim != 1:
        raise ConfigError(f"labels must be class indices of shape (N,); got shape {tuple(labels.shape)}")
    return F.one_hot(labels.long(), num_classes).to(dtype)


def _check_depth(hidden_layers: int) -> None:
    if isinstance(hidden_layers, bool) or not isinstance(hidden_layers, int) or not 0 <= hidden_layers <= 2:
        raise ConfigError(f"a synthesizer has 0, 1 or 2 hidden layers; got {hidden_layers!r}")


def _zero(layer: nn.Module) -> nn.Module:
    """Initialise a layer to output exactly zero (weight and bias)."""
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class _Synthesizer(nn.Module):
    """Shared checks: the label is needed exactly when the module is conditioned."""

    num_classes: int | None

    def _label(self, h: Tensor, labels: Tensor | None) -> Tensor | None:
        if self.num_classes is None:
            return None
        if labels is None:
            raise ConfigError(
                f"this synthesizer is conditioned on {self.num_classes} classes (cDNI) and needs "
                "the labels: call sg(h, labels)"
            )
        if labels.shape[0] != h.shape[0]:
            raise ConfigError(f"{labels.shape[0]} labels for a batch of {h.shape[0]} activations")
        return one_hot(labels.to(h.device), self.num_classes, h.dtype)


class MLPSynthesizer(_Synthesizer):
    """Predicts dL/dh for a flat activation (``features`` values per example)."""

    def __init__(
        self,
        features: int,
        hidden_layers: int = 0,
        hidden: int | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        _check_depth(hidden_layers)
        self.features, self.num_classes = features, num_classes
        width = hidden or features
        cin = features + (num_classes or 0)
        layers: list[nn.Module] = []
        for _ in range(hidden_layers):
            layers += [nn.Linear(cin, width), nn.ReLU()]
            cin = width
        layers.append(_zero(nn.Linear(cin, features)))
        self.net = nn.Sequential(*layers)

    def forward(self, h: Tensor, labels: Tensor | None = None) -> Tensor:
        flat = h.reshape(h.shape[0], -1)
        if flat.shape[1] != self.features:
            raise ConfigError(f"synthesizer built for {self.features} features, got h of shape {tuple(h.shape)}")
        c = self._label(h, labels)
        if c is not None:
            flat = torch.cat([flat, c], dim=1)
        return self.net(flat).reshape(h.shape)


class ConvSynthesizer(_Synthesizer):
    """Predicts dL/dh for a feature map ``(N, channels, H, W)``, any H and W."""

    def __init__(
        self,
        channels: int,
        hidden_layers: int = 0,
        num_classes: int | None = None,
        hidden_channels: int | None = None,
        kernel: int = 3,
    ) -> None:
        super().__init__()
        _check_depth(hidden_layers)
        if kernel % 2 == 0:
            raise ConfigError(f"kernel must be odd for resolution-preserving padding; got {kernel}")
        self.channels, self.num_classes = channels, num_classes
        width = hidden_channels or channels
        cin = channels + (num_classes or 0)
        layers: list[nn.Module] = []
        for _ in range(hidden_layers):
            layers += [nn.Conv2d(cin, width, kernel, padding=kernel // 2), nn.ReLU()]
            cin = width
        layers.append(_zero(nn.Conv2d(cin, channels, kernel, padding=kernel // 2)))
        self.net = nn.Sequential(*layers)

    def forward(self, h: Tensor, labels: Tensor | None = None) -> Tensor:
        if h.ndim != 4 or h.shape[1] != self.channels:
            raise ConfigError(
                f"synthesizer built for (N, {self.channels}, H, W) feature maps, got {tuple(h.shape)}"
            )
        c = self._label(h, labels)
        if c is not None:
            planes = c[:, :, None, None].expand(-1, -1, h.shape[2], h.shape[3])
            h = torch.cat([h, planes], dim=1)
        return self.net(h)


def make_synthesizer(
    example_activation_shape: Sequence[int],
    hidden_layers: int = 0,
    num_classes: int | None = None,
    **options,
) -> _Synthesizer:
    """The synthesizer for activations of ``example_activation_shape`` (batch dim first,
    i.e. ``h.shape``): a ``ConvSynthesizer`` for ``(N, C, H, W)`` feature maps, an
    ``MLPSynthesizer`` for everything else (flattened). ``options`` go to the constructor
    (``hidden`` for MLP, ``hidden_channels``/``kernel`` for conv)."""
    shape = tuple(int(s) for s in example_activation_shape)
    if len(shape) < 2:
        raise ConfigError(f"activation shape must have a batch dimension first, e.g. (N, F); got {shape}")
    if len(shape) == 4:
        return ConvSynthesizer(shape[1], hidden_layers, num_classes, **options)
    return MLPSynthesizer(math.prod(shape[1:]), hidden_layers, num_classes=num_classes, **options)
