"""Where stage actors may go: CPU shares, bundles, exposure and feasibility (pure, no Ray).

The Ray backend reserves one placement-group bundle per worker. What each bundle asks for,
and whether the cluster's nodes could ever hold the group, is decided here from plain
numbers (each alive node's resources), so the rules are tested exhaustively without a
cluster (``tests/test_fuzz.py``) and the backend only asks Ray once.

Why a module of its own: the default CPU share used to be ``round(total / stages, 2)``, and
3 stages on 2 CPUs asked 3 x 0.67 = 2.01 CPUs, more than the cluster has; a share is now
rounded *down* to what the nodes can hold under the placement strategy.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

from .errors import PipelineConfigError

__all__ = ["check_trusted_resource", "SHARE_STEP", "TRUSTED_AMOUNT", "fair_share", "quantize_share", "trusted_workers",
           "bundles", "capacity", "shortfall", "trusted_shortfall"]

SHARE_STEP = 0.01  # fractional CPU shares are whole multiples of this (Ray keeps 1e-4)
TRUSTED_AMOUNT = 0.001  # of the trusted resource per trusted bundle: a marker, not a quota


def quantize_share(cpus: float) -> float:
    """Whole CPUs where the share is >= 1 (a stage's torch threads), else a multiple of
    SHARE_STEP, always rounded *down*: a smaller share never fits fewer stages."""
    if cpus >= 1:
        return float(math.floor(cpus + 1e-9))
    return max(SHARE_STEP, math.floor(cpus / SHARE_STEP + 1e-9) * SHARE_STEP)


def _holds(node_cpus: list[float], share: float) -> int:
    return sum(int(n / share + 1e-9) for n in node_cpus)


def _best(workers: int, cpus: list[float], strategy: str) -> float:
    """The largest (unquantized) share of which ``cpus`` hold ``workers`` under strategy."""
    if strategy == "strict_pack":
        return cpus[0] / workers
    if strategy == "strict_spread":
        return cpus[min(workers, len(cpus)) - 1]
    # pack/spread: the largest n/k with sum(floor(node / (n/k))) >= workers
    return max((c / k for c in cpus for k in range(1, workers + 1)
                if _holds(cpus, c / k) >= workers), default=SHARE_STEP)


def fair_share(workers: int, node_cpus: list[float], strategy: str = "pack",
               trusted_cpus: list[float] | None = None, trusted: int = 0) -> float:
    """The largest CPU share per stage that the nodes (their CPU counts) can hold
    ``workers`` times under ``strategy``, quantized down (:func:`quantize_share`); with
    ``trusted`` of the workers bound to the nodes whose CPU counts are ``trusted_cpus``
    (those carrying the trusted resource), small enough for those nodes to hold them too.

    pack/spread: any node takes as many stages as fit; strict_pack: one node takes all (a
    trusted one where any stage is trusted); strict_spread: one stage per node. Where
    nothing fits (fewer nodes than strict_spread needs, no trusted node), the share of the
    best case is returned and :func:`shortfall` / :func:`trusted_shortfall` say why it fails.
    """
    cpus = sorted((float(c) for c in node_cpus if c > 0), reverse=True)
    if not cpus or workers < 1:
        return SHARE_STEP
    held = sorted((float(c) for c in trusted_cpus or [] if c > 0), reverse=True)
    if trusted and held and strategy == "strict_pack":
        best = _best(workers, held, strategy)
    elif trusted and held:
        best = min(_best(workers, cpus, strategy), _best(trusted, held, strategy))
    else:
        best = _best(workers, cpus, strategy)
    return quantize_share(best)  # rounding down never fits fewer stages


_BUILTIN = ("CPU", "GPU", "memory", "object_store_memory")


def check_trusted_resource(name: object, backend: str = "ray") -> str:
    """``--trusted-resource``: the name of a custom Ray resource, on the Ray backend."""
    text = str(name).strip() if name is not None else ""
    if not text or text in _BUILTIN or text.startswith("node:"):
        raise PipelineConfigError(
            f"--trusted-resource {name!r} must name a custom Ray resource (as given to "
            "`ray start --resources '{\"trusted\": 1}'`), not "
            f"{', '.join(_BUILTIN)} or a node: resource")
    if backend != "ray":
        raise PipelineConfigError(
            f"--trusted-resource {text} places Ray actors; it needs --backend ray "
            f"(got {backend!r})")
    return text


def trusted_workers(worker_of: Sequence[int], labels_to: Collection[int],
                    num_workers: int) -> list[bool]:
    """Which workers receive raw inputs or labels (True: must run on a trusted node): the
    worker of stage 0 (the inputs), of the last stage (the labels, with its targets) and
    of every earlier stage the rule shows the labels to (its declaration's exposure, as
    ``Pipeline.labels_to`` resolved it: what the driver will send)."""
    if num_workers < 1 or not worker_of:
        return [False] * max(num_workers, 0)
    trusted = {worker_of[0], worker_of[-1], *(worker_of[s] for s in labels_to)}
    return [w in trusted for w in range(num_workers)]


def bundles(workers: int, cpus: float, gpus: float, trusted: list[bool] | None = None,
            resource: str | None = None) -> list[dict[str, float]]:
    """One reservation per worker (Ray refuses bundles of zeros: those keys are left
    out); trusted workers also ask for a sliver of ``resource``, which only nodes that
    carry it have."""
    base = {k: v for k, v in (("CPU", cpus), ("GPU", gpus)) if v > 0}
    out = []
    for flag in (trusted or [False] * workers):
        b = dict(base)
        if flag and resource:
            b[resource] = TRUSTED_AMOUNT
        out.append(b)
    return out


def capacity(node: dict[str, float], bundle: dict[str, float]) -> int:
    """How many copies of ``bundle`` fit in ``node``'s resources."""
    if not bundle:
        return 0
    return min(int(node.get(k, 0.0) / v + 1e-9) for k, v in bundle.items())


def shortfall(workers: int, bundle: dict[str, float], strategy: str,
              nodes: list[dict[str, float]]) -> str | None:
    """Why the cluster's nodes (whole, not what is free now) cannot ever hold ``workers``
    copies of ``bundle`` under ``strategy``; None when they can."""
    fits = [capacity(n, bundle) for n in nodes]
    if strategy == "strict_pack" and max(fits, default=0) < workers:
        return "no single node holds them all (strict_pack)"
    if strategy == "strict_spread" and sum(f > 0 for f in fits) < workers:
        return f"{sum(f > 0 for f in fits)} node(s) can take one stage each (strict_spread)"
    if sum(fits) < workers:
        return f"its nodes can hold {sum(fits)} such stage(s)"
    return None


def trusted_shortfall(group: list[dict[str, float]], resource: str, strategy: str,
                      nodes: list[dict[str, float]], method: str) -> str | None:
    """Why the trusted bundles of ``group`` cannot go on the nodes carrying ``resource``
    (none has it; they hold too few); None when they can."""
    marked = [b for b in group if resource in b]
    if not marked:
        return None
    holders = [n for n in nodes if n.get(resource, 0) > 0]
    fix = (f"start a node with `ray start --resources '{{\"{resource}\": 1}}'`, or drop "
           "--trusted-resource (trusted_resource=None)")
    if not holders:
        return f"no node of the cluster has the resource {resource!r}; {fix}"
    why = shortfall(len(marked), marked[0], strategy, holders)
    if why is None:
        return None
    return (f"{len(marked)} stage(s) receive raw inputs or labels under {method} and must "
            f"run on the {len(holders)} node(s) with {resource!r}: {why}; {fix}, or give the "
            "stages fewer CPUs")
