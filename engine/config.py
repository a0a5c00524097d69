"""Typed configuration of a Pipeline, checked once, with errors that say what would work."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import PipelineConfigError

__all__ = ["PipelineConfig", "BACKENDS", "PLACEMENTS", "TRANSPORTS",
           "check_method_schedule", "check_placement"]

BACKENDS = ("ray", "local", "torchrun")

# How stage messages travel: "p2p" (same host: a Unix socket and a shared-memory ring;
# between hosts: gloo), "gloo" (gloo for all), "ray" (Ray actor calls; Ray backend only).
# The local backend hands messages over in process and ignores the choice.
TRANSPORTS = ("p2p", "gloo", "ray")

# How the Ray backend lays the stage actors' bundles over the nodes (placement strategies).
PLACEMENTS = ("pack", "spread", "strict_pack", "strict_spread")


def check_placement(value: str) -> str:
    """The placement strategy in canonical (lower-case) spelling, or an error listing them."""
    placement = str(value).lower()
    if placement not in PLACEMENTS:
        raise PipelineConfigError(
            f"unknown placement {value!r}; valid placements: {', '.join(PLACEMENTS)}")
    return placement


def check_method_schedule(method: str, schedule: str | None) -> str:
    """``method`` in canonical (lower-case) spelling, after checking that it is a
    registered rule and can run ``schedule`` (None: the rule's default); an error lists
    what would work. The rule's declaration (``brigade.stages.rules``) says which."""
    from brigade.stages.errors import ConfigError
    from brigade.stages.rules import get_method

    try:
        rule = get_method(method)
        rule.check_schedule(schedule)
    except ConfigError as err:
        raise PipelineConfigError(str(err)) from None
    return rule.name


@dataclass
class PipelineConfig:
    """Everything that shapes a pipeline run except the model, optimizer and loss."""

    stages: int | list[int] = 2
    schedule: str = "1f1b"
    method: str = "backprop"
    microbatches: int = 4
    virtual: int = 1
    backend: str = "ray"
    balance_by: str = "uniform"
    address: str | None = None
    cpus_per_stage: float | None = None
    gpus_per_stage: float | None = None
    placement: str = "pack"
    placement_timeout_s: float = 30.0
    transport: str = "p2p"  # one of TRANSPORTS
    timeout_s: float = 300.0
    options: dict = field(default_factory=dict)  # options of the method's stage class
    schedule_options: dict = field(default_factory=dict)  # e.g. {"k": 4} for stale

    def __post_init__(self) -> None:
        self.schedule = self.schedule.lower()
        self.method = self.method.lower()
        self.backend = self.backend.lower()
        check_method_schedule(self.method, self.schedule)
        if self.backend not in BACKENDS:
            raise PipelineConfigError(
                f"unknown backend {self.backend!r}; valid backends: {', '.join(BACKENDS)}"
            )
        self.transport = self.transport.lower()
        if self.transport not in TRANSPORTS:
            raise PipelineConfigError(
                f"unknown transport {self.transport!r}; valid transports: {', '.join(TRANSPORTS)}"
            )
        if self.backend == "torchrun" and self.transport == "ray":
            raise PipelineConfigError(
                "transport 'ray' does not run under torchrun; use 'p2p' (shared memory "
                "between ranks on one host, gloo between hosts) or 'gloo'"
            )
        _positive("microbatches", self.microbatches)
        _positive("virtual", self.virtual)
        _positive("timeout_s", self.timeout_s)
        _positive("placement_timeout_s", self.placement_timeout_s)
        self.placement = check_placement(self.placement)
        if self.virtual > 1 and self.schedule != "interleaved":
            raise PipelineConfigError(
                f"virtual={self.virtual} needs schedule='interleaved' (got {self.schedule!r}); "
                "use virtual=1 for other schedules"
            )
        if self.schedule == "interleaved" and self.virtual < 2:
            raise PipelineConfigError(
                f"interleaved needs virtual >= 2 stages per worker (got {self.virtual})"
            )
        if isinstance(self.stages, int):
            _positive("stages", self.stages)
        else:
            self.stages = list(self.stages)
            if not self.stages or any(int(b) != b or b < 1 for b in self.stages):
                raise PipelineConfigError(
                    f"balance {self.stages} must be a non-empty list of positive block counts"
                )
            if len(self.stages) % self.virtual:
                raise PipelineConfigError(
                    f"balance has {len(self.stages)} entries, not a multiple of "
                    f"virtual={self.virtual}; give workers x virtual entries"
                )
        for name in ("cpus_per_stage", "gpus_per_stage"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise PipelineConfigError(f"{name}={value} must be >= 0")

    @property
    def num_workers(self) -> int:
        """Processes (actors) the pipeline runs: one per physical stage."""
        if isinstance(self.stages, int):
            return self.stages
        return len(self.stages) // self.virtual

    @property
    def num_model_stages(self) -> int:
        """Contiguous pieces the model is cut into (workers x virtual)."""
        return self.num_workers * self.virtual


def _positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise PipelineConfigError(f"{name}={value!r} must be a positive number")
