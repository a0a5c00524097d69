"""One declaration per learning rule, and the registry that holds them.

A learning rule (backprop, stale, dni, cdni, petra, fwdgrad, dgl, or a user's own) is a
stage class plus one :class:`MethodSpec`: the single place the rest of brigade asks about
the rule — which schedules run it (the first is its default), its default optimizer, its
typed options (checked once, on the driver; the CLI's method flags come from their fields),
what crosses the wire per microbatch each way, what each stage is shown (raw inputs, labels,
true gradients), which handler runs each action kind and what messages it waits for, and
hooks for the simulator's and the balancer's costs. The pattern is torchtitan's
``TrainSpec`` / ``register_train_spec``.

Each built-in rule is declared at the bottom of its own stage module (``stages/dni.py``
declares dni and cdni); :func:`get_method` imports the built-in modules once. A user
registers a rule from their own code, without editing brigade::

    from brigade.stages.rules import MethodSpec, register_method
    register_method(MethodSpec(name="signsgd", stage_class=SignStage, ...))
    Pipeline(model, method="signsgd", ...)

Stage workers in other processes get the declaration with their ``WorkerSpec`` (the Ray
backend pickles a user's module by value), or import the modules named in the environment
variable ``BRIGADE_METHODS`` (comma-separated module names) at their first look-up.

Names are case-insensitive; an unknown name is an error that lists the registered ones.
This module's own code needs no torch; the built-in declarations (stage modules, which do)
load at the first look-up.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .errors import ConfigError

__all__ = ["MethodSpec", "Message", "Exposure", "CostHooks", "register_method", "get_method",
           "method_names", "unregister_method", "option_fields", "option_classes",
           "flag_key", "methods_taking", "one_update", "num_classes_of",
           "exposed", "backprop_exposure", "activation_size", "batch_size", "load_rules"]


@dataclass(frozen=True)
class Message:
    """One message a stage sends per microbatch: what it is and how many numbers it holds.

    ``numel(shape, options)`` gives the element count from the boundary activation's shape
    ``(B, *features)`` (and the rule's options, e.g. projections); ``formula`` says the same
    in words for ``brigade methods`` (``B·F`` for a (B, F) activation)."""

    what: str
    formula: str
    numel: Callable[[tuple[int, ...], Any], int]


@dataclass(frozen=True)
class Exposure:
    """What one stage ever receives: the raw inputs, the labels, true gradients (dL/dh of
    the real loss, exact or as PETRA rebuilds it). A stage with all three False could run
    on a resource that never sees the data nor anything derived from the labels' gradient."""

    inputs: bool
    labels: bool
    true_gradients: bool


@dataclass(frozen=True)
class CostHooks:
    """Method-aware costs. ``simulator(costs, options) -> costs`` adjusts the per-kind costs
    the simulator charges (e.g. an F that also runs a local backward). ``balancer`` is a
    ``brigade.stages.method_cost.CostHook``: how ``--balance-by method`` times one block
    and one cut's boundary work under the rule (dni: its synthesizer at the cut; dgl: its
    auxiliary head); a rule that has one is balanced by it by default. None: the plain
    costs (the balancer then times the rule as backprop)."""

    simulator: Callable[[Any, Any], Any] | None = None
    balancer: Any = None  # a method_cost.CostHook


def activation_size(shape: tuple[int, ...], options: Any = None) -> int:
    """Elements of one boundary activation of ``shape`` (B, *features)."""
    n = 1
    for d in shape:
        n *= int(d)
    return n


def batch_size(shape: tuple[int, ...], options: Any = None) -> int:
    """One number per example (labels)."""
    return int(shape[0])


def backprop_exposure(stage: int, stages: int, options: Any = None) -> Exposure:
    """Backprop's: the first stage sees the inputs, the last the labels, every other stage
    true gradients from the one after it."""
    return Exposure(inputs=stage == 0, labels=stage == stages - 1,
                    true_gradients=stage < stages - 1)


def one_update(options: Any, microbatches: int) -> float:
    """The default ``updates_per_step``: one optimizer step per training step."""
    return 1.0


def _options_as_kwargs(options: Any, model: Any, schedule: Any) -> dict[str, Any]:
    """The default ``prepare``: the options' fields, as the stage class's keywords."""
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
            if not f.metadata.get("schedule")}


@dataclass(frozen=True)
class _NoOptions:
    """A rule without options."""


