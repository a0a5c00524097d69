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

Target scale (the fix for DNI diverging on MNIST, issue 5). A module predicts
``scale * raw(h)``, where ``scale`` is the running RMS of the regression targets it has seen
(a debiased exponential average of ``mean(target**2)``, momentum ``scale_momentum``; 1 before
the first), and ``regression_loss`` is the L2 loss in those units, ``mse(raw(h), target /
scale)``. Why: the targets are gradients of a microbatch's MEAN loss, ~1e-4 per element for
the 1024-wide MLP on MNIST (and smaller the larger the microbatch), while Adam, the SG's
default optimizer, moves every weight by ~lr per step whatever the size of its gradient. From
the zero-initialised last layer one Adam step moved every output by about lr x (sum of the
1024 hidden activations), ~0.3: a prediction ~500x the true gradient after one step; the
stage stepped along it with the model's SGD lr 0.05, its weights grew 5x within four
microbatches and the loss became NaN at step 9. Measured in units of its own targets the
regression is O(1) whatever the loss, batch size, microbatch count or layer: Adam's step is a
step relative to the target, the prediction starts on the right scale, and the loss reported
by ``DNIStage.train_sg`` (and ``pop_sg_losses``) is a normalised MSE (1.0 = no better than
predicting zero). The scale lives in buffers, so checkpoints carry it.

Learning rate by fan-in (``param_groups``). In those units one step still moves a layer's
output by about lr x (sum of its |inputs|), so a rate that suits a 1024-unit synthesizer is
~30x too slow for a 32-unit one; ``DNIStage`` therefore gives each layer ``lr * 1024 /
fan_in`` (at most 32x), muP's rule for Adam.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError

_TINY = 1e-30  # the scale's floor: all-zero targets must not divide by zero

__all__ = ["MLPSynthesizer", "ConvSynthesizer", "make_synthesizer", "synthesizer_for", "one_hot", "param_groups",
           "synthesizer_optimizer", "REFERENCE_FAN_IN"]

REFERENCE_FAN_IN = 1024  # the fan-in at which a layer's learning rate is the base lr
MAX_LR_MULTIPLIER = 32.0  # narrow layers: at most 32x the base lr (fan-in 32 and below)


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
    """Shared parts: the label check and the target scale (see the module docstring).

    ``forward(h, labels)`` is ``scale * net(h, labels)``; ``scale`` is 1 until the first
    ``regression_loss`` and then the running RMS of the targets seen, so ``net`` learns the
    gradient in units of its typical size.
    """

    num_classes: int | None

    def __init__(self, scale_momentum: float = 0.99) -> None:
        super().__init__()
        if not 0.0 <= scale_momentum < 1.0:
            raise ConfigError(f"scale_momentum must lie in [0, 1); got {scale_momentum}")
        self.scale_momentum = scale_momentum
        # Debiased running mean of target**2 (as Adam debiases its moments): the scale is
        # the first target's RMS at once, not a ramp up from zero.
        self.register_buffer("target_sq_avg", torch.zeros(()))
        self.register_buffer("targets_seen", torch.zeros((), dtype=torch.long))

    @property
    def scale(self) -> Tensor:
        """RMS of the regression targets seen so far (1 before the first)."""
        n = int(self.targets_seen)
        if n == 0:
            return torch.ones((), device=self.target_sq_avg.device)
        mean_sq = self.target_sq_avg / (1.0 - self.scale_momentum ** n)
        return mean_sq.sqrt().clamp_min(_TINY)

    @torch.no_grad()
    def observe(self, target: Tensor) -> None:
        """Fold one target's mean square into the running scale."""
        b = self.scale_momentum
        self.target_sq_avg.mul_(b).add_((1.0 - b) * target.detach().float().pow(2).mean())
        self.targets_seen.add_(1)

    def raw(self, h: Tensor, labels: Tensor | None = None) -> Tensor:
        """The prediction in units of ``scale`` (what the layers output)."""
        raise NotImplementedError

    def forward(self, h: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.raw(h, labels) * self.scale.to(h.dtype)

    def regression_loss(self, h: Tensor, target: Tensor, labels: Tensor | None = None,
                        normalize: bool = True) -> Tensor:
        """L2 regression onto ``target`` (dL/dh as it came back). With ``normalize`` the
        target is first folded into the running scale and the loss is the mean squared
        error in units of that scale, ``mse(raw, target / scale)``, i.e. ``mse(sg(h),
        target) / scale**2``: the same O(1) problem whatever the loss, batch or layer
        scale. Without it, the plain ``mse(sg(h), target)``."""
        if not normalize:
            return F.mse_loss(self(h, labels), target)
        self.observe(target)
        s = self.scale.to(target.dtype)
        return F.mse_loss(self.raw(h, labels), target / s)

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
        scale_momentum: float = 0.99,
    ) -> None:
        super().__init__(scale_momentum)
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

    def raw(self, h: Tensor, labels: Tensor | None = None) -> Tensor:
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
        scale_momentum: float = 0.99,
    ) -> None:
        super().__init__(scale_momentum)
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

    def raw(self, h: Tensor, labels: Tensor | None = None) -> Tensor:
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


