"""Ray nodes on loopback for tests: ``ray start --block`` in the foreground, each with its
own ports, temp dir and token, stopped by its own pid (never ``ray stop``, which would stop
every Ray process on the machine, other developers' included)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from brigade.engine.transport import free_port

from _procs import holding_files, wait_gone, with_cmdline

__all__ = ["RAY", "BRIGADE", "node_env", "node_port", "start_node", "stop_nodes"]

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray") if (BIN / "ray").exists() else shutil.which("ray")
BRIGADE = str(BIN / "brigade") if (BIN / "brigade").exists() else shutil.which("brigade")


def node_env(root: Path) -> dict[str, str]:
    """An environment of the test's own: token auth on, its token file, its temp dir, no
    RAY_ADDRESS (RAY_TMPDIR: the nodes' files and the file by which ``--address auto`` finds
    the cluster go below ``root``)."""
    token = root / "token"
    if not token.exists():
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_TMPDIR=str(root),
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_DEDUP_LOGS="0")
    return env


def node_port() -> int:
    """A TCP port free on every address now: Ray binds some ports on all of them, so one
    that is free on loopback only (another process listens on it at the host's IP) fails
    its ``ray start`` with "Address already in use"."""
    return free_port("")


def start_node(root: Path, name: str, env: dict, *, head_port: int | None = None,
               cpus: float = 1, resources: dict | None = None, dashboard: bool = False,
               temp_dir: Path | None = None, timeout_s: float = 90.0) -> subprocess.Popen:
    """``ray start --block``: the head node on ``head_port`` (``name == "head"``), or a node
    that joins ``127.0.0.1:head_port``; every other port free and explicit (a second cluster
    on this machine must not share its defaults). Returns once it says it is up; its log is
    ``root/NAME.log``. ``temp_dir``: the node's own root temp dir (default RAY_TMPDIR's):
    a driver names it (``ray.init(_temp_dir=...)``) to attach to this node where several
    nodes share the host."""
    ports = ["--node-manager-port", node_port(), "--object-manager-port", node_port(),
             "--dashboard-agent-listen-port", node_port(),
             "--dashboard-agent-grpc-port", node_port(),
             "--runtime-env-agent-port", node_port(), "--metrics-export-port", node_port()]
    cmd = [RAY, "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus),
           "--num-gpus", "0", "--object-store-memory", str(100 << 20),
           "--disable-usage-stats", *map(str, ports)]
    if resources:
        cmd += ["--resources", json.dumps(resources)]
    if temp_dir is not None:
        cmd += ["--temp-dir", str(temp_dir)]
    if name == "head":
        cmd += ["--head", "--port", str(head_port), "--ray-client-server-port", str(node_port())]
        cmd += (["--dashboard-host", "127.0.0.1", "--dashboard-port", str(node_port())]
                if dashboard else ["--include-dashboard", "false"])
    else:
        cmd += ["--address", f"127.0.0.1:{head_port}"]
    log_path = root / f"{name}.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    proc.log = log  # type: ignore[attr-defined]
    proc.cmd = cmd  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout_s
    text = ""
    while "block forever" not in text:
        text = log_path.read_text()
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_nodes([proc], root)
            raise RuntimeError(f"ray start ({name}) did not come up:\n{text[-4000:]}")
        time.sleep(0.3)
    return proc


def stop_nodes(procs: list[subprocess.Popen], root: Path) -> list[int]:
    """SIGTERM each node's ``ray start`` (it drains, then stops what it started), newest
    first; then SIGKILL whatever of theirs is left (raylet, GCS, workers: every process
    whose command line names ``root``). Returns the pids that were still running after the
    stop and had to be killed (a test asserts it is empty). Last, whatever still holds a
    file below ``root`` open is killed, uncounted: the agents of a node whose raylet was
    killed outlive it by minutes (seen: 2.5), but under names that do not say whose."""
    ours = with_cmdline(str(root))
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in reversed(procs):
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        proc.log.close()  # type: ignore[attr-defined]
    ours += with_cmdline(str(root))
    left = [p for p in set(ours) if not wait_gone([p], 20)]
    stray = holding_files(str(root))
    for pid in left + stray:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_gone(left + stray, 10)
    return left