@dataclass(frozen=True)
class MethodSpec:
    """Everything brigade asks about one learning rule (see the module docstring).

    - ``stage_class``: a ``StageBase`` subclass, built as ``stage_class(module, StageSpec,
      optimizer_factory, loss_fn, device, **fixed, **prepare(options, model, schedule))``.
    - ``schedules``: the schedules it runs under; the first is the default.
    - ``handlers``: action kind -> ``brigade.stages.handlers.Handler``; every kind of its
      schedules, and ``F`` (evaluation runs F on every rule).
    - ``options``: a frozen dataclass of the rule's options; a field with
      ``metadata["flag"]`` is a ``brigade train`` flag and config-file key of that name
      (``metadata["help"]`` its help), the others are Python keywords only;
      ``metadata["schedule"]`` marks a schedule option.
    - ``default_optimizer``: ``(name, lr)`` when the user names none; lr None: the
      optimizer's own default. ``default_lr_schedule``: the learning-rate schedule when
      the user names none (constant, cosine or step over the run's steps). ``optimizers``: the valid names where they differ from
      torch's (``optimizer_kind`` names them in errors); ``optimizer_factory(name, lr,
      train_config, total_steps)``: where they are built differently.
    - ``forward`` / ``backward``: the messages per microbatch each way.
    - ``exposure(stage, stages, options) -> Exposure``: also what the driver sends (labels
      go to an earlier stage only if its exposure says so).
    - ``prepare(options, model, schedule) -> stage keywords``: what the rule derives on the
      driver (cDNI's class count, PETRA's accumulation, forward gradients' units).
    - ``updates_per_step(options, microbatches)``: optimizer steps a stage takes per
      training step (learning-rate schedules are given in training steps; dni updates once
      per microbatch).
    - ``check_training(train_config)``: the rule's own checks of a ``brigade train`` job,
      run with the others before any side effect (fwdgrad refuses ``--lr-schedule step``).
    - ``config_fields``: ``brigade train`` settings that feed its options (the seed).
    - ``no_autocast``: non-empty where the rule's forward is not an autocast region (why;
      ``--autocast`` is then refused).
    - ``costs``: hooks for the simulator and the balancer.
    - ``probe``: a ``brigade.stages.probes.ProbeHook``: how ``--probe-every`` measures the
      rule's gradients against the true ones (None: the rule is not probed).
    - ``summary``, ``reference``, ``order``: what ``brigade methods`` prints, and where.
    """

    name: str
    stage_class: type
    schedules: tuple[str, ...]
    handlers: Mapping[str, Any]
    options: type = _NoOptions
    default_optimizer: tuple[str, float | None] = ("momentum", 0.05)
    default_lr_schedule: str = "constant"
    optimizers: tuple[str, ...] | None = None
    optimizer_kind: str = ""
    optimizer_factory: Callable[[str, float | None, Any, int], Callable] | None = None
    updates_per_step: Callable[[Any, int], float] = one_update
    check_training: Callable[[Any], None] | None = None
    forward: tuple[Message, ...] = ()
    backward: tuple[Message, ...] = ()
    exposure: Callable[[int, int, Any], Exposure] = backprop_exposure
    prepare: Callable[[Any, Any, Any], dict[str, Any]] = _options_as_kwargs
    fixed: Mapping[str, Any] = field(default_factory=dict)
    config_fields: tuple[str, ...] = ()
    no_autocast: str = ""
    costs: CostHooks = CostHooks()
    probe: Any = None  # a probes.ProbeHook
    summary: str = ""
    reference: str = ""
    order: int = 1000  # where listings put it (the built-ins take 0-99)

    def __post_init__(self) -> None:
        name = str(self.name).strip().lower()
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"method name {self.name!r} must be letters, digits, - or _")
        object.__setattr__(self, "name", name)
        schedules = tuple(str(s).lower() for s in self.schedules)
        if not schedules:
            raise ConfigError(f"method {name!r} needs at least one schedule")
        object.__setattr__(self, "schedules", schedules)
        if "F" not in self.handlers:
            raise ConfigError(f"method {name!r} needs an 'F' handler (evaluation runs F); "
                              f"it has {sorted(self.handlers)}")
        if not (isinstance(self.options, type) and dataclasses.is_dataclass(self.options)):
            raise ConfigError(f"method {name!r}: options must be a dataclass type, got "
                              f"{self.options!r}")

    # -- options --------------------------------------------------------------------------
    def make_options(self, **given: Any) -> Any:
        """The rule's options from keywords, checked (``__post_init__``) once, on the driver;
        an unknown keyword names the valid ones."""
        names = [f.name for f in dataclasses.fields(self.options)]
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ConfigError(
                f"method {self.name} takes no option {', '.join(unknown)}; its options: "
                f"{', '.join(names) if names else 'none'}")
        return self.options(**given)

    def stage_kwargs(self, options: Any, model: Any, schedule: Any) -> dict[str, Any]:
        """The stage class's keyword options: what ``prepare`` derives, plus ``fixed``."""
        return {**self.prepare(options, model, schedule), **self.fixed}

    def schedule_options(self, options: Any) -> dict[str, Any]:
        """The options that belong to the schedule (``metadata["schedule"]``)."""
        return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
                if f.metadata.get("schedule") and getattr(options, f.name) is not None}

    # -- facts -----------------------------------------------------------------------------
    @property
    def default_schedule(self) -> str:
        return self.schedules[0]

    def check_schedule(self, schedule: str | None) -> str:
        """``schedule`` (None: the default) in lower case, or an error listing the valid."""
        if schedule is None:
            return self.default_schedule
        if str(schedule).lower() not in self.schedules:
            raise ConfigError(
                f"schedule {schedule!r} cannot run method {self.name!r}; valid schedules for "
                f"{self.name}: {', '.join(self.schedules)}")
        return str(schedule).lower()

    def labels_to(self, stage: int, stages: int, options: Any) -> bool:
        """Whether the driver sends the labels to ``stage`` (an earlier stage: the last one
        gets them with its targets)."""
        return stage < stages - 1 and self.exposure(stage, stages, options).labels

    @property
    def kinds(self) -> tuple[str, ...]:
        """The action kinds it has handlers for."""
        return tuple(self.handlers)


