"""``brigade submit``: run ``brigade train`` on a Ray cluster as a Ray job.

A thin wrapper around ``ray job submit``: the train flags are checked here first (a bad
value exits 2 before anything is sent), the job server address defaults the way Ray's does,
token authentication is switched on for the client where a token is at hand, and the
command waits for the job while its logs stream (``ray job submit`` tails them). The job's
``brigade train`` joins the cluster through the RAY_ADDRESS that Ray sets for it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from . import UsageError

__all__ = ["NAME", "HELP", "add_arguments", "run", "job_command"]

NAME = "submit"
HELP = "Submit `brigade train FLAGS` to a Ray cluster as a Ray job; wait and print its logs."
DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.usage = "brigade submit [options] -- TRAIN_FLAGS..."
    p.add_argument("--address", default=None, metavar="URL",
                   help="the cluster's job server (dashboard) address; default: "
                        f"$RAY_API_SERVER_ADDRESS, else {DEFAULT_ADDRESS}")
    p.add_argument("--working-dir", default=None, metavar="DIR",
                   help="a folder uploaded for the job and its working directory (data, "
                        "outputs: relative --json/--save paths land in the job's copy)")
    p.add_argument("--submission-id", default=None, metavar="ID",
                   help="name the job (default: Ray makes one)")
    p.add_argument("--no-wait", action="store_true",
                   help="return once submitted; follow with `ray job logs --follow ID`")
    p.add_argument("--print", dest="dry_run", action="store_true",
                   help="print the `ray job submit` command and exit")
    p.add_argument("train_args", nargs=argparse.REMAINDER,
                   help="flags of `brigade train`, after --")


def _train_args(args: argparse.Namespace) -> list[str]:
    """The train flags, checked with ``brigade train``'s own parser and config."""
    from . import train_cmd

    flags = list(args.train_args)
    if flags[:1] == ["--"]:
        flags = flags[1:]
    if not flags:
        raise UsageError("no train flags; give them after --, e.g. brigade submit -- "
                         "--model mlp --data synthetic --steps 20")
    parser = argparse.ArgumentParser(prog="brigade train", exit_on_error=False)
    train_cmd.add_arguments(parser)
    try:
        parsed, unknown = parser.parse_known_args(flags)
    except argparse.ArgumentError as err:
        raise UsageError(f"train flag {err}") from None
    if unknown:
        raise UsageError(f"unknown train flags {' '.join(unknown)}; see `brigade train --help`")
    cfg = train_cmd.config_from_args(parsed)  # raises on a bad value, naming it
    if cfg.pipeline.backend == "torchrun":
        raise UsageError("--backend torchrun cannot run as a Ray job; use --backend ray "
                         "(default) or local")
    return flags


def _ray() -> list[str]:
    """The ``ray`` command of this environment."""
    beside = Path(sys.executable).parent / "ray"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("ray")
    return [found] if found else [sys.executable, "-m", "ray.scripts.scripts"]


def job_command(args: argparse.Namespace) -> list[str]:
    """``ray job submit ... -- brigade train FLAGS`` for these arguments."""
    address = args.address or os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS
    cmd = [*_ray(), "job", "submit", "--address", address]
    if args.submission_id:
        cmd += ["--submission-id", args.submission_id]
    if args.working_dir:
        if not Path(args.working_dir).is_dir():
            raise UsageError(f"--working-dir {args.working_dir!r} is not a folder")
        cmd += ["--working-dir", args.working_dir]
    if args.no_wait:
        cmd.append("--no-wait")
    return cmd + ["--", "brigade", "train", *_train_args(args)]


def _client_env() -> dict[str, str]:
    """Token authentication on for the client where a token is at hand (Ray leaves it off
    for job clients unless RAY_AUTH_MODE=token)."""
    env = dict(os.environ)
    has_token = (env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH")
                 or (Path.home() / ".ray" / "auth_token").exists())
    if "RAY_AUTH_MODE" not in env and has_token:
        env["RAY_AUTH_MODE"] = "token"
    return env


def probe_job_server(address: str) -> None:
    """The job server must answer before anything is sent: ``ray job submit`` retries an
    unreachable one for minutes. A ClusterGoneError naming the address and the fix."""
    from urllib.parse import urlsplit

    from brigade.engine.ray_cluster import ClusterGoneError, probe_address

    url = urlsplit(address if "://" in address else f"http://{address}")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        probe_address(f"{url.hostname}:{port}")
    except ClusterGoneError as err:
        why = str(err).split(": ", 1)[1].split(";", 1)[0]
        raise ClusterGoneError(
            f"no Ray job server answers at --address {address}: {why}; start the head node "
            "with its dashboard (`ray start --head --dashboard-host 127.0.0.1`, job server "
            f"on port 8265), or pass the job server address it printed (default "
            f"{DEFAULT_ADDRESS}, or $RAY_API_SERVER_ADDRESS)") from None


def _probe_token(address: str, env: dict[str, str]) -> None:
    """The job server must take the client's token before anything is sent: ``ray job
    submit`` prints a refused one (401, 403) as a traceback."""
    from brigade.engine.ray_auth import probe_job_server_auth

    probe_job_server_auth(address if "://" in address else f"http://{address}", env)


def run(args: argparse.Namespace) -> int:
    import shlex

    env = _client_env()
    if not args.dry_run:
        address = args.address or os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS
        probe_job_server(address)
        _probe_token(address, env)
    cmd = job_command(args)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    code = subprocess.call(cmd, env=env)
    return 0 if code == 0 else 1
