"""Costs: how long each kind of action takes on each stage, and what messages cost.

Per-stage fields take a scalar (every stage the same) or a list with one value per stage.
Backward: give ``b`` alone (then ``i = w = b/2``), or ``i`` and ``w`` (then ``b = i + w``);
with none of them, ``b = 2f`` (the usual rule of thumb) and ``i = w = f``.

Durations the simulator charges (each kind's ``cost`` fields in :mod:`.kinds`, summed)::

    F  f          B  b          I  i          W  w          U  u
    S  f + b + u  (DNI: forward, backward from the synthetic gradient, update)
    T  sg         (DNI: the synthetic-gradient module's predict + train)
    R  r + b      (PETRA: reconstruct the input, then backward; r defaults to f)
    D  0          (fwdgrad: add the scalars d to the step's coefficients)
    SF, SB  bytes / bandwidth on the sender;  RF, RB  0 (the receiver waits ``latency``)

An unlowered action that sends to other workers also spends ``send`` (per stage, seconds per
message: serialising and copying it into the transport) after its compute; the timeline
shows it as a ``send`` span, so it counts as communication, not busy time, as in a
measured run (where ``brigade`` records each send on its own).

Under ``fwdgrad`` an ``F`` is a forward with tangents (a jvp per projection), several times
a plain forward; a stage's first ``F`` of a step also draws the step's directions (kept for
its later ones), so it costs the most: give ``f`` as the mean over a step's forwards, as
``brigade report`` calibrates it from a run. Its forward message carries the activation and its tangents, ``1 + n``
activations for ``n`` projections: give ``activation_bytes`` as that size.

A message between workers arrives ``latency + bytes / bandwidth`` after its producer ends
(``bandwidth`` 0 or infinite: bytes are free). Bytes: the activation a stage outputs
(``activation_bytes[s]``) forward, the same size for its gradient backward, twice that for
PETRA (reconstructed input and its gradient), none for fwdgrad's d (a few scalars).

``stores_activations`` (per stage) says whether a stage keeps the activations of in-flight
microbatches; ``None`` means "by schedule": its declaration's ``stores_activations``
(PETRA's reversible stages and fwdgrad's forward-only stages store nothing, every other
schedule stores).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

from .errors import ScheduleError

__all__ = ["Costs", "PER_STAGE", "LINKED_FIELDS"]

PerStage = float | Sequence[float]
# Fields that take one value per stage.
PER_STAGE = ("f", "b", "i", "w", "u", "sg", "r", "send", "activation_bytes")
# Fields derived from each other (b = i + w): a field given or zeroed settles the others.
LINKED_FIELDS = {"b": ("b", "i", "w"), "i": ("b", "i", "w"), "w": ("b", "i", "w")}
_SCALARS = ("latency", "bandwidth", "microbatch_size")
_KEYS = PER_STAGE + _SCALARS + ("stores_activations",)


@dataclass
class Costs:
    """Per-stage action costs (seconds, or any unit used consistently) and message costs."""

    f: PerStage = 1.0
    b: PerStage | None = None
    i: PerStage | None = None
    w: PerStage | None = None
    u: PerStage = 0.0
    sg: PerStage = 0.0
    r: PerStage | None = None
    send: PerStage = 0.0
    latency: float = 0.0
    bandwidth: float = 0.0
    activation_bytes: PerStage = 0.0
    stores_activations: bool | Sequence[bool] | None = None
    microbatch_size: float = 1

    def __post_init__(self) -> None:
        for name in PER_STAGE:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _values(name, value))
        for name in ("latency", "bandwidth"):
            setattr(self, name, _number(name, getattr(self, name), allow_inf=True))
        if _number("microbatch_size", self.microbatch_size) <= 0:
            raise ScheduleError(f"microbatch_size must be > 0 (samples per microbatch), got "
                                f"{self.microbatch_size!r}")
        if isinstance(self.stores_activations, (list, tuple)):
            self.stores_activations = [bool(x) for x in self.stores_activations]
        lengths = {len(v) for v in self._lists().values()}
        if len(lengths) > 1:
            raise ScheduleError(
                "per-stage cost lists differ in length ("
                + ", ".join(f"{k}: {len(v)}" for k, v in self._lists().items())
                + "); give one value per stage, or a scalar for all stages")

    def _lists(self) -> dict[str, list]:
        """The fields given as per-stage lists."""
        out = {n: getattr(self, n) for n in PER_STAGE + ("stores_activations",)}
        return {n: v for n, v in out.items() if isinstance(v, list)}

    # -- per-stage values ----------------------------------------------------------------
    def resolve(self, num_stages: int, schedule: str = "") -> "Costs":
        """A copy whose per-stage fields are lists of ``num_stages`` values, with ``b``,
        ``i``, ``w``, ``r`` and ``stores_activations`` filled in (the latter by schedule)."""
        out = {n: _broadcast(n, getattr(self, n), num_stages) for n in PER_STAGE
               if getattr(self, n) is not None}
        f = out["f"]
        b, i, w = out.get("b"), out.get("i"), out.get("w")
        if b is None and i is None and w is None:
            b, i, w = [2 * x for x in f], list(f), list(f)
        elif b is None:
            i = i if i is not None else w
            w = w if w is not None else i
            b = [x + y for x, y in zip(i, w)]
        elif i is None and w is None:
            i = w = [x / 2 for x in b]
        else:
            i = i if i is not None else [x - y for x, y in zip(b, w)]
            w = w if w is not None else [x - y for x, y in zip(b, i)]
            if min(i + w) < 0:
                raise ScheduleError(f"b={b} is smaller than the i or w given with it; "
                                    "give b alone, or i and w")
        out.update(b=b, i=i, w=w, r=out.get("r", list(f)))
        stores = self.stores_activations
        if stores is None:
            stores = _stores_by_schedule(schedule)
        out["stores_activations"] = _broadcast("stores_activations", stores, num_stages)
        return replace(self, **out)

    def chunked(self, workers: int, virtual: int) -> "Costs":
        """Costs for the same model cut into ``virtual`` chunks per worker (interleaved):
        time costs divide by ``virtual``; a list of one value per worker expands to one per
        virtual stage (stage ``c*workers + w`` takes worker w's value); message costs and
        activation sizes stay as they are."""
        if virtual == 1:
            return replace(self)
        out: dict[str, Any] = {}
        for name in PER_STAGE + ("stores_activations",):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, list):
                if len(value) != workers:
                    raise ScheduleError(
                        f"cost {name} has {len(value)} values; to split it into {virtual} "
                        f"chunks per worker give one per worker ({workers})")
                value = value * virtual
            if name not in ("activation_bytes", "stores_activations", "send"):  # per message
                value = [x / virtual for x in value] if isinstance(value, list) \
                    else value / virtual
            out[name] = value
        return replace(self, **out)

    def message_time(self, nbytes: float) -> float:
        """Seconds from the end of a send's producer to the message's arrival."""
        return self.latency + self.transfer_time(nbytes)

    def transfer_time(self, nbytes: float) -> float:
        """Seconds the bytes take on the wire (0 when bandwidth is 0 or infinite)."""
        if self.bandwidth in (0.0, math.inf) or not nbytes:
            return 0.0
        return nbytes / self.bandwidth

    # -- construction --------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> "Costs":
        """Read the command-line form ``"f=1,b=2,u=0.1,latency=0.05"``; per-stage lists
        separate values with ``:`` (``f=1:2:1:1``, ``stores_activations=1:0:0:1``)."""
        given: dict[str, Any] = {}
        for item in filter(None, (x.strip() for x in (text or "").split(","))):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or key not in _KEYS:
                raise ScheduleError(
                    f"cannot read cost {item!r}: write key=value with keys "
                    f"{', '.join(_KEYS)} (e.g. 'f=1,b=2,latency=0.05')")
            given[key] = _parse_value(key, value.strip())
        return cls(**given)

    @classmethod
    def from_profile(cls, forward_s: Sequence[float], backward_s: Sequence[float],
                     input_s: Sequence[float] | None = None,
                     weight_s: Sequence[float] | None = None, **others: Any) -> "Costs":
        """Costs from measured per-stage forward and backward seconds (the partition
        table's times), and the split backward's I and W seconds where they were profiled
        (else zero-bubble schedules get half the backward each); ``others`` sets the
        remaining fields (latency, bandwidth, ...)."""
        lists = {"forward": forward_s, "backward": backward_s, "I": input_s, "W": weight_s}
        for name, values in lists.items():
            if values is not None and len(values) != len(forward_s):
                raise ScheduleError(
                    f"the profile has {len(forward_s)} forward times but {len(values)} "
                    f"{name} times; give one of each per stage")
        split = {}
        if input_s is not None and weight_s is not None:
            split = {"i": [float(x) for x in input_s], "w": [float(x) for x in weight_s]}
        return cls(f=[float(x) for x in forward_s], b=[float(x) for x in backward_s],
                   **split, **others)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields; a per-stage list whose values are all equal becomes a scalar."""
        out = {}
        for key, value in asdict(self).items():
            if isinstance(value, list) and value and all(x == value[0] for x in value):
                value = value[0]
            out[key] = value
        return out


def _stores_by_schedule(name: str) -> bool:
    """The schedule's declared fact (forward-only and reversible ones store nothing); a
    schedule that is not registered (a hand-written one) stores."""
    from .registry import names, schedule_spec

    if str(name).strip().lower() not in names():
        return True
    return bool(schedule_spec(name).stores_activations)


def _number(name: str, value: Any, allow_inf: bool = False) -> float:
    """A finite (or, where allowed, infinite) number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ScheduleError(f"cost {name} must be a number >= 0, got {value!r}")
    bad = value < 0 or math.isnan(value) or (math.isinf(value) and not allow_inf)
    if bad:
        raise ScheduleError(f"cost {name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _values(name: str, value: Any) -> float | list[float]:
    """A scalar, or a non-empty list of numbers >= 0."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ScheduleError(f"cost {name} is an empty list; give one value per stage")
        return [_number(name, x) for x in value]
    return _number(name, value)


def _broadcast(name: str, value: Any, n: int) -> list:
    """``n`` values from a scalar or a list of exactly ``n``."""
    if isinstance(value, list):
        if len(value) != n:
            raise ScheduleError(
                f"cost {name} has {len(value)} values but the schedule has {n} stages; "
                f"give {n} values, or one for all")
        return list(value)
    return [value] * n


def _parse_value(key: str, text: str) -> Any:
    """A number, a ``:``-separated list, or booleans for stores_activations."""
    parts = text.split(":")
    try:
        if key == "stores_activations":
            vals = [_bool(p) for p in parts]
        else:
            vals = [float(p) for p in parts]
    except ValueError:
        raise ScheduleError(f"cannot read {key}={text!r}: expected "
                            + ("1/0 or true/false" if key == "stores_activations"
                               else "a number") + ", or a ':'-separated list per stage"
                            ) from None
    return vals if len(vals) > 1 else vals[0]


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "y"):
        return True
    if low in ("0", "false", "no", "n"):
        return False
    raise ValueError(text)