def option_fields(spec: MethodSpec) -> list[dataclasses.Field]:
    """The fields of a rule's options dataclass (what its flags are made from)."""
    return list(dataclasses.fields(spec.options))


def flag_key(f: dataclasses.Field) -> str | None:
    """The config key of an option field that is a flag (``--sg-lr`` -> ``sg_lr``), else
    None."""
    flag = f.metadata.get("flag")
    return None if not flag else str(flag).lstrip("-").replace("-", "_")


def option_classes() -> list[type]:
    """Every registered rule's options class, once each (their flagged fields become the
    ``brigade train`` method flags)."""
    return list(dict.fromkeys(get_method(n).options for n in method_names()))


def methods_taking(key: str) -> list[str]:
    """The rules whose options have the flag ``key`` (for "--sg-lr applies to ..." errors)."""
    return [n for n in method_names()
            if any(flag_key(f) == key for f in dataclasses.fields(get_method(n).options))]


def num_classes_of(model: Any, method: str) -> int:
    """The output width of the model's last Linear layer: the class count that cDNI's
    label planes and DGL's auxiliary heads need."""
    from torch import nn

    for module in reversed(list(model.modules())):
        if isinstance(module, nn.Linear):
            return module.out_features
    raise ConfigError(
        f"{method} needs num_classes and the model has no final nn.Linear to read it from; "
        "pass num_classes=... to Pipeline")


def exposed(spec: MethodSpec, stages: int, options: Any = None) -> list[Exposure]:
    """The exposure of every stage of a ``stages``-stage pipeline."""
    options = spec.make_options() if options is None else options
    return [spec.exposure(s, stages, options) for s in range(stages)]


# -- the registry -----------------------------------------------------------------------------
_REGISTRY: dict[str, MethodSpec] = {}
_LOADED = False


def register_method(spec: MethodSpec, *, replace: bool = False) -> MethodSpec:
    """Add a rule to the registry (the public way to bring your own). A name already taken
    is an error unless ``replace=True``. Returns ``spec``."""
    if not isinstance(spec, MethodSpec):
        raise ConfigError(f"register_method takes a MethodSpec, got {type(spec).__name__}")
    if spec.name in _REGISTRY and not replace and _REGISTRY[spec.name] is not spec:
        raise ConfigError(
            f"method {spec.name!r} is registered already (by "
            f"{_REGISTRY[spec.name].stage_class.__module__}); pick another name, or pass "
            "replace=True")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_method(name: str) -> None:
    """Remove a rule (tests that register throw-away rules clean up with this)."""
    _REGISTRY.pop(str(name).strip().lower(), None)


def _load_builtins() -> None:
    """Import every module of this package once: each built-in rule declares itself at
    the bottom of its stage module (so a new rule needs no line here); then the modules
    named in ``BRIGADE_METHODS``."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    package = __name__.rsplit(".", 1)[0]
    here = os.path.dirname(__file__)
    for name in sorted(i.name for i in pkgutil.iter_modules([here])):
        if name.startswith("_") or name == "rules":
            continue
        with open(os.path.join(here, name + ".py"), encoding="utf-8") as f:
            declares = "register_method(" in f.read()
        if declares:  # only modules that declare a rule (data loaders etc. stay unloaded)
            importlib.import_module(f"{package}.{name}")
    for name in filter(None, (m.strip() for m in os.environ.get("BRIGADE_METHODS", "").split(","))):
        importlib.import_module(name)


def method_names() -> list[str]:
    """The registered rules by their ``order`` (built-ins first), then registration."""
    _load_builtins()
    ranked = sorted(enumerate(_REGISTRY.values()), key=lambda item: (item[1].order, item[0]))
    return [spec.name for _, spec in ranked]


def load_rules(ref: str) -> Any:
    """Import a module that registers rules: a module name (``my_rules``) or the path of a
    ``.py`` file (imported under its file name). Returns the module."""
    import importlib.util
    import sys

    if ref.endswith(".py") or os.sep in ref:
        path = os.path.abspath(ref)
        if not os.path.isfile(path):
            raise ConfigError(f"no rules module at {ref!r}: give a .py file or a module name")
        name = os.path.splitext(os.path.basename(path))[0]
        if name in sys.modules and getattr(sys.modules[name], "__file__", None) == path:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(ref)
    except ImportError as err:
        raise ConfigError(f"cannot import rules module {ref!r} ({err})") from None


def get_method(name: str | MethodSpec) -> MethodSpec:
    """The declaration of rule ``name`` (case-insensitive); an unknown name lists them."""
    if isinstance(name, MethodSpec):
        return name
    _load_builtins()
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}; valid methods: {', '.join(method_names())}")
    return _REGISTRY[key]
