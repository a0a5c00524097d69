"""Cut a flat ``nn.Sequential`` of blocks into contiguous pipeline stages.

A *balance* is a list of block counts, one per stage, summing to the number of blocks
(torchgpipe's word). It comes from the user or from a balancer:

- ``balance_uniform``: equal block counts (the extra blocks go to the LAST stages, because
  under 1F1B the first stages keep the most microbatches in flight);
- ``balance_by_params``: minimise the largest per-stage parameter count;
- ``balance_by_time``: profile each block's forward+backward on a sample batch and minimise
  the slowest stage, the exact contiguous min-max partition (``min_max_partition``), as
  torchgpipe's ``balance_by_time`` does;
- ``by="method"``: time each block (and each cut's boundary work) on one microbatch under
  the learning rule that will run it (``brigade.stages.method_cost``) and minimise the
  slowest stage's cost; the rows then carry that per-stage cost (``cost_s``).

``partition(model, stages, by=...)`` returns a ``Partition``: the balance, the stage modules,
and one row per stage (blocks, parameters, forward/backward seconds, output shape and bytes)
with ``table()`` for printing. Stage forward/backward seconds are the costs the schedule
simulator consumes. Stage modules share the block objects with the model and keep the
model's block indices as names, so ``stage.state_dict()`` keys are the model's keys.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .errors import ConfigError, choose
from .models import count_params
from .split_backward import backward_input, backward_weight

__all__ = [
    "split",
    "check_balance",
    "balance_uniform",
    "balance_by_params",
    "balance_by_time",
    "min_max_partition",
    "min_max_split",
    "BlockProfile",
    "profile_blocks",
    "StageRow",
    "Partition",
    "partition",
    "BALANCERS",
]

BALANCERS = ("uniform", "params", "time", "method")


def check_balance(n_blocks: int, balance: list[int]) -> list[int]:
    """Validate a balance against a model of ``n_blocks`` blocks; return it as a list.

    Errors carry the numbers and a balance that would work.
    """
    balance = list(balance)
    if not balance:
        raise ConfigError("balance is empty; give at least one stage")
    if any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in balance):
        raise ConfigError(f"balance {balance} has a non-positive entry; every stage needs at least one block")
    if len(balance) > n_blocks:
        raise ConfigError(
            f"{len(balance)} stages but the model has only {n_blocks} blocks; use at most {n_blocks} stages"
        )
    if sum(balance) != n_blocks:
        raise ConfigError(
            f"balance {balance} sums to {sum(balance)} but the model has {n_blocks} blocks; "
            f"e.g. {balance_uniform(n_blocks, len(balance))}"
        )
    return balance


def split(model: nn.Sequential, balance: list[int]) -> list[nn.Sequential]:
    """Cut ``model`` into ``len(balance)`` contiguous stages (sharing the block objects)."""
    balance = check_balance(len(model), balance)
    names = list(model._modules)
    stages, start = [], 0
    for count in balance:
        stages.append(nn.Sequential(OrderedDict((n, model._modules[n]) for n in names[start:start + count])))
        start += count
    return stages


def _check_stages(n_blocks: int, stages: int) -> None:
    """A stage count must be positive and at most the block count."""
    if not isinstance(stages, int) or isinstance(stages, bool) or stages < 1:
        raise ConfigError(f"stages must be a positive integer; got {stages!r}")
    if stages > n_blocks:
        raise ConfigError(f"{stages} stages but the model has only {n_blocks} blocks; use at most {n_blocks} stages")


def balance_uniform(n_blocks: int, stages: int) -> list[int]:
    """Equal block counts; the remainder goes one each to the last stages."""
    _check_stages(n_blocks, stages)
    base, extra = divmod(n_blocks, stages)
    return [base + (1 if i >= stages - extra else 0) for i in range(stages)]


def min_max_split(n: int, parts: int, stage_cost: Callable[[int, int], float],
                  later_cuts: bool = True) -> list[int]:
    """The contiguous split of ``n`` blocks into ``parts`` non-empty runs whose largest
    ``stage_cost(start, end)`` is as small as possible (exact dynamic programming,
    O(parts * n^2) cost calls). Among optimal splits: later cuts (``later_cuts``) or
    earlier ones, either way deterministic. Returns the balance (run lengths)."""
    inf = float("inf")
    # best[k][i]: smallest max-run cost splitting the first i blocks into k runs
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                if best[k - 1][j] == inf:
                    continue
                value = max(best[k - 1][j], stage_cost(j, i))
                if value < best[k][i] or (later_cuts and value == best[k][i]):
                    best[k][i], cut[k][i] = value, j
    balance, i = [], n
    for k in range(parts, 0, -1):
        j = cut[k][i]
        balance.append(i - j)
        i = j
    return balance[::-1]


def min_max_partition(costs: list[float], parts: int) -> list[int]:
    """The contiguous partition of ``costs`` into ``parts`` non-empty runs whose largest run
    sum is as small as possible (:func:`min_max_split` over run sums; among optimal
    partitions the one preferring later cuts). Returns the balance (run lengths)."""
    n = len(costs)
    _check_stages(n, parts)
    if any(c < 0 for c in costs):
        raise ConfigError(f"costs must be non-negative; got {costs}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    return min_max_split(n, parts, lambda j, i: prefix[i] - prefix[j])


def balance_by_params(model: nn.Sequential, stages: int) -> list[int]:
    """Balance that minimises the largest per-stage parameter count."""
    return min_max_partition([count_params(b) for b in model], stages)


@dataclass(frozen=True)
class BlockProfile:
    """One block measured on the sample batch.

    ``forward_s``/``backward_s`` are medians over repeats; ``out_shape`` includes the batch
    dimension of the sample (``batch``), and ``out_bytes`` is that whole tensor's size.
    ``input_s``/``weight_s`` time the same backward split as zero-bubble schedules run it
    (``split_backward``: I, then W); their sum exceeds ``backward_s`` by the split's
    per-node overhead, which a simulation of zb1p must charge.
    """

    index: int
    name: str
    params: int
    forward_s: float
    backward_s: float
    batch: int
    out_shape: tuple[int, ...]
    out_bytes: int
    input_s: float | None = None
    weight_s: float | None = None

    @property
    def bytes_per_sample(self) -> int:
        """Activation bytes of one sample: what one microbatch row costs in transport."""
        return self.out_bytes // max(1, self.batch)


def _sync(device: torch.device) -> None:
    """Wait for queued kernels so that wall-clock timings measure the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_block(block: nn.Module, x: Tensor, device: torch.device) -> tuple[float, ...]:
    """One forward, one backward, and the backward split into I and W, of ``block`` on
    ``x``; returns their seconds (f, b, i, w) and the output."""
    x = x.detach().requires_grad_(x.is_floating_point())
    params = [p for p in block.parameters() if p.requires_grad]
    _sync(device)
    t0 = time.perf_counter()
    out = block(x)
    _sync(device)
    t1 = time.perf_counter()
    inputs = [t for t in (x, *params) if t.requires_grad]
    if out.requires_grad and inputs:
        torch.autograd.grad(out, inputs, torch.ones_like(out), allow_unused=True)
    _sync(device)
    t2 = time.perf_counter()
    i = w = 0.0
    if out.requires_grad and x.requires_grad:
        again = block(x)
        _sync(device)
        t3 = time.perf_counter()
        _, plan = backward_input(again, torch.ones_like(again), x, params)
        _sync(device)
        t4 = time.perf_counter()
        backward_weight(plan)
        _sync(device)
        i, w = t4 - t3, time.perf_counter() - t4
    return t1 - t0, t2 - t1, i, w, out.detach()


