"""The ``brigade`` command line: one module per subcommand, registered in ``COMMANDS``.

Each subcommand module exposes ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``. Errors that a user caused (``UsageError`` and the libraries'
configuration errors) print one line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import sys

__all__ = ["main", "UsageError", "build_parser"]

# Subcommand modules, imported lazily so that `brigade schedule` never imports torch or ray:
# a named command imports its own module only (``<name>_cmd``); help imports them all.
COMMANDS = [
    "brigade.engine.cli.models_cmd",
    "brigade.engine.cli.methods_cmd",
    "brigade.engine.cli.train_cmd",
    "brigade.engine.cli.race_cmd",
    "brigade.engine.cli.schedule_cmd",
    "brigade.engine.cli.report_cmd",
    "brigade.engine.cli.fwdgrad_cmd",
    "brigade.engine.cli.submit_cmd",
]


class UsageError(ValueError):
    """A bad command-line value; the message names the value and what would work."""


def int_list(flag: str, text: str, example: str, what: str = "comma-separated integers"
             ) -> list[int]:
    """``"2,3"`` -> ``[2, 3]``; anything else is a UsageError naming ``flag`` and the value."""
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r} must be {what}, e.g. {example}") from None


def _usage_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean 'the user asked for something invalid' (exit 2).

    Only from modules already imported (an error that was raised comes from one): importing
    ``brigade.stages`` here would load torch, seconds on a busy machine, before a fast
    failure such as an unreachable ``--address`` is printed.
    """
    kinds: list[type[BaseException]] = [UsageError]
    for mod, name in (
        ("brigade.stages.errors", "ConfigError"),
        ("brigade.schedulers.errors", "ScheduleError"),
        ("brigade.engine.errors", "PipelineConfigError"),
    ):
        module = sys.modules.get(mod)
        if module is not None and hasattr(module, name):
            kinds.append(getattr(module, name))
    return tuple(kinds)


def _runtime_errors() -> tuple[type[BaseException], ...]:
    """Failures during a run (a stage died, a deadlock): one line, exit status 1."""
    try:
        from brigade.engine.errors import PipelineError
    except ImportError:  # pragma: no cover
        return ()
    return (PipelineError,)


class _DefaultsFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (flags that already say it, on/off
    switches and --help excepted)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("%(default)" in text or "(default:" in text or not action.option_strings
                or action.default is argparse.SUPPRESS or action.nargs == 0):
            return text
        shown = "none" if action.default is None else "%(default)s"
        return f"{text} (default: {shown})".strip()

    def _format_action(self, action: argparse.Action) -> str:
        """An option without help still gets its default line."""
        if (not action.help and action.option_strings and action.nargs != 0
                and action.default is not argparse.SUPPRESS):
            action = copy.copy(action)
            action.help = "(default: none)" if action.default is None else "(default: %(default)s)"
        return super()._format_action(action)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help shows defaults; subcommands inherit it."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)


def version() -> str:
    """brigade's installed version, with torch's and ray's (what a bug report needs)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    def of(name: str) -> str:
        try:
            return dist_version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"brigade {of('brigade')} (torch {of('torch')}, ray {of('ray')})"


def _name_of(path: str) -> str:
    """The subcommand a module path declares by convention: ``..._cmd`` -> its stem."""
    stem = path.rsplit(".", 1)[-1]
    return stem[: -len("_cmd")] if stem.endswith("_cmd") else stem


def build_parser(only: str | None = None) -> tuple[argparse.ArgumentParser, dict[str, object]]:
    """Build the top-level parser; returns it and a map from subcommand name to module.
    ``only``: import and add that subcommand alone (when it is one of ``COMMANDS``), so
    running one command does not import the others' dependencies."""
    parser = _Parser(
        prog="brigade",
        description="Pipeline-parallel training with asynchronous stages.",
    )
    parser.add_argument("--version", action="version", version=version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules: dict[str, object] = {}
    paths = [p for p in COMMANDS if _name_of(p) == only] or COMMANDS
    for path in paths:
        mod = importlib.import_module(path)
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        modules[mod.NAME] = mod
    return parser, modules


def _leave(status: int, console_script: bool) -> int:
    """``status``, for main() to return; but the console script of a run whose Ray cluster
    lost its head node exits at once (``os._exit``): Ray's core worker threads and exit
    hooks would wait on the dead GCS, past the seconds in which the failure must end."""
    cluster = sys.modules.get("brigade.engine.ray_cluster")
    if console_script and cluster is not None and cluster.head_lost():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``brigade`` console script."""
    given = list(sys.argv[1:] if argv is None else argv)
    parser, modules = build_parser(only=given[0] if given else None)
    args = parser.parse_args(given)
    args.argv = given  # for commands that re-launch
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(modules[args.command].run(args) or 0)
    except _usage_errors() as err:
        print(f"brigade {args.command}: error: {err}", file=sys.stderr)
        return 2
    except _runtime_errors() as err:
        print(f"brigade {args.command}: failed: {err}", file=sys.stderr)
        return _leave(1, console_script=argv is None)
    except KeyboardInterrupt:
        print(f"brigade {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
