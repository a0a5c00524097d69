"""A real Ray head node on loopback, with token authentication on, driven as a user drives it:
``brigade train --address`` against it, then the same training as a ``ray job submit`` job
whose logs are fetched with ``ray job logs``; then the head node is stopped and none of its
processes may remain.

Everything runs in subprocesses with their own environment (RAY_AUTH_MODE=token and a token
file of the test's own, no RAY_ADDRESS), so the session's shared cluster (conftest
``ray_cluster``) and the user's ``~/.ray`` are left alone. The head node runs under
``ray start --block`` and is stopped by signalling that process: ``ray stop`` would stop
every Ray process on the machine, the shared cluster's included. One head node serves the
module's tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from brigade.engine.transport import free_port

from _procs import wait_gone, with_cmdline

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray") if (BIN / "ray").exists() else shutil.which("ray")
BRIGADE = str(BIN / "brigade") if (BIN / "brigade").exists() else shutil.which("brigade")
TRAIN = ["--model", "mlp", "--width", "16", "--data", "synthetic", "--steps", "3",
         "--batch-size", "32", "--quiet"]
FIGURES = ("final_test_accuracy", "train_loss", "samples_per_s", "wall_s", "bubble_fraction",
           "stages")


def run(cmd: list[str], env: dict, timeout: float, cwd: Path | None = None) -> str:
    """Run one command; its combined output, or a failure that shows it."""
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-4000:]}"
    return out


def check_figures(path: Path) -> None:
    figures = json.loads(path.read_text())
    for key in FIGURES:
        assert key in figures, key
    assert len(figures["stages"]) == 2 and figures["samples_per_s"] > 0


@pytest.fixture(scope="module")
def head_node():
    """A head node on 127.0.0.1 with its own ports, temp dir and auth token; stopped after."""
    if RAY is None or BRIGADE is None:
        pytest.skip("the `ray` and `brigade` command-line scripts are not installed")
    if importlib.util.find_spec("aiohttp") is None:
        pytest.skip("ray[default] is not installed (no aiohttp): no dashboard/job server")
    # A short root: Ray's unix sockets live below it (paths are limited to ~107 bytes).
    root = Path(tempfile.mkdtemp(prefix="brg", dir="/tmp"))
    token = root / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # RAY_TMPDIR: the node's files, and the ray_current_cluster file by which
    # `--address auto` finds it, go below root instead of /tmp/ray.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_TMPDIR=str(root),
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_DEDUP_LOGS="0")
    port, dash = free_port(), free_port()
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(port), "--num-cpus", "2", "--num-gpus", "0",
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--ray-client-server-port", str(free_port()),
           "--dashboard-agent-listen-port", str(free_port()),
           "--disable-usage-stats"]
    log = open(root / "head.log", "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        text = ""
        while "block forever" not in text:
            text = (root / "head.log").read_text()
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start --head did not come up:\n{text[-4000:]}")
            time.sleep(0.5)
        yield {"env": env, "address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}",
               "root": root, "head_pid": head.pid}
    finally:
        ours = with_cmdline(str(root))  # raylet, gcs_server, dashboard, workers
        head.send_signal(signal.SIGTERM)  # the node drains, then kills what it started
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()
        log.close()
        left = [p for p in ours if not wait_gone([p], 20)]
        for pid in left:  # clean up what the check below will report
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"processes of the head node still running after its stop: {left}"


def test_train_against_a_head_node_then_as_a_ray_job(head_node):
    env, root = head_node["env"], head_node["root"]
    started = with_cmdline(str(root))
    names = " ".join(Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="ignore")
                     for p in started)
    assert "raylet" in names and "gcs_server" in names, names

    # 1. A driver on the head node joins the cluster (placement flags included).
    out = root / "out.json"
    printed = run([BRIGADE, "train", "--address", "auto", *TRAIN,
                   "--cpus-per-stage", "1", "--placement", "spread", "--json", str(out)],
                  env, timeout=120)
    assert "test accuracy" in printed, printed
    check_figures(out)

    # 2. The same training as a Ray job: the entrypoint runs on the cluster with
    #    RAY_ADDRESS set, and brigade joins that cluster (no --address needed).
    work = root / "job"
    work.mkdir()
    job_json = root / "job.json"
    sid = f"brigade-test-{secrets.token_hex(4)}"
    entry = ["brigade", "train", *TRAIN, "--cpus-per-stage", "1", "--json", str(job_json)]
    dash = head_node["dashboard"]
    submitted = run([RAY, "job", "submit", "--address", dash, "--submission-id", sid,
                     "--working-dir", str(work), "--", *entry], env, timeout=180)
    assert f"Job '{sid}' succeeded" in submitted, submitted  # submit waits for the end
    logs = run([RAY, "job", "logs", "--address", dash, sid], env, timeout=60)
    assert "test accuracy" in logs and "per-stage time" in logs, logs
    check_figures(job_json)

    # Both ran on this cluster: the driver that joined it, and the submitted job.
    jobs = run([RAY, "job", "list", "--address", dash], env, timeout=60)
    assert str(out) in jobs and f"submission_id='{sid}'" in jobs, jobs

    # 3. Without --address (and no RAY_ADDRESS) brigade starts a private local cluster
    #    rather than joining the one `ray start` left on this machine.
    code = ("from brigade.engine.ray_cluster import ensure_ray; import ray; ensure_ray(); "
            "print('GCS', ray.get_runtime_context().gcs_address); ray.shutdown()")
    private = run([sys.executable, "-c", code], env, timeout=120)
    gcs = [ln.split()[1] for ln in private.splitlines() if ln.startswith("GCS ")]
    assert gcs and not gcs[0].endswith(head_node["address"].split(":")[1]), private

    # 4. Authentication is on: a client with a wrong token is refused.
    bad = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    bad.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    proc = subprocess.run([RAY, "job", "list", "--address", dash], env=bad,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0, proc.stdout + proc.stderr


def test_brigade_submit_runs_train_as_a_job(head_node):
    """The wrapper: flags checked here, the client's token mode switched on from the token
    path alone, the job's logs streamed while it runs."""
    env = {k: v for k, v in head_node["env"].items() if k != "RAY_AUTH_MODE"}
    root = head_node["root"]
    out = root / "submit.json"
    sid = f"brigade-submit-{secrets.token_hex(4)}"
    printed = run([BRIGADE, "submit", "--address", head_node["dashboard"], "--submission-id",
                   sid, "--", *TRAIN, "--json", str(out)], env, timeout=180)
    assert f"Job '{sid}' succeeded" in printed and "test accuracy" in printed, printed
    check_figures(out)


