"""Third-party messages that say nothing to a brigade user, kept out of brigade's output.

Only named messages are dropped, each by its logger and its opening words, never a whole
logger or all warnings: a message Ray adds later still shows.

- Ray 2.60 logs "Token authentication is enabled for this Ray cluster. Set
  RAY_AUTH_MODE=disabled to opt out ..." (``ray._private.authentication.
  authentication_token_setup``, a WARNING) on every ``ray.init`` of a local cluster when a
  token exists and RAY_AUTH_MODE is unset: it reports the safe default and invites the user
  to turn it off. Its opposite ("... is disabled ... Anyone with network access ...") is a
  real warning and is kept.
"""

from __future__ import annotations

import logging

__all__ = ["quiet_ray", "SILENCED"]

# logger name -> opening words of the messages dropped from it
SILENCED: dict[str, tuple[str, ...]] = {
    "ray._private.authentication.authentication_token_setup": (
        "Token authentication is enabled for this Ray cluster",
    ),
}


class _DropNamed(logging.Filter):
    """Drops records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def quiet_ray() -> None:
    """Install the filters (once per process; calling again is harmless)."""
    for name, prefixes in SILENCED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNamed) for f in logger.filters):
            logger.addFilter(_DropNamed(prefixes))