def profile_blocks(
    model: nn.Sequential, sample: Tensor, device: str | torch.device = "cpu", repeats: int = 3
) -> list[BlockProfile]:
    """Measure every block's forward and backward time, parameters and output size.

    Runs on a deep copy of the model moved to ``device`` (in train mode), so the model's
    weights, gradients and BatchNorm statistics are untouched. One warm-up pass, then
    ``repeats`` timed passes; times are medians.
    """
    if repeats < 1:
        raise ConfigError(f"repeats must be at least 1; got {repeats}")
    device = torch.device(device)
    work = copy.deepcopy(model).to(device).train()
    names = list(model._modules)
    times: list[list[tuple[float, ...]]] = [[] for _ in work]
    outs: list[Tensor] = []
    for r in range(repeats + 1):
        x = sample.to(device)
        outs = []
        for i, block in enumerate(work):
            *spans, x = _time_block(block, x, device)
            outs.append(x)
            if r:
                times[i].append(tuple(spans))
    return [
        BlockProfile(
            index=i,
            name=names[i],
            params=count_params(model[i]),
            forward_s=statistics.median(t[0] for t in times[i]),
            backward_s=statistics.median(t[1] for t in times[i]),
            batch=int(sample.shape[0]),
            out_shape=tuple(out.shape),
            out_bytes=out.numel() * out.element_size(),
            input_s=statistics.median(t[2] for t in times[i]),
            weight_s=statistics.median(t[3] for t in times[i]),
        )
        for i, out in enumerate(outs)
    ]