# Clients the head node must refuse: (name, auth variables, the message's words; {at} is
# the address refused).
REFUSALS = [
    ("wrong-token", {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)},
     "the Ray cluster at {at} refused the auth token from RAY_AUTH_TOKEN; set "
     "RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file holding it, to the cluster's token"),
    ("no-token", {"RAY_AUTH_MODE": "token"},
     "RAY_AUTH_MODE=token but no auth token found for {at} (RAY_AUTH_TOKEN and "
     "RAY_AUTH_TOKEN_PATH unset, no ~/.ray/auth_token); set RAY_AUTH_TOKEN, or "
     "RAY_AUTH_TOKEN_PATH"),
    ("auth-mode-unset", {},
     "the Ray cluster at {at} requires token authentication and RAY_AUTH_MODE is unset, so "
     "no token was sent; set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH"),
]


def client_env(head_node: dict, home: Path, auth: dict[str, str]) -> dict[str, str]:
    """The head node's environment with only ``auth`` for authentication, and a HOME of its
    own (no ~/.ray/auth_token to fall back on)."""
    env = {k: v for k, v in head_node["env"].items() if not k.startswith("RAY_AUTH")}
    home.mkdir(exist_ok=True)
    return {**env, **auth, "HOME": str(home)}


def refused_line(cmd: list[str], env: dict[str, str], prefix: str) -> str:
    """Run a command the cluster must refuse: within 30 s, exit status 2, no traceback, one
    line from brigade (starting with ``prefix``); that line."""
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    took, out = time.monotonic() - start, proc.stdout + proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}:\n{out[-4000:]}"
    assert took < 30, f"refused only after {took:.0f} s:\n{out[-4000:]}"
    assert "Traceback" not in out, out
    lines = [ln for ln in out.splitlines() if ln.startswith("brigade ")]
    assert len(lines) == 1 and lines[0].startswith(prefix), out
    return lines[0]


