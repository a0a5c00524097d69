"""DNI and cDNI stages: update at once with a synthetic gradient, learn it when the real one comes.

Decoupled neural interfaces (Jaderberg et al. 2016, arXiv 1608.05343; conditional DNI,
Czarnecki et al. 2017). A non-last stage owns a synthetic-gradient module ``sg``
(``brigade.stages.synthetic``) that predicts dL/dh from its output h (and, for cDNI, the
label). One action ``forward`` (the schedule's ``S``) does, for microbatch ``mb``::

    h = module(x)                      (with autograd)
    g = sg(h.detach(), label)          (the predicted dL/dh)
    backward(h, g)                     -> parameter gradients and dx = dL/dx
    optimizer.step()                   (at once: the stage never waits for the others)
    keep (h, label) for mb             until its target arrives
    return (h, dx)                     h goes forward, dx backward

The last stage has no module to predict with: it computes the loss (times ``weight``, like
the backprop ``Stage``), backpropagates it, steps, and returns (loss, dL/dx).

The ``dx`` a stage returns is the regression target of the PREVIOUS stage's ``sg``
(``train_sg``, the schedule's ``T``): the true gradient at the last boundary, elsewhere the
stage's own synthetic gradient carried back through it, i.e. bootstrapped as in Jaderberg et
al. (their Fig. 2). ``train_sg`` regresses ``sg(h, label)`` onto it by mean squared error
(times ``sg_loss_weight``), takes one step of the SG optimizer and frees the kept h.

Keeping the synthetic gradient on the scale of the true one (issue 5: with SGD lr 0.05,
``brigade train --model mlp --data mnist --method dni`` gave NaN at step 9, cdni at 14).
Root cause: the SG targets are dL/dh of a microbatch's mean loss, ~1e-4 per element, but the
SG's Adam (lr 1e-3) moves each weight by ~lr per step regardless of its gradient's size; from
the zero-initialised last layer, fed by 1024 hidden units, the first steps made the SG predict
~500x the true gradient (|sg| 32 vs |dL/dh| 0.06 for a microbatch), stage 0 stepped along that
with lr 0.05, its weight norm went 18 -> 85 in four microbatches, and the loss blew up. The
model's lr was not the problem: backprop with one update per microbatch at lr 0.05 is stable.
Three changes, all on by default:

- ``sg_normalize=True``: the SG regresses the target in units of its running RMS and predicts
  ``scale * raw`` (``brigade.stages.synthetic``): the regression is O(1) for any loss, batch
  or layer scale, so Adam's step is relative to the target. ``train_sg`` then returns the
  normalised MSE (1.0 = as good as predicting zero). ``sg_normalize=False`` is the plain MSE.
- ``sg_clip=3.0``: each example's synthetic gradient is capped at ``sg_clip`` times the
  typical norm of a true target's example (running RMS x sqrt(elements)), so no SG, however
  badly trained, can move the stage much further than true gradients would; ``clipped``
  counts the examples it caught (none in the MNIST runs: it is a guard). None turns it off;
  it needs ``sg_normalize`` (the typical norm is the running RMS that normalising keeps),
  so with ``sg_normalize=False`` nothing is clipped.
- ``sg_lr_scaling=True``: with the scale fixed, one SG step moves the prediction by about
  lr x (sum of the last layer's |inputs|) relative to the target, i.e. in proportion to the
  fan-in: normalised, Adam 1e-3 suited the 1024-unit MNIST synthesizer but left a 16- or
  32-unit one learning ~30x too slowly (the best rates measured: 1e-3 and 1e-2..3e-2). So
  each SG layer's rate is ``sg_lr * 1024 / fan_in`` (at most 32x; ``synthetic.param_groups``),
  and ``sg_lr`` is the rate of a 1024-input layer; False gives every layer ``sg_lr``. A
  callable ``sg_optimizer`` gets the plain parameters and chooses its own rates.

The rest stays the paper's setting: a zero-initialised last layer, one hidden layer, Adam for
the SG (base rate 1e-3), the model's own optimizer for the stage; the default SGD lr 0.05
(and 0.2) now trains the MNIST MLP with dni and cdni (bench/unlocked_mnist.py).

``update_prob`` < 1 makes each ``forward`` apply its update only with that probability (a
seeded draw per call; the gradient is dropped otherwise), as in the paper's experiments
with stages updating at different rates; ``dx`` is computed either way.

The synthetic-gradient module is created at the first ``forward`` of a non-last stage (its
shape is known only then), from a seed of its own, so creating it does not disturb the
global random stream. ``state_dict_extra`` / ``load_state_dict_extra`` carry it and its
optimizer for checkpoints.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import handlers
from .base import StageBase
from .errors import ConfigError, choose
from .method_cost import DNI_COST
from .probes import SYNTHETIC_GRADIENT_PROBE
from .rules import (CostHooks, Exposure, Message, MethodSpec, _options_as_kwargs,
                    activation_size, batch_size, num_classes_of, register_method)
from .stage import OptimizerFactory, StageSpec
from .synthetic import param_groups, synthesizer_for, synthesizer_optimizer

__all__ = ["DNIStage", "DNIOptions", "SG_OPTIMIZERS"]

SG_OPTIMIZERS = ("adam", "sgd")


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes of the storages behind ``tensors``, each storage once (as ``Stage`` counts)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


class DNIStage(StageBase):
    """A slice of the model trained with (conditional) decoupled neural interfaces."""

    def __init__(
        self,
        module: nn.Module,
        spec: StageSpec,
        optimizer_factory: OptimizerFactory | None = None,
        loss_fn: nn.Module | None = None,
        device: torch.device | str = "cpu",
        *,
        conditioned: bool = False,
        num_classes: int | None = None,
        sg_hidden_layers: int = 1,
        sg_hidden: int | None = None,
        sg_lr: float = 1e-3,
        sg_optimizer: str | OptimizerFactory = "adam",
        sg_loss_weight: float = 1.0,
        update_prob: float = 1.0,
        seed: int = 0,
        sg_options: dict | None = None,
        sg_normalize: bool = True,
        sg_clip: float | None = 3.0,
        sg_lr_scaling: bool = True,
        sg_calibrate: bool = False,
    ) -> None:
        self._setup(module, spec, optimizer_factory, loss_fn, device)
        if conditioned and not (isinstance(num_classes, int) and num_classes > 0):
            raise ConfigError(f"cDNI (conditioned=True) needs num_classes, a positive integer; got {num_classes!r}")
        if not 0.0 <= update_prob <= 1.0:
            raise ConfigError(f"update_prob must lie in [0, 1]; got {update_prob}")
        if sg_loss_weight < 0:
            raise ConfigError(f"sg_loss_weight must be >= 0; got {sg_loss_weight}")
        if sg_clip is not None and not sg_clip > 0:
            raise ConfigError(f"sg_clip must be > 0 (or None for no clipping); got {sg_clip}")
        self.conditioned = conditioned
        self.num_classes = num_classes if conditioned else None
        self.sg_hidden_layers = sg_hidden_layers
        self.sg_hidden = sg_hidden
        self.sg_lr = sg_lr
        self.sg_optimizer_kind = sg_optimizer if callable(sg_optimizer) else choose(
            "synthetic-gradient optimizer", sg_optimizer, SG_OPTIMIZERS)
        self.sg_loss_weight = sg_loss_weight
        self.update_prob = update_prob
        self.seed = seed
        self.sg_options = dict(sg_options or {})
        self.sg_normalize = bool(sg_normalize)
        self.sg_clip = sg_clip
        self.sg_lr_scaling = bool(sg_lr_scaling)
        self.sg_calibrate = bool(sg_calibrate)
        self._fit = torch.zeros(2, dtype=torch.float64)  # running <sg, target>, |sg|²
        self.clipped = 0  # examples whose synthetic gradient was clipped
        self.sg: nn.Module | None = None
        self.sg_optimizer: torch.optim.Optimizer | None = None
        self._sg_shape: tuple[int, ...] | None = None
        self._draws = torch.Generator().manual_seed(seed * 1_000_003 + spec.index)
        self._kept: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._sg_losses: list[float] = []
        self.updates = 0  # optimizer steps taken (update_prob < 1 skips some)
        # Weight versions between a microbatch's forward (its own step included) and the
        # arrival of its SG target (the probes' staleness; the dni schedule's lag).
        self._version: dict[int, int] = {}
        self.target_staleness = {"sum": 0, "count": 0, "max": 0}

    # -- the synthetic-gradient module ------------------------------------------------
    def _build_sg(self, shape: tuple[int, ...]) -> None:
        """Create the SG module for activations of ``shape`` from this stage's own seed."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + self.spec.index + 1)
            sg = synthesizer_for(shape, self.sg_hidden_layers, self.num_classes, self.sg_hidden,
                                 self.sg_options)
        self.sg = sg.to(self.device)
        self._sg_shape = tuple(shape)
        if callable(self.sg_optimizer_kind):
            self.sg_optimizer = self.sg_optimizer_kind(self.sg.parameters())
        else:
            groups = param_groups(self.sg, self.sg_lr, self.sg_lr_scaling)
            self.sg_optimizer = synthesizer_optimizer(groups, self.sg_optimizer_kind, self.sg_lr)

    def synthetic_gradient(self, h: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """The SG module's prediction of dL/dh (no graph); builds the module if needed."""
        if self.spec.is_last:
            raise ConfigError(f"stage {self.spec.index} is the last stage: it has no synthetic-gradient module")
        if self.sg is None:
            self._build_sg(tuple(h.shape))
        with torch.no_grad():
            g = self._clip(self.sg(h.detach(), self._label(label)))
            return g * self.trust if self.sg_calibrate else g  # off: no extra pass over g

    @property
    def trust(self) -> float:
        """The factor on the synthesizer's prediction with ``sg_calibrate=True``: the
        least-squares multiple ``<sg, target> / |sg|²`` over recent targets, in [0, 1] (1
        until measured, and always 1 without ``sg_calibrate``). A synthesizer that stops
        fitting its targets then moves its stage less instead of feeding a runaway: with the
        MNIST MLP cut after its second block, SGD 0.05, runs of 24 steps, the loss went to
        NaN by step 15 without it and fell to ~1.0 with it (tests/test_dni.py). Off by
        default: on the default cut it changed cdni's 5-epoch accuracy by -0.7 / +0.5
        points (seeds 0 / 1), and at dni's default SGD 0.1 the deep cut diverges with it
        too."""
        if not self.sg_calibrate:
            return 1.0
        num, den = float(self._fit[0]), float(self._fit[1])
        return 1.0 if den <= 0 else min(1.0, max(0.0, num / den))

    def _calibrate(self, h: torch.Tensor, label: torch.Tensor | None, target: torch.Tensor) -> None:
        """Fold one target into the running fit of the prediction to it (decay 0.9)."""
        if not self.sg_calibrate:
            return
        with torch.no_grad():
            g = self._clip(self.sg(h, label)).double()
            now = torch.stack([(g * target.double()).sum(), g.pow(2).sum()])
        self._fit.mul_(0.9).add_(now, alpha=0.1)

    def _clip(self, g: torch.Tensor) -> torch.Tensor:
        """Cap each example's synthetic gradient at ``sg_clip`` times the typical size of a
        true target's example (the running RMS per element times sqrt(elements)). Before
        the first target there is no scale to compare with: nothing is clipped."""
        if self.sg_clip is None or int(self.sg.targets_seen) == 0 or g.ndim == 0:
            return g
        flat = g.reshape(g.shape[0], -1)
        limit = self.sg_clip * float(self.sg.scale) * flat.shape[1] ** 0.5
        norms = flat.norm(dim=1, keepdim=True)
        over = norms > limit
        if not bool(over.any()):
            return g
        self.clipped += int(over.sum())
        factor = torch.where(over, limit / norms.clamp_min(1e-30), torch.ones_like(norms))
        return (flat * factor).reshape(g.shape)

    def _label(self, label: torch.Tensor | None) -> torch.Tensor | None:
        if not self.conditioned:
            return None
        if label is None:
            raise ConfigError(f"stage {self.spec.index}: cDNI forward needs the microbatch's labels (label=...)")
        return label.to(self.device)

    # -- forward: the schedule's S --------------------------------------------------------
    def forward(
        self,
        mb: int,
        x: torch.Tensor,
        target: torch.Tensor | None = None,
        weight: float = 1.0,
        label: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward, backward from the synthetic (or, last stage, true) gradient, and update.

        Returns ``(out, grad_in)``: ``out`` is the detached output (last stage: the scaled
        loss, a 0-d tensor) to send forward; ``grad_in`` is dL/dx to send backward as the
        previous stage's SG target (None on the first stage).
        """
        x = x.to(self.device)
        self.module.zero_grad(set_to_none=True)  # each forward's update is self-contained
        need_dx = not self.spec.is_first and x.is_floating_point()
        inp = x.detach().requires_grad_(need_dx)
        with torch.enable_grad():
            out = self.module(inp)
            if self.spec.is_last:
                if target is None:
                    raise ConfigError(f"stage {self.spec.index}: last stage forward needs a target")
                loss = self.loss_fn(out, target.to(self.device)) * weight
                loss.backward()
                result = loss.detach()
                self._losses.append(float(result))
            else:
                label = self._label(label)
                g = self.synthetic_gradient(out, label)
                out.backward(g)
                result = out.detach()
                self._kept[mb] = (result, label)
                self.peak_stored_bytes = max(self.peak_stored_bytes, self.stored_bytes())
        dx = inp.grad if need_dx else None
        self._maybe_step()
        if not self.spec.is_last:
            self._version[mb] = self.updates
        return result, dx

    def _maybe_step(self) -> None:
        if self.optimizer is None:
            return
        if self.update_prob >= 1.0 or float(torch.rand((), generator=self._draws)) < self.update_prob:
            self.optimizer.step()
            self.updates += 1
        self.optimizer.zero_grad(set_to_none=True)

    # -- the SG's training: the schedule's T ----------------------------------------------
    def train_sg(self, mb: int, target_grad: torch.Tensor) -> float:
        """Regress ``sg(h_mb, label)`` onto ``target_grad`` (the gradient the next stage
        sent back for ``mb``); one SG optimizer step; free what ``forward`` kept. Returns
        the SG loss (mean squared error times ``sg_loss_weight``)."""
        if self.spec.is_last:
            raise ConfigError(f"stage {self.spec.index} is the last stage: it has no synthetic gradient to train")
        try:
            h, label = self._kept.pop(mb)
        except KeyError:
            raise ConfigError(
                f"stage {self.spec.index}: train_sg({mb}) before forward({mb}) "
                f"(kept microbatches: {sorted(self._kept)})"
            ) from None
        lag = self.updates - self._version.pop(mb, self.updates)
        st = self.target_staleness
        st["sum"], st["count"], st["max"] = st["sum"] + lag, st["count"] + 1, max(st["max"], lag)
        target_grad = target_grad.to(self.device).detach()
        if target_grad.shape != h.shape:
            raise ConfigError(
                f"stage {self.spec.index}: SG target of shape {tuple(target_grad.shape)} for an "
                f"activation of shape {tuple(h.shape)}"
            )
        self._calibrate(h, label, target_grad)
        with torch.enable_grad():
            loss = self.sg.regression_loss(h, target_grad, label, self.sg_normalize) * self.sg_loss_weight
            self.sg_optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.sg_optimizer.step()
        value = float(loss.detach())
        self._sg_losses.append(value)
        return value

    # -- the rest of the dispatch table ---------------------------------------------------
    def update(self) -> None:
        """No-op: a DNI stage updates inside ``forward``. Kept for the dispatch table."""

    def pop_sg_losses(self) -> list[float]:
        """SG regression losses of ``train_sg`` since the previous call."""
        out, self._sg_losses = self._sg_losses, []
        return out

    @property
    def stored_microbatches(self) -> int:
        """How many microbatches' (h, label) this stage holds, waiting for their SG target."""
        return len(self._kept)

    def stored_bytes(self) -> int:
        """Bytes held between ``forward`` and ``train_sg``: the outputs h and the labels."""
        return sum(tensor_bytes(h, label) for h, label in self._kept.values())

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict_extra(self) -> dict[str, Any]:
        """The SG module and its optimizer (None before the first forward / on the last stage)."""
        if self.sg is None:
            return {"sg_shape": None, "sg": None, "sg_optimizer": None,
                    "staleness": dict(self.target_staleness)}
        return {
            "sg_shape": self._sg_shape,
            "sg": self.sg.state_dict(),
            "sg_optimizer": self.sg_optimizer.state_dict(),
            "staleness": dict(self.target_staleness),
            "fit": self._fit.clone(),
        }

    def load_state_dict_extra(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict_extra`` returned (building the SG module if needed)."""
        if state.get("sg") is None:
            return
        if self.sg is None:
            self._build_sg(tuple(state["sg_shape"]))
        self.sg.load_state_dict(state["sg"])
        self.sg_optimizer.load_state_dict(state["sg_optimizer"])
        if "fit" in state:
            self._fit = state["fit"].clone().to(torch.float64)


# ---------------------------------------------------------------------------------------
# The declaration of dni and cdni (brigade.stages.rules)
# ---------------------------------------------------------------------------------------
# The options' defaults are DNIStage's own keyword defaults, read from its signature, so
# that the stage class stays the one place they are set.
_DEFAULTS = {k: p.default for k, p in inspect.signature(DNIStage.__init__).parameters.items()
             if p.kind is inspect.Parameter.KEYWORD_ONLY}


@dataclass(frozen=True)
class DNIOptions:
    """The options of dni and cdni (``Pipeline(method="dni", sg_lr=...)``), checked once."""

    sg_lr: float | None = field(default=None, metadata={
        "flag": "--sg-lr", "help": "synthetic-gradient module learning rate (the base rate "
                                   "of a 1024-input layer)",
        "default_help": "dni 1e-3, cdni 1e-4"})
    sg_hidden_layers: int = field(default=_DEFAULTS["sg_hidden_layers"], metadata={
        "flag": "--sg-hidden-layers",
        "help": "hidden layers of the synthesizer, 0-2"})
    sg_hidden: int | None = field(default=_DEFAULTS["sg_hidden"], metadata={
        "flag": "--sg-hidden",
        "help": "the synthesizer's hidden width, at most the activation's",
        "default_help": "dni 64, cdni 256"})
    lag: int | None = field(default=None, metadata={
        "flag": "--sg-lag", "schedule": True, "default_help": "the dni schedule's, 1",
        "help": "microbatches a stage runs ahead before it trains its synthesizer on a "
                "target (the dni schedule's lag)"})
    update_prob: float = field(default=_DEFAULTS["update_prob"], metadata={
        "flag": "--update-prob", "help": "probability that a stage updates on a microbatch"})
    sg_optimizer: Any = field(default=_DEFAULTS["sg_optimizer"], metadata={
        "help": f"the synthesizer's optimizer: {', '.join(SG_OPTIMIZERS)}, or a factory"})
    sg_loss_weight: float = field(default=_DEFAULTS["sg_loss_weight"],
                                  metadata={"help": "weight of the SG regression loss"})
    sg_normalize: bool = field(default=_DEFAULTS["sg_normalize"],
                               metadata={"help": "regress in units of the targets' running RMS"})
    sg_clip: float | None = field(default=_DEFAULTS["sg_clip"], metadata={
        "help": "cap each example's SG at this many typical true-gradient norms (None: off)"})
    sg_lr_scaling: bool = field(default=_DEFAULTS["sg_lr_scaling"],
                                metadata={"help": "scale each SG layer's rate by 1024 / fan-in"})
    sg_calibrate: bool = field(default=_DEFAULTS["sg_calibrate"], metadata={
        "flag": "--sg-calibrate", "help": "scale the SG by its measured fit to the true "
                                          "gradients, in [0, 1] (steadies deep cuts)"})
    sg_options: dict | None = field(default=_DEFAULTS["sg_options"],
                                    metadata={"help": "keywords of make_synthesizer"})
    seed: int = field(default=_DEFAULTS["seed"],
                      metadata={"help": "seed of the synthesizer's init and update draws"})
    num_classes: int | None = field(default=_DEFAULTS["num_classes"], metadata={
        "help": "classes of the labels (cdni; default: the model's last Linear width)"})

    def __post_init__(self) -> None:
        if isinstance(self.sg_hidden_layers, bool) or self.sg_hidden_layers not in (0, 1, 2):
            raise ConfigError(f"sg_hidden_layers={self.sg_hidden_layers!r}: a synthesizer has "
                              "0, 1 or 2 hidden layers")
        if self.sg_hidden is not None and (isinstance(self.sg_hidden, bool) or not (
                isinstance(self.sg_hidden, int) and self.sg_hidden > 0)):
            raise ConfigError(f"sg_hidden={self.sg_hidden!r}: the synthesizer's hidden width "
                              "must be a positive integer (or None for the rule's default)")
        if self.sg_lr is not None and (isinstance(self.sg_lr, bool) or not (
                isinstance(self.sg_lr, (int, float)) and self.sg_lr > 0)):
            raise ConfigError(f"sg_lr={self.sg_lr!r} must be a positive number (or None for "
                              "the rule's default)")
        if self.lag is not None and (isinstance(self.lag, bool) or not (
                isinstance(self.lag, int) and self.lag >= 0)):
            raise ConfigError(f"lag={self.lag!r} (--sg-lag) must be an integer >= 0 (or None "
                              "for the schedule's default)")
        if not 0.0 <= self.update_prob <= 1.0:
            raise ConfigError(f"update_prob must lie in [0, 1]; got {self.update_prob}")
        if self.sg_loss_weight < 0:
            raise ConfigError(f"sg_loss_weight must be >= 0; got {self.sg_loss_weight}")
        if self.sg_clip is not None and not self.sg_clip > 0:
            raise ConfigError(f"sg_clip must be > 0 (or None for no clipping); got {self.sg_clip}")
        if not callable(self.sg_optimizer):
            choose("synthetic-gradient optimizer", self.sg_optimizer, SG_OPTIMIZERS)
        if self.num_classes is not None and not (
                isinstance(self.num_classes, int) and self.num_classes > 0):
            raise ConfigError(f"num_classes={self.num_classes!r} must be a positive integer")


def _prepare(conditioned: bool, sg_hidden: int, sg_lr: float):
    """The stage keywords on the driver: the rule's synthesizer width and rate unless they
    are given, and cDNI reads the class count off the model."""
    def prepare(options: DNIOptions, model: nn.Module, schedule: Any) -> dict[str, Any]:
        kwargs = _options_as_kwargs(options, model, schedule)
        if kwargs["sg_hidden"] is None:
            kwargs["sg_hidden"] = sg_hidden
        if kwargs["sg_lr"] is None:
            kwargs["sg_lr"] = sg_lr
        if conditioned and kwargs["num_classes"] is None:
            kwargs["num_classes"] = num_classes_of(model, "cdni")
        return kwargs
    return prepare


def _needs_s(port: handlers.Port, a) -> list:
    s, j = a.stage, a.microbatch
    if s == port.num_stages - 1:
        return [("x", s, j), ("y", j)]
    return [("x", s, j), *handlers.label_key(port, s, j)]


def _run_s(port: handlers.Port, a) -> None:
    """S: forward, update from the synthetic gradient, send h on and dL/dx back.

    Each microbatch is its own update, so the last stage's loss is the microbatch mean
    (weight 1); the recorded loss is weighted by n_j / N to report the batch mean.
    """
    s, j = a.stage, a.microbatch
    last = s == port.num_stages - 1
    x = port.take(("x", s, j))
    target, weight, label = None, 1.0, None
    if last:
        target, weight = port.take(("y", j))
    else:
        label = handlers.take_label(port, s, j)[0]
    out, grad_in = port.stage(s).forward(j, x, target, 1.0, label=label)
    if last:
        port.loss(j, float(out) * weight)
    else:
        port.send(a, ("x", s + 1, j), out)
    if s > 0 and grad_in is not None:
        port.send(a, ("g", s - 1, j), grad_in)


def _needs_t(port: handlers.Port, a) -> list:
    return [("g", a.stage, a.microbatch)]


def _run_t(port: handlers.Port, a) -> None:
    """T: regress the synthetic gradient onto the gradient that came back."""
    port.stage(a.stage).train_sg(a.microbatch, port.take(("g", a.stage, a.microbatch)))


_HANDLERS = {"F": handlers.forward, "S": handlers.Handler(_run_s, _needs_s),
             "T": handlers.Handler(_run_t, _needs_t)}
_H = Message("activation h", "B·F", activation_size)
_DX = Message("dL/dx (the previous stage's SG target)", "B·F", activation_size)


def _dni_exposure(stage: int, stages: int, options: Any) -> Exposure:
    """Only the stage before the last receives a true gradient (its SG target); the
    others' targets are bootstrapped from synthetic ones."""
    return Exposure(inputs=stage == 0, labels=stage == stages - 1,
                    true_gradients=stage == stages - 2)


def _cdni_exposure(stage: int, stages: int, options: Any) -> Exposure:
    """As dni, and every stage's synthesizer sees the labels."""
    return Exposure(inputs=stage == 0, labels=True, true_gradients=stage == stages - 2)


def _per_microbatch(options: Any, microbatches: int) -> float:
    """Every microbatch is its own update."""
    return float(microbatches)


# Defaults measured on the MNIST MLP, 2 stages, m = 4, 5 epochs (backprop at its own
# defaults, momentum 0.9 lr 0.05 constant: 0.965). Plain SGD, because momentum piles up
# the synthetic gradients' bias (45-48% after an epoch); a higher rate than backprop's,
# because m per-microbatch steps of loss/m add up to one plain-SGD step of lr per batch;
# cosine decay, because at a constant rate the bias wins late in the run (dni lr 0.1:
# 0.943 after 2 epochs, 0.911 after 5; cosine 0.951). cdni: lr 0.1 0.954, 0.15 0.961.
# The synthesizer's hidden width. A full-width one (1024 -> 1024 -> 1024 on the MLP) is two
# layers as big as the stage's own, run and trained per microbatch: on Ray stage 0 was busy
# 59 s of a 60 s run (580 samples/s, stage 1 idle 85%). A 64-unit bottleneck trains dni as
# well (0.955 / 0.951 / 0.956 for seeds 0-2, against 0.951 / 0.958 at full width) at
# 3,549 samples/s; cdni needs more (64: 0.940 / 0.944; 256: 0.962 / 0.952; full: 0.961 /
# 0.951), since its synthesizer also reads the label.
DNI_SG_HIDDEN, CDNI_SG_HIDDEN = 64, 256
# The synthesizer's rate. The true dL/dh is dominated by the few examples the network still
# gets wrong, which (h, y) cannot tell apart: tracking it online while the MLP trains by
# backprop, cdni's synthesizer reaches a cosine of only ~0.03-0.08 to the true gradient at
# rate 1e-3 or 1e-4 (and 0.1 on average in a cdni run, by its probes), so its prediction is
# mostly noise at the true gradient's norm, and a stage whose features stay frozen does as
# well (seed 1: 0.952, as cdni). A slower synthesizer moves stage 0 by less of that noise:
# cdni at 1e-4 gave 0.966 / 0.958 / 0.965 for seeds 0-2 against 0.962 / 0.952 / 0.961 at
# 1e-3 (backprop 0.965 / 0.970 / 0.954; 3e-4: 0.963 / 0.956; 3e-3: seed 1 0.944). dni keeps
# 1e-3, the stage class's own default: 1e-4 gave 0.959 / 0.950 against 0.955 / 0.951.
# With the fused Adam kernel (synthetic.synthesizer_optimizer; the same update, rounded
# differently) the defaults gave cdni 0.965 / 0.959 / 0.963 and dni 0.952 / 0.952 / 0.959.
DNI_SG_LR, CDNI_SG_LR = _DEFAULTS["sg_lr"], 1e-4
# The dni schedule's lag (``--sg-lag``) stays 1. With lag 1 stage 0 runs T(j) right after
# S(j+1) and waits for dL/dh_j whenever stage 1's S takes longer than its own (MNIST MLP,
# microbatch 16: ~7.8 against ~5.4 ms); lag 2 removes most of that wait (1 epoch on Ray, two
# interleaved rounds: dni's worst-stage idle 0.178 / 0.209 -> 0.153 / 0.094, cdni 8-13% more
# samples/s) but trains worse on the staler synthesizer: 5 epochs, seeds 0-2, dni 0.956 /
# 0.939 / 0.954 and cdni 0.963 / 0.953 / 0.964 against lag 1's figures above.
_COMMON = dict(stage_class=DNIStage, schedules=("dni",), handlers=_HANDLERS, options=DNIOptions,
               default_lr_schedule="cosine", backward=(_DX,),
               updates_per_step=_per_microbatch,
               costs=CostHooks(balancer=DNI_COST),  # its synthesizer's work lands before a cut
               probe=SYNTHETIC_GRADIENT_PROBE,  # the synthesizer against the true dL/dh
               reference="Jaderberg et al. 2016 (arXiv 1608.05343)")
register_method(MethodSpec(
    name="dni", order=20, forward=(_H,), exposure=_dni_exposure,
    prepare=_prepare(False, DNI_SG_HIDDEN, DNI_SG_LR),
    summary="synthetic gradients: update at once from a predicted dL/dh, learn it later",
    default_optimizer=("sgd", 0.1), **_COMMON))
register_method(MethodSpec(
    name="cdni", order=30, forward=(_H, Message("labels (driver -> every stage)", "B", batch_size)),
    exposure=_cdni_exposure, prepare=_prepare(True, CDNI_SG_HIDDEN, CDNI_SG_LR),
    fixed={"conditioned": True},
    summary="dni whose synthesizer also sees the label (Czarnecki et al. 2017)",
    default_optimizer=("sgd", 0.15), **_COMMON))