def synthesizer_for(
    example_activation_shape: Sequence[int],
    hidden_layers: int = 0,
    num_classes: int | None = None,
    hidden: int | None = None,
    options: dict | None = None,
) -> _Synthesizer:
    """``make_synthesizer`` with a hidden width of at most ``hidden`` (units of a flat
    synthesizer, channels of a conv one; None: the activation's own width): the DNI stage
    and the balancer's cost hook build the same module through this one call."""
    shape = tuple(int(s) for s in example_activation_shape)
    options = dict(options or {})
    if hidden is not None:
        key, width = ("hidden_channels", shape[1]) if len(shape) == 4 else ("hidden", math.prod(shape[1:]))
        options.setdefault(key, min(int(hidden), width))
    return make_synthesizer(shape, hidden_layers, num_classes, **options)


def param_groups(sg: nn.Module, lr: float, scale_by_fan_in: bool = True) -> list[dict]:
    """Optimizer parameter groups for ``sg``: one per layer, with learning rate
    ``lr * REFERENCE_FAN_IN / fan_in`` (at most ``MAX_LR_MULTIPLIER * lr``), or ``lr`` for
    every layer when ``scale_by_fan_in`` is False.

    Why: with targets in units of their scale, one step moves a layer's output by about
    lr x (sum of its |inputs|), for Adam (each weight moves ~lr) and for SGD alike, i.e. in
    proportion to the fan-in. Scaling the rate by 1/fan-in makes the relative step the same
    for a 16-unit and a 1024-unit synthesizer (measured best: Adam 1e-3 at 1024 inputs,
    1e-2..3e-2 at 16-32), so one default serves both; at 1024 inputs (the MNIST MLP) the
    rate is ``lr`` itself. (This is muP's rule for Adam on hidden and output layers.)
    """
    groups = []
    for layer in sg.modules():
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            continue
        params = [p for p in layer.parameters(recurse=False) if p.requires_grad]
        fan_in = layer.weight[0].numel()  # in_features, or in_channels x kernel area
        mult = min(MAX_LR_MULTIPLIER, REFERENCE_FAN_IN / fan_in) if scale_by_fan_in else 1.0
        groups.append({"params": params, "lr": lr * mult, "fan_in": fan_in})
    covered = {id(p) for g in groups for p in g["params"]}
    rest = [p for p in sg.parameters() if id(p) not in covered and p.requires_grad]
    if rest:
        groups.append({"params": rest, "lr": lr, "fan_in": None})
    return groups


def synthesizer_optimizer(groups: list[dict], kind: str, lr: float) -> torch.optim.Optimizer:
    """The synthesizer's optimizer (``kind`` "adam" or "sgd") over ``groups``, with torch's
    fused kernel where the parameters' device has one (CPU and CUDA alike).

    Why fused: the synthesizer steps once per microbatch on the stage before a cut, the
    busiest stage of a dni run. Adam's default per-tensor loop over the 0.53M parameters
    of cdni's 1034 -> 256 -> 1024 MNIST synthesizer took 4.8 ms a step on one CPU thread,
    the fused kernel 1.4 ms (the same update, one pass over each tensor). SGD gains
    little, but takes the same path."""
    cls = torch.optim.Adam if kind == "adam" else torch.optim.SGD
    params = [p for g in groups for p in g["params"]]
    if params and _fused_device(params):
        return cls(groups, lr=lr, fused=True)
    return cls(groups, lr=lr)


def _fused_device(params: list[Tensor]) -> bool:
    """Whether torch has fused optimizer kernels for every one of these (floating-point)
    parameters' devices."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    supported = set(_get_fused_kernels_supported_devices())
    return all(p.device.type in supported and p.is_floating_point() for p in params)