def balance_by_time(
    model: nn.Sequential,
    sample: Tensor,
    stages: int,
    device: str | torch.device = "cpu",
    repeats: int = 3,
) -> list[int]:
    """Balance that minimises the slowest stage's measured forward+backward time."""
    _check_stages(len(model), stages)
    profile = profile_blocks(model, sample, device, repeats)
    return min_max_partition([p.forward_s + p.backward_s for p in profile], stages)


@dataclass(frozen=True)
class StageRow:
    """One stage of a partition: blocks ``[start, stop)`` and what they cost.

    Times and shapes are None when no sample was profiled; ``out_shape`` includes the
    sample's batch dimension and ``out_bytes`` is the whole output tensor's size.
    """

    stage: int
    start: int
    stop: int
    params: int
    forward_s: float | None = None
    backward_s: float | None = None
    out_shape: tuple[int, ...] | None = None
    out_bytes: int | None = None
    input_s: float | None = None  # the split backward's I and W (zero-bubble schedules)
    weight_s: float | None = None
    cost_s: float | None = None  # one microbatch under the method (by="method")

    @property
    def blocks(self) -> int:
        return self.stop - self.start


def _fmt_bytes(n: int | None) -> str:
    """Human-readable byte count."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def _fmt_ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.2f}"


@dataclass
class Partition:
    """A model cut into stages: the balance, the stage modules and a row per stage."""

    balance: list[int]
    modules: list[nn.Sequential]
    rows: list[StageRow]
    by: str = "balance"
    profile: list[BlockProfile] | None = field(default=None, repr=False)
    method: str | None = None  # the rule whose costs the rows' cost_s are

    def __post_init__(self) -> None:
        if not (len(self.balance) == len(self.modules) == len(self.rows)):
            raise ConfigError(
                f"partition has {len(self.balance)} balance entries, {len(self.modules)} modules "
                f"and {len(self.rows)} rows; they must agree"
            )

    def __len__(self) -> int:
        return len(self.modules)

    @classmethod
    def from_profile(cls, model: nn.Sequential, balance: list[int],
                     profile: list[BlockProfile] | None, by: str = "balance") -> "Partition":
        """The partition ``balance`` of ``model``, its rows summed from a block profile
        already taken (or without times when ``profile`` is None)."""
        return cls(balance, split(model, balance), _rows(model, balance, profile), by, profile)

    def _column(self, name: str) -> list[float | None] | None:
        """One per-stage time of the rows (simulator costs), or None when not profiled."""
        return None if self.profile is None else [getattr(r, name) for r in self.rows]

    @property
    def forward_s(self) -> list[float] | None:
        """Per-stage forward seconds, or None when not profiled."""
        return self._column("forward_s")

    @property
    def backward_s(self) -> list[float] | None:
        """Per-stage backward seconds, or None when not profiled."""
        return self._column("backward_s")

    @property
    def input_s(self) -> list[float] | None:
        """Per-stage seconds of a split backward's I (zb1p's costs), or None."""
        return self._column("input_s")

    @property
    def weight_s(self) -> list[float] | None:
        """Per-stage seconds of a split backward's W (zb1p's costs), or None."""
        return self._column("weight_s")

    def table(self) -> "rich.table.Table":  # noqa: F821
        """A rich table: per stage, blocks, parameters, time, output shape and bytes."""
        from rich.table import Table

        table = Table(title=f"stages (balance {self.balance}, by {self.by})")
        costs = any(r.cost_s is not None for r in self.rows)
        if costs:
            table.title = f"stages (balance {self.balance}, by {self.by}, {self.method} costs)"
        cols = ["stage", "blocks", "params", "fwd ms", "bwd ms"]
        cols += [f"{self.method} ms/mb"] if costs else []
        for col in cols + ["output shape", "output bytes"]:
            table.add_column(col, justify="left" if col == "output shape" else "right")
        for r in self.rows:
            cells = [str(r.stage), f"{r.start}-{r.stop - 1}" if r.blocks > 1 else str(r.start),
                     f"{r.params:,}", _fmt_ms(r.forward_s), _fmt_ms(r.backward_s)]
            cells += [_fmt_ms(r.cost_s)] if costs else []
            table.add_row(*cells, "-" if r.out_shape is None else "x".join(map(str, r.out_shape)),
                          _fmt_bytes(r.out_bytes))
        return table


def _rows(model: nn.Sequential, balance: list[int], profile: list[BlockProfile] | None) -> list[StageRow]:
    """Sum block figures into per-stage rows."""
    rows, start = [], 0
    for s, count in enumerate(balance):
        stop = start + count
        row = StageRow(stage=s, start=start, stop=stop, params=sum(count_params(model[i]) for i in range(start, stop)))
        if profile is not None:
            row = replace(row, **_stage_times(profile[start:stop], first=start == 0),
                          out_shape=profile[stop - 1].out_shape,
                          out_bytes=profile[stop - 1].out_bytes)
        rows.append(row)
        start = stop
    return rows


def _stage_times(blocks: list[BlockProfile], first: bool) -> dict[str, float | None]:
    """A stage's forward, backward, I and W seconds from its blocks' profiles.

    The first stage's input needs no gradient, so its I computes nothing and its W is its
    whole backward (as ``Stage.backward_input``/``backward_weight`` run it).
    """
    f = sum(b.forward_s for b in blocks)
    back = sum(b.backward_s for b in blocks)
    if any(b.input_s is None or b.weight_s is None for b in blocks):
        return {"forward_s": f, "backward_s": back, "input_s": None, "weight_s": None}
    if first:
        return {"forward_s": f, "backward_s": back, "input_s": 0.0, "weight_s": back}
    return {"forward_s": f, "backward_s": back, "input_s": sum(b.input_s for b in blocks),
            "weight_s": sum(b.weight_s for b in blocks)}


def partition(
    model: nn.Sequential,
    stages: int | list[int],
    by: str = "uniform",
    sample: Tensor | None = None,
    device: str | torch.device = "cpu",
    repeats: int = 3,
    method: Any = "backprop",
    method_options: dict | None = None,
    microbatches: int = 1,
) -> Partition:
    """Cut ``model`` into stages: ``stages`` is a count (balanced ``by`` uniform | params |
    time | method) or an explicit balance list. With a ``sample`` batch every block is
    profiled so the rows carry times and output sizes; ``by="time"`` and ``by="method"``
    need one. ``by="method"`` times one microbatch (``sample`` split ``microbatches``
    ways) under ``method`` (a rule's name or ``MethodSpec``) with its stage class's
    keywords ``method_options`` (``brigade.stages.method_cost``).
    """
    if isinstance(stages, (list, tuple)):
        balance, by = check_balance(len(model), list(stages)), "balance"
    else:
        by = choose("balancer", by, BALANCERS)
        _check_stages(len(model), stages)
        balance = None
    if by in ("time", "method") and sample is None:
        raise ConfigError(f"balancing by {by} needs a sample batch to profile; pass sample=, or use by='uniform' or 'params'")
    profile = profile_blocks(model, sample, device, repeats) if sample is not None else None
    costs = None
    if by == "method":
        from .method_cost import balance_by_cost, method_costs

        mb = sample[: max(1, sample.shape[0] // max(1, microbatches))].to(device)
        costs = method_costs(method, model, mb, method_options, repeats=repeats)
    if by == "uniform":
        balance = balance_uniform(len(model), stages)
    elif by == "params":
        balance = balance_by_params(model, stages)
    elif by == "time":
        balance = min_max_partition([p.forward_s + p.backward_s for p in profile], stages)
    elif by == "method":
        balance = balance_by_cost(costs, stages)
    part = Partition.from_profile(model, balance, profile, by)
    if costs is not None:
        from .method_cost import stage_costs

        part.rows = [replace(r, cost_s=c) for r, c in zip(part.rows, stage_costs(costs, balance))]
        part.method = costs.method
    return part
