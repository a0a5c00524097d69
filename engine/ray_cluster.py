"""Joining a Ray cluster, or starting a local one on demand; failing fast when it is not there.

Why the probes: ``ray.init(address="127.0.0.1:1")`` retries its GCS connection for minutes
before it gives up, and a driver whose head node died waits out Ray's 60 s reconnect window.
So before ``ray.init`` the address is resolved (``auto`` included) and its TCP port tried
(:func:`probe_address`, a second at most), Ray's own connect timeouts are bounded where the
user has not set them, and :func:`gcs_alive` lets the backend's wait loop notice a dead
head node within seconds. Once it has (:func:`mark_lost`), nothing more waits on the dead
GCS: :func:`leave_ray` skips ``ray.shutdown()`` and Ray's own exit hook is taken off (either
blocks for seconds there). A cluster with token authentication that refuses this client's
token (wrong, missing, RAY_AUTH_MODE unset) is told in milliseconds too (:mod:`.ray_auth`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import Iterator

from .errors import PipelineConfigError, PipelineError
from .quiet import quiet_ray
from .ray_auth import auth_refusal, probe_auth, shown_address

__all__ = ["ensure_ray", "probe_address", "probe_cluster", "resolve_address", "gcs_alive",
           "ClusterGoneError", "ClusterLostError", "joined_gcs_address", "CONNECT_TIMEOUT_S",
           "workers_inherit", "private_cluster", "cluster_summary", "lost_cluster_error",
           "mark_lost", "head_lost", "leave_ray"]

# (GCS address, environment) of the private cluster this process started: its worker
# processes inherit that environment, so stage actors need no runtime_env of their own.
_STARTED: tuple[str, dict[str, str]] | None = None
# (address as given, host:port it resolved to) of the cluster ensure_ray joined: a lost head
# is named as the user typed it (the GCS address Ray reports may be another of its IPs).
_JOINED: tuple[str, str] | None = None
# The GCS address of a joined cluster whose head stopped answering (mark_lost).
_LOST: str | None = None

CONNECT_TIMEOUT_S = 2.0  # a TCP connect on a LAN takes milliseconds; a dead host, forever
# One GCS call answers in milliseconds; a port that takes TCP but speaks no gRPC (another
# service, a proxy) would have ray.init retrying for minutes (166 s measured).
AUTH_PROBE_S = 3.0
NOT_A_GCS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "UNIMPLEMENTED")

# Ray's GCS connect budgets while a driver joins a cluster; an exported RAY_<name> wins. Set
# for the ray.init call only (a local head started later in the same process keeps Ray's
# defaults). The retry count is read by ray._private.node at ray.init; the two timeouts go
# to Ray's C++ config, which was seen not to change once ray is imported (a port that took
# TCP but was no GCS still took 166 s), so probe_cluster, not these, catches such a port.
_JOIN_TIMEOUTS = {
    "RAY_gcs_server_port_wait_time_s": "4",   # GCS client attempts, about 1 s each
    "RAY_gcs_rpc_server_connect_timeout_s": "4",
    "RAY_py_gcs_connect_timeout_s": "4",
}


class ClusterGoneError(PipelineConfigError):
    """The Ray cluster named by an address does not answer (nothing listens there)."""


class ClusterLostError(PipelineError):
    """The head node of the cluster a run joined stopped answering mid-run."""

    def __init__(self, address: str, port: str | None = None) -> None:
        self.address = address
        port = port or address.rpartition(":")[2]
        super().__init__(
            f"the Ray cluster at {address} stopped answering mid-run (its head node is gone); "
            f"restart it (`ray start --head --port {port}`) and run again, with --resume "
            "where the run saved a --checkpoint")


def resolve_address(address: str) -> str:
    """``auto`` (the cluster ``ray start`` left on this machine) or ``[ray://]host:port`` ->
    ``host:port``; a ClusterGoneError when ``auto`` finds none."""
    text = address.strip()
    if text.startswith("ray://"):
        text = text[len("ray://"):]
    if text == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            found = canonicalize_bootstrap_address("auto")
        except (ConnectionError, ValueError) as err:
            raise ClusterGoneError(
                f"--address auto: no running Ray cluster found on this machine ({err}); "
                "start one with `ray start --head`, name one with --address HOST:PORT, or "
                "omit --address to start a local cluster") from None
        if not found:
            raise ClusterGoneError(
                "--address auto: no running Ray cluster found on this machine; start one "
                "with `ray start --head`, or omit --address to start a local cluster")
        return found
    return text


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise PipelineConfigError(
            f"--address {address!r} must be auto or HOST:PORT (e.g. 127.0.0.1:6379)")
    return host.strip("[]"), int(port)


def probe_address(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> str:
    """Resolve ``address`` and open (then close) a TCP connection to it; returns
    ``host:port``. A ClusterGoneError naming the address and the fix when nothing listens."""
    resolved = resolve_address(address)
    host, port = _split(resolved)
    shown = shown_address(address, resolved)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as err:
        why = "timed out" if isinstance(err, socket.timeout) else (err.strerror or str(err))
        raise ClusterGoneError(
            f"no Ray cluster answers at --address {shown}: {why}; start its head node "
            f"(`ray start --head --port {port}`), pass the address `ray start` printed, or "
            "omit --address to start a local cluster") from None
    return resolved


def probe_cluster(address: str) -> str:
    """:func:`probe_address`, then whether the GCS there takes this client's auth token
    (:func:`~.ray_auth.probe_auth`): both failures are one line within seconds, where
    ``ray.init`` would retry, then raise an error that does not say why."""
    resolved = probe_address(address)
    status = probe_auth(address, resolved, AUTH_PROBE_S)
    if status in NOT_A_GCS:
        shown = shown_address(address, resolved)
        raise ClusterGoneError(
            f"something listens at --address {shown} but no Ray cluster answers there "
            f"(gRPC {status} after {AUTH_PROBE_S:g} s); pass the GCS address `ray start --head` "
            "printed (port 6379 by default), or omit --address to start a local cluster")
    return resolved


def gcs_alive(address: str | None, timeout_s: float = 1.0) -> bool:
    """Whether the GCS at ``host:port`` still accepts connections (None: unknown, True)."""
    if not address:
        return True
    try:
        host, port = _split(address)
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except (OSError, PipelineConfigError):
        return False


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Make sure Ray is initialised; returns True when this call started it.

    ``address=None`` starts a private local cluster sized to this machine (no dashboard:
    it costs a process and seconds of start-up), even where ``ray start --head`` runs on
    this machine (plain ``ray.init()`` would join that one), unless ``RAY_ADDRESS`` names
    a cluster: a ``ray job submit`` entrypoint runs with it set, and joins that cluster.
    ``"auto"`` or ``host:port`` joins an existing cluster, as ``ray.init`` does, once its
    port answers (:func:`probe_address`).

    A private cluster starts with the stage processes' environment (``actor_env``) in its
    own, so its pre-started worker processes can host the stage actors at once. Why: an
    actor with a ``runtime_env`` of its own cannot use them and waits for a fresh Python
    process; measured on 2 busy cores (load 21-26), two actors took 6.6-9.0 s that way
    against 9.2-11.7 s with their own ``runtime_env``.
    """
    global _STARTED, _JOINED, _LOST
    import ray

    if ray.is_initialized():
        return False
    if address is None and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
    kwargs = dict(logging_level=logging.WARNING, log_to_driver=True)
    env: dict[str, str] = {}
    if address is None:
        from .ray_backend import actor_env

        env = actor_env()
        kwargs.update(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False)
    else:
        resolved = probe_cluster(address)  # seconds, not Ray's minutes of retries
    quiet_ray()
    added = [k for k in _JOIN_TIMEOUTS if address is not None and k not in os.environ]
    os.environ.update({k: _JOIN_TIMEOUTS[k] for k in added})
    _STARTED = _JOINED = _LOST = None
    try:
        with _environment(env):
            ray.init(address="local" if address is None else address, **kwargs)
    except ConnectionError as err:
        refused = auth_refusal(err, address) if address else None  # probe_auth skipped it
        if refused is not None:
            raise refused from None
        raise ClusterGoneError(
            f"no Ray cluster answers at --address {address} ({err}); check the address "
            "`ray start --head` printed, or omit --address to start a local cluster"
        ) from err
    finally:
        for key in added:
            os.environ.pop(key, None)
    if address is None:
        _STARTED = (ray.get_runtime_context().gcs_address, env)
    else:
        _JOINED = (address, resolved)
    return True


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """``env`` in ``os.environ`` while the cluster's processes are spawned, then as before."""
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def private_cluster() -> bool:
    """Whether the connected cluster is the private one :func:`ensure_ray` started here."""
    import ray

    return (_STARTED is not None and ray.is_initialized()
            and ray.get_runtime_context().gcs_address == _STARTED[0])


def workers_inherit(env: dict[str, str]) -> bool:
    """Whether the connected cluster's worker processes already run with ``env`` (it is the
    private cluster :func:`ensure_ray` started with it)."""
    return private_cluster() and all(_STARTED[1].get(k) == v for k, v in env.items())


def cluster_summary() -> dict[str, float]:
    """Nodes, CPUs and GPUs of the connected cluster (for the start-up line)."""
    import ray

    total = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return {"nodes": nodes, "cpus": total.get("CPU", 0.0), "gpus": total.get("GPU", 0.0)}


def joined_gcs_address() -> str | None:
    """The GCS address of the cluster this driver joined, None for a private one that it
    started (its head dies with the driver, nothing to watch)."""
    import ray

    try:
        ctx = ray.get_runtime_context()
        return ctx.gcs_address if not _is_private() else None
    except Exception:  # noqa: BLE001 - not initialised
        return None


def _is_private() -> bool:
    """Whether this process started the cluster it runs on (ray.init(address="local"))."""
    import ray

    node = getattr(ray._private.worker.global_worker, "node", None)
    return bool(node is not None and getattr(node, "head", False))


def lost_cluster_error(gcs_address: str) -> ClusterLostError:
    """The one line for a joined cluster whose head at ``gcs_address`` stopped answering,
    naming the address as the user gave it where this process joined through it."""
    port = gcs_address.rpartition(":")[2]
    shown = gcs_address
    if _JOINED is not None and _JOINED[1].rpartition(":")[2] == port:
        shown = shown_address(*_JOINED)
    return ClusterLostError(shown, port)


def mark_lost(gcs_address: str) -> None:
    """Remember that the head at ``gcs_address`` stopped answering, and take Ray's atexit
    ``ray.shutdown`` off. Why: with the GCS gone, shutting the core worker down waits on it
    (5.3 s measured, then more at exit), so a failed run would not end within seconds."""
    global _LOST
    import atexit

    from ray._private import worker

    _LOST = gcs_address
    atexit.unregister(worker.shutdown)


def head_lost(gcs_address: str | None = None) -> bool:
    """Whether :func:`mark_lost` marked the head at ``gcs_address`` (None: any) lost."""
    return _LOST is not None and gcs_address in (None, _LOST)


def leave_ray() -> None:
    """``ray.shutdown()``, unless the joined cluster's head is lost: then it would wait on
    the dead GCS, and there is nothing left to leave (its actors went with it)."""
    import ray

    if not head_lost():
        ray.shutdown()
