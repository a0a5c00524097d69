"""An --address where no Ray cluster answers: one line naming it, a non-zero exit, within 10 s.

Two ways a user gets it wrong, each run as the CLI runs (a subprocess, no cluster started):
nothing listens on the port (a typo, a head node that is down), and something listens that
is no Ray GCS (the dashboard's port, another service), where ``ray.init`` alone retried for
minutes (166 s measured) before an error that did not say why.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

BRIGADE = str(Path(sys.executable).with_name("brigade"))
TRAIN = ["train", "--model", "mlp", "--data", "synthetic", "--steps", "1", "--width", "8"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(address: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    t0 = time.monotonic()
    proc = subprocess.run([BRIGADE, *TRAIN, "--address", address], env=env, text=True,
                          capture_output=True, timeout=60)
    return proc, time.monotonic() - t0


def _one_line(proc: subprocess.CompletedProcess) -> str:
    out = (proc.stdout + proc.stderr).strip()
    assert "Traceback" not in out, out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1, out
    return lines[0]


def test_nothing_listening_is_one_line_within_10_s():
    address = f"127.0.0.1:{_free_port()}"
    proc, took = _run(address)
    line = _one_line(proc)
    assert proc.returncode != 0 and took < 10, (proc.returncode, took, line)
    assert f"no Ray cluster answers at --address {address}" in line and "ray start --head" in line


@pytest.fixture
def silent_listener():
    """A TCP port that accepts connections and never speaks (no gRPC, no HTTP)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()


def test_a_port_that_is_no_ray_cluster_is_one_line_within_10_s(silent_listener):
    proc, took = _run(silent_listener)
    line = _one_line(proc)
    assert proc.returncode != 0 and took < 10, (proc.returncode, took, line)
    assert f"something listens at --address {silent_listener} but no Ray cluster answers" in line
    assert "6379" in line


def test_a_lost_head_is_named_as_given_and_not_waited_on(monkeypatch):
    """A head that stopped answering mid-run: the line names the address the user gave (Ray
    reports the GCS at another of the head's addresses), and once it is marked lost neither
    leave_ray() nor Ray's exit hook calls ray.shutdown(), which would wait on the dead GCS."""
    import atexit

    import ray

    from brigade.engine import ray_cluster as rc

    monkeypatch.setattr(rc, "_JOINED", ("auto", "127.0.0.1:6390"))
    monkeypatch.setattr(rc, "_LOST", None)
    assert str(rc.lost_cluster_error("192.0.2.2:6390")).startswith(
        "the Ray cluster at auto (127.0.0.1:6390) stopped answering mid-run")
    assert "at 10.0.0.1:7000 " in str(rc.lost_cluster_error("10.0.0.1:7000"))  # not joined so
    assert "`ray start --head --port 6390`" in str(rc.lost_cluster_error("192.0.2.2:6390"))
    calls = []
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    monkeypatch.setattr(atexit, "unregister", calls.append)
    assert not rc.head_lost()
    rc.mark_lost("192.0.2.2:6390")
    assert rc.head_lost() and rc.head_lost("192.0.2.2:6390") and not rc.head_lost("10.0.0.1:1")
    rc.leave_ray()
    assert calls == [ray._private.worker.shutdown]
