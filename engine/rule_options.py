"""Each learning rule's own options as a typed dataclass (the flags ``--sg-lr``, ``--stale-k``...).

Interim home: the learning-rule registry (issue 17, ``MethodSpec`` with an options
dataclass per rule) replaces :func:`options_class` with a registry look-up. What the rest
of the code needs from a rule's options object is its protocol:

- its fields (each one key of ``brigade train``'s flags and config files, see ``flags``),
- ``stage_options()``: keywords of the rule's stage class,
- ``schedule_options()``: keywords of the rule's schedule builder,
- ``updates_per_step(microbatches)``: optimizer steps a stage takes per training step (the
  clock of learning-rate schedules, which are given in training steps).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import PipelineConfigError

__all__ = ["DNIOptions", "StaleOptions", "PetraOptions", "ForwardGradientOptions",
           "options_class", "option_classes", "methods_of"]


def _positive_int(flag: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 1):
        raise PipelineConfigError(f"{flag} {value!r} must be an integer >= 1")


class _RuleOptions:
    """What a rule's options object answers when the rule has nothing to say: no stage or
    schedule keywords, one optimizer step per training step. Subclasses override the rest."""

    def stage_options(self) -> dict:
        return {}

    def schedule_options(self) -> dict:
        return {}

    def updates_per_step(self, microbatches: int) -> float:
        return 1.0


@dataclass
class DNIOptions(_RuleOptions):
    """dni / cdni: the synthetic-gradient module and how often a stage updates."""

    sg_lr: float | None = field(default=None, metadata={
        "help": "dni/cdni: synthetic-gradient module learning rate", "default_help": "1e-3"})
    sg_hidden_layers: int | None = field(default=None, metadata={
        "help": "dni/cdni: hidden layers of the synthesizer, 0-2", "default_help": "1"})
    update_prob: float | None = field(default=None, metadata={
        "help": "dni/cdni: probability that a stage updates on a microbatch",
        "default_help": "1"})

    def __post_init__(self) -> None:
        if self.sg_lr is not None and not self.sg_lr > 0:
            raise PipelineConfigError(f"--sg-lr {self.sg_lr} must be a positive number")
        if self.update_prob is not None and not 0 < self.update_prob <= 1:
            raise PipelineConfigError(f"--update-prob {self.update_prob} must be in (0, 1]")

    def stage_options(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}

    def updates_per_step(self, microbatches: int) -> float:
        return float(microbatches)  # each microbatch is its own update


@dataclass
class StaleOptions(_RuleOptions):
    """stale: how many steps share one backpropagated gradient."""

    stale_k: int | None = field(default=None, metadata={
        "help": "stale: one backprop step every k steps", "default_help": "4"})

    def __post_init__(self) -> None:
        _positive_int("--stale-k", self.stale_k)

    def schedule_options(self) -> dict:
        return {} if self.stale_k is None else {"k": self.stale_k}


@dataclass
class PetraOptions(_RuleOptions):
    """petra: microbatches accumulated per update."""

    accumulate: int | None = field(default=None, metadata={
        "help": "petra: microbatches per update", "default_help": "--microbatches"})

    def __post_init__(self) -> None:
        _positive_int("--accumulate", self.accumulate)

    def schedule_options(self) -> dict:
        return {} if self.accumulate is None else {"accumulate": self.accumulate}

    def updates_per_step(self, microbatches: int) -> float:
        return microbatches / (self.accumulate or microbatches)


@dataclass
class ForwardGradientOptions(_RuleOptions):
    """fwdgrad: where direction guesses come from and how many per step."""

    guess: str = field(default="random", metadata={
        "help": "fwdgrad: direction guesses, random or from local auxiliary losses "
                "(local: --stages 1 --backend local only)", "choices": ("random", "local"),
        "plural": "guesses"})
    projections: int | str = field(default="auto", metadata={
        "help": "fwdgrad: directions per step, an integer or auto"})

    def __post_init__(self) -> None:
        from .flags import check_choices

        check_choices(self)
        text = str(self.projections).strip().lower()
        if text == "auto":
            self.projections = text
        elif text.isdigit() and int(text) >= 1:
            self.projections = int(text)
        else:
            raise PipelineConfigError(
                f"--projections {self.projections} must be a positive integer or auto")

    def stage_options(self) -> dict:
        return {"guess": self.guess, "projections": self.projections}


_BY_METHOD: dict[str, type] = {
    "dni": DNIOptions,
    "cdni": DNIOptions,
    "stale": StaleOptions,
    "petra": PetraOptions,
    "fwdgrad": ForwardGradientOptions,
}


def options_class(method: str) -> type | None:
    """The options dataclass of ``method`` (None: the rule has no options of its own)."""
    return _BY_METHOD.get(method.lower())


def option_classes() -> list[type]:
    """Every rule's options class, once each (their fields become flags)."""
    return list(dict.fromkeys(_BY_METHOD.values()))


def methods_of(cls: type) -> list[str]:
    """The methods whose options ``cls`` holds (for "--sg-lr applies to ..." messages)."""
    return [m for m, c in _BY_METHOD.items() if c is cls]