@pytest.mark.parametrize("case,auth,words", REFUSALS, ids=[r[0] for r in REFUSALS])
@pytest.mark.parametrize("command", ["train", "submit"])
def test_a_client_without_the_clusters_token_is_refused(head_node, tmp_path, command, case,
                                                        auth, words):
    """``brigade train --address GCS`` and ``brigade submit --address DASHBOARD``, each with
    a wrong token, no token, and RAY_AUTH_MODE unset: one line naming the address and what
    to set, exit 2, within seconds (the token is tried before torch is imported, and before
    anything is sent). Measured against this head node, Ray 2.60 unaided, before brigade
    tried the token:

    - wrong token (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN random hex): ``ray.init`` retries
      GetClusterId once a second ("gcs_client.cc: Failed to get cluster ID from GCS server:
      Unauthenticated: RPC error: InvalidAuthToken: Authentication token is missing or
      incorrect"), ~20 s by default, 4 s under brigade's join budget, then raises
      ``ConnectionError: Failed to connect to Ray cluster at ...``; ``brigade train`` said
      "no Ray cluster answers at --address ...", as if nothing listened there (exit 2).
    - no token (RAY_AUTH_MODE=token, nothing in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
      ~/.ray/auth_token): ``ray.init`` refuses before it connects, ``ray.exceptions.
      AuthenticationError: Token authentication is enabled but no authentication token was
      found``, which ``brigade train`` printed as a traceback (exit 1). (Ray's own GcsClient
      aborts the whole process on it, a C++ check failure: brigade never makes one then.)
    - RAY_AUTH_MODE unset: an explicit address never turns token mode on (``auto`` does,
      where a token exists), so no token is sent, and the GCS refuses it as a wrong one:
      the same 4 s of retries and the same misleading line.
    - the job server answers 401 (no token sent: cases 2 and 3) or 403 (wrong token), which
      ``ray job submit`` under ``brigade submit`` printed as an ``AuthenticationError``
      traceback (exit 1), within 2 s.
    """
    env = client_env(head_node, tmp_path / "home", auth)
    at = head_node["address"] if command == "train" else head_node["dashboard"]
    cmd = ([BRIGADE, "train", "--address", at] if command == "train"
           else [BRIGADE, "submit", "--address", at, "--"])
    line = refused_line([*cmd, *TRAIN], env, f"brigade {command}: error: ")
    assert words.format(at=at) in line, line


def test_ensure_ray_reads_a_token_refusal_from_ray_init(head_node, tmp_path):
    """The API path, and the one case the token is not tried before ``ray.init``: ``auto``
    with RAY_AUTH_MODE unset and a (wrong) ~/.ray/auth_token, where ``ray.init`` turns token
    mode on by itself; its ConnectionError (4 s of retries) becomes the same one line."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    code = ("import sys\nfrom brigade.engine.ray_auth import ClusterAuthError\n"
            "from brigade.engine.ray_cluster import ensure_ray\ntry:\n    ensure_ray('auto')\n"
            "except ClusterAuthError as err:\n    print('brigade api: error:', err)\n"
            "    sys.exit(2)\n")
    env = client_env(head_node, home, {})
    line = refused_line([sys.executable, "-c", code], env, "brigade api: error: ")
    assert ("the Ray cluster at auto refused the auth token from ~/.ray/auth_token; set "
            "RAY_AUTH_TOKEN") in line, line
