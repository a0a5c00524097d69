"""Errors of ``brigade.stages``: one kind, raised for anything a user configured wrongly.

``ConfigError`` subclasses ``ValueError`` so that callers who already catch ``ValueError``
keep working; the command line prints it as one line and exits with status 2. Every message
names the offending value and what would work (the valid choices, or the numbers that fit).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["ConfigError", "choose"]


class ConfigError(ValueError):
    """A bad model, partition or data set setting; the message says what would work."""


def choose(kind: str, value: str, choices: Iterable[str]) -> str:
    """Return the canonical spelling of ``value`` among ``choices``, ignoring case.

    Registries are case-insensitive so that ``--model ResNet18`` works; an unknown name
    raises ``ConfigError`` listing every valid name, so the user never has to guess.
    """
    names = list(choices)
    if isinstance(value, str):
        for name in names:
            if name.lower() == value.lower():
                return name
    raise ConfigError(f"unknown {kind} {value!r}; valid: {', '.join(names)}")
