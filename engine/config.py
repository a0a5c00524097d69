"""Typed configuration of a Pipeline, checked once, with errors that say what would work."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .errors import PipelineConfigError, as_config_error
from .flags import check_choices, flag_of, flat_init

__all__ = ["PipelineConfig", "ClusterConfig", "BACKENDS", "PLACEMENTS", "TRANSPORTS",
           "BALANCERS", "AUTOCAST_DTYPES", "check_method_schedule"]

BACKENDS = ("ray", "local", "torchrun")
# How a model is cut when no balance is given; "method" times each block (and each cut's
# boundary work) under the learning rule that runs it (brigade.stages.method_cost).
BALANCERS = ("uniform", "params", "time", "method")

# torch.autocast dtypes by name; a rule whose forward is not a plain module call refuses it
# (its declaration's ``no_autocast`` says why).
AUTOCAST_DTYPES = ("bf16",)

# How stage messages travel: "p2p" (same host: a Unix socket and a shared-memory ring;
# between hosts: gloo), "gloo" (gloo for all), "ray" (Ray actor calls; Ray backend only).
# The local backend hands messages over in process and ignores the choice.
TRANSPORTS = ("p2p", "gloo", "ray")

# How the Ray backend lays the stage actors' bundles over the nodes (placement strategies).
PLACEMENTS = ("pack", "spread", "strict_pack", "strict_spread")




def _rule_and_schedule(method: str, schedule: str | None):
    """The rule's declaration and the schedule it runs (``schedule``, or its default), after
    checking that the rule is registered and can run it; an error lists what would work."""
    from brigade.stages.rules import get_method

    rule = as_config_error(get_method, method)
    return rule, as_config_error(rule.check_schedule, schedule)


def check_method_schedule(method: str, schedule: str | None) -> str:
    """``method`` in canonical (lower-case) spelling, after checking that it is a
    registered rule and can run ``schedule`` (None: the rule's default)."""
    return _rule_and_schedule(method, schedule)[0].name


def _help(text: str, **more) -> dict:
    return {"help": text, **more}


@dataclass
class ClusterConfig:
    """Where and how the stage workers run: what the backends need besides the stages.

    One object from the CLI to the backend (``RayBackend(specs, cluster)``), checked once.
    """

    address: str | None = field(default=None, metadata=_help(
        "join an existing Ray cluster (auto or host:port)",
        default_help="start a private local cluster"))
    cpus_per_stage: float | None = field(default=None, metadata=_help(
        "CPUs each stage actor reserves", metavar="N",
        default_help="a fair share of the cluster"))
    gpus_per_stage: float | None = field(default=None, metadata=_help(
        "GPUs each stage actor reserves", metavar="N",
        default_help="1 where the cluster has one per stage, else 0"))
    placement: str = field(default="pack", metadata=_help(
        "how stage actors are laid over the nodes", choices=PLACEMENTS))
    placement_timeout_s: float = field(default=30.0, metadata=_help(
        "seconds to wait for the cluster to place every stage", flag="placement-timeout",
        metavar="SECONDS"))
    transport: str = field(default="p2p", metadata=_help(
        "how stage messages travel: p2p (same host: socket + shared memory; between "
        "hosts: gloo), gloo, or ray (Ray actor calls; Ray backend only)",
        choices=TRANSPORTS))
    timeout_s: float = field(default=300.0, metadata=_help(
        "seconds a step may wait for a stage before the run fails", flag="timeout",
        metavar="SECONDS"))
    trusted_resource: str | None = field(default=None, metadata=_help(
        "a Ray custom resource: stages that receive raw inputs or labels run only on nodes "
        "that carry it (others anywhere)", metavar="NAME", default_help="anywhere"))

    def __post_init__(self) -> None:
        check_choices(self)  # placement, transport
        for name in ("cpus_per_stage", "gpus_per_stage"):
            value = getattr(self, name)
            if value is not None and not (_number(value) and value >= 0
                                          and math.isfinite(value)):
                raise PipelineConfigError(f"{flag_of(ClusterConfig, name)} {value:g} must be "
                                          f">= 0 ({name}=)")
        for name in ("placement_timeout_s", "timeout_s"):
            value = getattr(self, name)
            if not (_number(value) and value > 0 and math.isfinite(value)):
                raise PipelineConfigError(
                    f"{flag_of(ClusterConfig, name)} {value:g} must be a positive number of "
                    f"seconds ({name}=)")


@flat_init
@dataclass
class PipelineConfig:
    """Everything that shapes a pipeline run except the model, optimizer and loss.

    Built from ``Pipeline``'s keywords (``PipelineConfig(stages=2, address="auto")``: keys
    of the nested ``cluster`` are accepted here too), or held by a ``TrainConfig``.
    """

    stages: int | list[int] = field(default=2, metadata=_help(
        "pipeline workers (processes)", parse=int))
    balance: list[int] | None = field(default=None, metadata=_help(
        "blocks per stage, comma-separated (workers x virtual entries)",
        default_help="cut by --balance-by"))
    balance_by: str | None = field(default=None, metadata=_help(
        "how to cut the model when --balance is not given (method: each block timed under "
        "the learning rule that runs it)", choices=BALANCERS, what="balancer",
        default_help="method for the rules that declare a balancer cost (every built-in "
                     "but backprop), else uniform"))
    schedule: str | None = field(default=None, metadata=_help(
        "the schedule (`brigade methods` lists each method's)",
        default_help="the method's own"))
    method: str = field(default="backprop", metadata=_help(
        "the learning rule (`brigade methods` lists and describes them)"))
    microbatches: int = field(default=4, metadata=_help("microbatches per batch"))
    virtual: int = field(default=1, metadata=_help("stages per worker (interleaved)"))
    backend: str = field(default="ray", metadata=_help(
        "ray: one actor per stage; local: one process; torchrun: one rank per stage, "
        "started with torchrun", choices=BACKENDS))
    autocast: str | None = field(default=None, metadata=_help(
        "run the stages' forward under torch.autocast in this dtype (CPU and GPU); "
        "weights stay float32", choices=AUTOCAST_DTYPES, default_help="off",
        what="autocast dtype"))
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    # The method's stage-class options and the schedule's options (e.g. {"k": 4} for
    # stale): set from Python keywords, or derived by TrainConfig from the rule's flags.
    options: dict = field(default_factory=dict, metadata={"derived": True})
    schedule_options: dict = field(default_factory=dict, metadata={"derived": True})

    def __post_init__(self) -> None:
        rule, self.schedule = _rule_and_schedule(self.method, self.schedule)
        self.method = rule.name
        check_choices(self)
        if self.backend == "torchrun" and self.cluster.transport == "ray":
            raise PipelineConfigError(
                "transport 'ray' does not run under torchrun; use 'p2p' (shared memory "
                "between ranks on one host, gloo between hosts) or 'gloo'"
            )
        if self.autocast is not None and rule.no_autocast:
            raise PipelineConfigError(
                f"--autocast {self.autocast} is not supported with method {self.method!r} "
                f"(its forward is not an autocast region: {rule.no_autocast}); "
                "drop --autocast")
        if isinstance(self.stages, list):  # Pipeline(stages=[2, 1]): a balance
            if self.balance is not None and list(self.balance) != self.stages:
                raise PipelineConfigError(
                    f"stages={self.stages} and balance={self.balance} disagree; give one")
            self.balance = self.stages
        _positive("microbatches", self.microbatches)
        _positive("virtual", self.virtual)
        if self.virtual > 1 and self.schedule != "interleaved":
            raise PipelineConfigError(
                f"virtual={self.virtual} needs schedule='interleaved' (got {self.schedule!r}); "
                "use virtual=1 for other schedules"
            )
        if self.schedule == "interleaved" and self.virtual < 2:
            raise PipelineConfigError(
                f"interleaved needs virtual >= 2 stages per worker (got {self.virtual})"
            )
        if self.cluster.trusted_resource is not None:
            from .placement import check_trusted_resource

            self.cluster.trusted_resource = check_trusted_resource(
                self.cluster.trusted_resource, self.backend)
        if self.balance is None:
            _positive("stages", self.stages)
            return
        self.balance = list(self.balance)
        if not self.balance or any(int(b) != b or b < 1 for b in self.balance):
            raise PipelineConfigError(
                f"balance {self.balance} must be a non-empty list of positive block counts"
            )
        if len(self.balance) % self.virtual:
            raise PipelineConfigError(
                f"balance has {len(self.balance)} entries, not a multiple of "
                f"virtual={self.virtual}; give workers x virtual entries"
            )
        self.stages = len(self.balance) // self.virtual  # a balance says how many workers

    def balancer(self, sampled: bool = True) -> str:
        """The balancer that cuts the model when no balance is given: ``balance_by``, or by
        default ``"method"`` for a rule whose declaration carries a balancer cost (its own
        work decides the cut; ``sampled``: a sample batch is there to time it), else
        ``"uniform"``."""
        from brigade.stages.rules import get_method

        if self.balance_by is not None:
            return self.balance_by
        return "method" if sampled and get_method(self.method).costs.balancer else "uniform"

    @property
    def num_workers(self) -> int:
        """Processes (actors) the pipeline runs: one per physical stage."""
        return self.stages

    @property
    def num_model_stages(self) -> int:
        """Contiguous pieces the model is cut into (workers x virtual)."""
        return self.num_workers * self.virtual


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive(name: str, value: float) -> None:
    """Refuse a non-positive count, naming the keyword and the flag."""
    if not _number(value) or value <= 0 or int(value) != value:
        raise PipelineConfigError(f"--{name} {value!r} must be >= 1 ({name}=)")
