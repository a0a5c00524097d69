"""Joining a Ray cluster, or starting a local one on demand."""

from __future__ import annotations

import logging
import os

from .errors import PipelineConfigError

__all__ = ["ensure_ray"]


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Make sure Ray is initialised; returns True when this call started it.

    ``address=None`` starts a private local cluster sized to this machine (no dashboard:
    it costs a process and seconds of start-up), even where ``ray start --head`` runs on
    this machine (plain ``ray.init()`` would join that one), unless ``RAY_ADDRESS`` names
    a cluster: a ``ray job submit`` entrypoint runs with it set, and joins that cluster.
    ``"auto"`` or ``host:port`` joins an existing cluster, as ``ray.init`` does.
    """
    import ray

    if ray.is_initialized():
        return False
    if address is None and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
    kwargs = dict(logging_level=logging.WARNING, log_to_driver=True)
    if address is None:
        kwargs.update(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False)
    try:
        ray.init(address="local" if address is None else address, **kwargs)
    except ConnectionError as err:
        raise PipelineConfigError(
            f"cannot reach a Ray cluster at address={address!r} ({err}); start one with "
            "`ray start --head` or omit --address to start a local cluster"
        ) from err
    return True
