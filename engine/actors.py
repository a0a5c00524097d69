"""Actor plumbing shared by every executor on Ray: the wire codec, one wait loop, actor start.

Why one module: the pipeline backend (``ray_backend``) and the shared-seed data-parallel
forward gradient (``fgdp``) both start actors in a placement group, send them numpy arrays
and wait for their answers failing fast on the first error. Written once here, they fail,
time out and count bytes the same way.

- ``to_wire`` / ``from_wire``: torch tensors cross as numpy arrays (a numpy argument of a Ray
  call is read zero-copy from shared memory; a tensor is pickled, measured 3-4x slower at
  4 MB, ``bench/transport.py``). ``wire_size`` is the pickled size of a message: what it
  carries over the wire.
- ``wait_all``: the results of one call per actor, in completion order, so the first failure
  is raised at once; silence beyond the deadline is an error too. It also accepts the
  results of ``LocalActor`` calls, so an in-process run goes through the same code.
- ``start_actors``: one actor per argument tuple, actor i in bundle i of a placement group.
- ``LocalActor``: an in-process stand-in for an actor handle (``h.method.remote(...)`` runs at
  once, arguments pickled and unpickled as over the wire): the one-process backend of a
  system written against actor handles.
"""

from __future__ import annotations

import pickle
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch

__all__ = ["to_wire", "from_wire", "wire_size", "wait_all", "start_actors", "LocalActor", "LocalRef"]


def to_wire(value: Any) -> Any:
    """Tensors become numpy arrays (zero-copy reads on the far side); tuples recurse."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: ship the tensor itself
            return t
        return t.numpy()
    if isinstance(value, tuple):
        return tuple(to_wire(v) for v in value)
    return value


def from_wire(value: Any, device: torch.device | str = "cpu") -> Any:
    """The inverse of :func:`to_wire`: numpy arrays become owned torch tensors."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value, copy=True)).to(device)
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(from_wire(v, device) for v in value)
    return value


def wire_size(obj: Any) -> int:
    """Bytes of ``obj`` pickled (protocol 5): what one message carries over the wire."""
    return len(pickle.dumps(obj, protocol=5))


def _copied(args: tuple, copy: bool) -> tuple:
    # a pickle round trip, as over the wire: no object is shared with the caller
    return pickle.loads(pickle.dumps(args, protocol=5)) if copy else args


class LocalRef:
    """The already-computed result (or error) of an in-process call."""

    def __init__(self, fn: Callable, args: tuple, copy: bool = True) -> None:
        try:
            self.value, self.error = fn(*_copied(args, copy)), None
        except Exception as err:  # noqa: BLE001 - re-raised by wait_all, naming the actor
            self.value, self.error = None, err


class _LocalMethod:
    def __init__(self, fn: Callable, copy: bool) -> None:
        self.fn, self.copy = fn, copy

    def remote(self, *args) -> LocalRef:
        return LocalRef(self.fn, args, self.copy)


class LocalActor:
    """An in-process stand-in for a Ray actor handle: ``h.method.remote(...)`` runs at once.

    ``copy=False`` passes arguments by reference (an object that itself holds actor handles,
    such as a coordinator living in the driver, must not get copies of them).
    """

    def __init__(self, cls: type, args: tuple, copy: bool = True) -> None:
        self.obj = cls(*_copied(args, copy))
        self.copy = copy

    def __getattr__(self, name: str) -> _LocalMethod:
        if name.startswith("__") or name in ("obj", "copy"):
            raise AttributeError(name)
        return _LocalMethod(getattr(self.obj, name), self.copy)


def wait_all(
    refs: Sequence[Any],
    timeout_s: float,
    on_error: Callable[[int, BaseException], None],
    on_timeout: Callable[[list[int]], None],
    *,
    poll_s: float = 5.0,
    on_idle: Callable[[], None] | None = None,
) -> list:
    """Results of one call per actor; ``on_error(i, err)`` / ``on_timeout(indices)`` raise.

    Ray object refs are waited for in completion order, so the first failure surfaces at
    once instead of after the slower actors; ``timeout_s`` bounds the whole wait. In-process
    results (``LocalRef``) are checked in order. ``on_error`` and ``on_timeout`` must raise
    (the caller's own error type, naming the actor); if they return, a RuntimeError is
    raised. ``on_idle()``, if given, runs after every poll that returned nothing (the Ray
    backend checks that a joined cluster's head still answers, so a dead head fails in
    seconds instead of Ray's 60 s reconnect window).
    """
    refs = list(refs)
    if all(isinstance(r, LocalRef) for r in refs):
        for i, r in enumerate(refs):
            if r.error is not None:
                on_error(i, r.error)
                raise RuntimeError(f"on_error returned for actor {i}: {r.error}")
        return [r.value for r in refs]
    import ray

    index = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    pending = list(refs)
    deadline = time.monotonic() + timeout_s
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            late = sorted(index[r] for r in pending)
            on_timeout(late)
            raise RuntimeError(f"on_timeout returned for actors {late}")
        ready, pending = ray.wait(pending, num_returns=1, timeout=min(left, poll_s))
        if not ready and on_idle is not None:
            on_idle()
        for ref in ready:
            try:
                results[index[ref]] = ray.get(ref)
            except Exception as err:  # noqa: BLE001 - becomes the caller's own error
                on_error(index[ref], err)
                raise RuntimeError(f"on_error returned for actor {index[ref]}: {err}") from err
    return results


def start_actors(
    cls: type,
    args: Sequence[tuple],
    *,
    cpus: float,
    gpus: float = 0.0,
    placement_group: Any = None,
    max_concurrency: int = 1,
    env: dict[str, str] | None = None,
) -> list:
    """One Ray actor of ``cls`` per argument tuple; actor i in bundle i of ``placement_group``.

    Actors never restart (a dead worker is an error the caller reports, not a silent
    replacement with lost state). ``env`` goes in each actor's ``runtime_env`` only where
    the cluster's workers lack it: the private cluster :func:`~brigade.engine.ray_cluster.ensure_ray`
    starts hands its workers the stage environment, and an actor without a ``runtime_env``
    of its own can take one of the pre-started worker processes instead of waiting for a
    fresh one.
    """
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from .ray_cluster import workers_inherit

    if env and workers_inherit(env):
        env = None
    remote_cls = ray.remote(cls)
    handles = []
    for i, a in enumerate(args):
        options: dict[str, Any] = dict(num_cpus=cpus, num_gpus=gpus, max_concurrency=max_concurrency,
                                       max_restarts=0, max_task_retries=0)
        if env:
            options["runtime_env"] = {"env_vars": dict(env)}
        if placement_group is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group, placement_group_bundle_index=i)
        handles.append(remote_cls.options(**options).remote(*a))
    return handles
