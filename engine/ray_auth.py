"""A cluster with token authentication that refuses this client: one line, the fix, at once.

Why: against a head node started with ``RAY_AUTH_MODE=token`` (Ray 2.60), ``ray.init`` with
a wrong token, or with ``RAY_AUTH_MODE`` unset (no token sent), retries its GCS connection
once a second (a C++ warning each time) and then raises ``ConnectionError: Failed to
connect to Ray cluster at ...``, which says nothing of the token; with ``RAY_AUTH_MODE=token``
and no token at all it raises Ray's ``AuthenticationError`` (a traceback in the CLI). The job
server answers 401 (no token) or 403 (wrong token), which ``ray job submit`` prints as a
traceback. So the token is tried first: one GCS ``GetClusterId`` call through Ray's own
gRPC channel (it adds the token as Ray's clients do), one HTTP request to the job server,
and a refusal becomes a :class:`ClusterAuthError` naming the address and the fix.
"""

from __future__ import annotations

import os

from .errors import PipelineConfigError

__all__ = ["ClusterAuthError", "probe_auth", "probe_job_server_auth", "auth_refusal",
           "shown_address"]

TOKEN_FIX = ("RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file holding it, to the cluster's "
             "token (`ray get-auth-token` on its head node prints it)")


class ClusterAuthError(PipelineConfigError):
    """The cluster at an address refused this client's auth token (wrong, missing, or
    token mode off); the message names the address and what to set."""


def shown_address(address: str, resolved: str) -> str:
    """``address`` as the user gave it, with what it resolved to where that differs."""
    return address if resolved == address else f"{address} ({resolved})"


def _token_source() -> str:
    """Where Ray takes the token from (RAY_AUTH_TOKEN wins over RAY_AUTH_TOKEN_PATH, then
    the default file), for the message."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"RAY_AUTH_TOKEN_PATH={os.environ['RAY_AUTH_TOKEN_PATH']}"
    return "~/.ray/auth_token"


def _message(shown: str, token_mode: bool, has_token: bool) -> str:
    """The one line for a refusal at ``shown``: what was (not) sent, and what to set."""
    if not token_mode:
        mode = os.environ.get("RAY_AUTH_MODE")
        state = f"is {mode!r}" if mode else "is unset"
        return (f"the Ray cluster at {shown} requires token authentication and RAY_AUTH_MODE "
                f"{state}, so no token was sent; set RAY_AUTH_MODE=token and {TOKEN_FIX}")
    if not has_token:
        return (f"RAY_AUTH_MODE=token but no auth token found for {shown} (RAY_AUTH_TOKEN and "
                f"RAY_AUTH_TOKEN_PATH unset, no ~/.ray/auth_token); set {TOKEN_FIX}")
    return (f"the Ray cluster at {shown} refused the auth token from {_token_source()}; "
            f"set {TOKEN_FIX}")


def _has_token(shown: str, token_mode: bool) -> bool:
    """Whether Ray's own loader finds a token, whatever the mode; in token mode a token file
    that RAY_AUTH_TOKEN_PATH names but that cannot be read is a ClusterAuthError (Ray would
    refuse to connect), otherwise no token (Ray would not read it)."""
    from ray._raylet import AuthenticationTokenLoader
    from ray.exceptions import AuthenticationError

    try:
        return AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True)
    except AuthenticationError as err:
        if not token_mode:
            return False
        why = err.message.split(". ", 1)[0]
        raise ClusterAuthError(f"{why}, for {shown}; set {TOKEN_FIX}") from None


def _state(shown: str) -> tuple[bool, bool]:
    """(token mode on, a token found), as ``ray.init`` in this process sees them."""
    from ray._raylet import AuthenticationMode, get_authentication_mode

    token_mode = get_authentication_mode() == AuthenticationMode.TOKEN
    return token_mode, _has_token(shown, token_mode)


def probe_auth(address: str, resolved: str, timeout_s: float = 3.0) -> str | None:
    """Whether the GCS at ``resolved`` (``host:port``, answering TCP) accepts this client's
    token; a ClusterAuthError naming ``address`` and the fix when it does not.

    A missing token in token mode fails before any call (Ray's client aborts the process on
    it). Any other failure of the call is returned as its gRPC status name (``UNAVAILABLE``
    where no gRPC server speaks on the port, ``DEADLINE_EXCEEDED`` where nothing answers),
    None when the call succeeded or was not made, for the caller to judge.
    ``auto`` with RAY_AUTH_MODE unset and a token at hand is skipped: ``ray.init`` then turns
    token mode on by itself, and its refusal is read by :func:`auth_refusal`.
    """
    from ray._raylet import is_k8s_token_auth_enabled

    shown = shown_address(address, resolved)
    token_mode, has_token = _state(shown)
    unset_auto = address.strip() == "auto" and "RAY_AUTH_MODE" not in os.environ
    if is_k8s_token_auth_enabled() or (unset_auto and has_token):
        return None
    if token_mode and not has_token:
        raise ClusterAuthError(_message(shown, token_mode, has_token))
    status = _gcs_status(resolved, timeout_s)
    if status == "UNAUTHENTICATED":
        raise ClusterAuthError(_message(shown, token_mode, has_token))
    return status


def _gcs_status(resolved: str, timeout_s: float) -> str | None:
    """One ``GetClusterId`` call: None when it succeeds, else its gRPC status name."""
    try:
        import grpc
        from ray._private.grpc_utils import init_grpc_channel
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:  # pragma: no cover - ray without grpc: ray.init reports
        return None
    channel = init_grpc_channel(resolved)
    try:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s)
    except grpc.RpcError as err:
        return err.code().name
    finally:
        channel.close()
    return None


def auth_refusal(err: BaseException, address: str) -> ClusterAuthError | None:
    """The ClusterAuthError for a ``ray.init`` failure that is a token refusal (Ray's
    AuthenticationError, raised or in the ConnectionError's chain), else None: a fallback
    for what :func:`probe_auth` did not try."""
    from ray.exceptions import AuthenticationError

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, AuthenticationError) or "InvalidAuthToken" in str(seen):
            return ClusterAuthError(_message(address, *_state(address)))
        seen = seen.__cause__ or seen.__context__
    return None


def probe_job_server_auth(url: str, env: dict[str, str], timeout_s: float = 5.0) -> None:
    """Whether the job server at ``url`` accepts the token that ``ray job submit`` will send
    with ``env``; a ClusterAuthError naming ``url`` and the fix on 401 or 403. Any other
    answer (or none) is left to ``ray job submit``."""
    import urllib.error
    import urllib.request

    from ray._raylet import AuthenticationTokenLoader

    token_mode = env.get("RAY_AUTH_MODE", "").lower() == "token"
    has_token = _has_token(url, token_mode)
    if token_mode and not has_token:
        raise ClusterAuthError(_message(url, token_mode, has_token))
    headers = (AuthenticationTokenLoader.instance().get_token_for_http_header(
        ignore_auth_mode=True) if token_mode else {})
    request = urllib.request.Request(f"{url.rstrip('/')}/api/version", headers=headers)
    try:
        urllib.request.urlopen(request, timeout=timeout_s).close()
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            raise ClusterAuthError(_message(url, token_mode, has_token)) from None
    except OSError:
        pass
