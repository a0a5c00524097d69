"""A two-node Ray cluster on this machine: a head and a second ``ray start --address`` node,
each with its own resources (1 CPU each; the head also carries the custom resource
``trusted``), both on loopback, token authentication on, their own ports and temp dir.

A driver joins it as a user's would (``--address``, in a subprocess: the test session's own
cluster stays apart) and checks: ``spread`` and ``strict_spread`` put the stages on both
nodes (each actor's node id); ``trusted_resource`` puts the stages that receive raw inputs or
labels on the head only, and is refused where no node has the resource; a stage process
killed on the second node is a clear error naming the stage; 3, 5 and 7 stages train on
the cluster's 2 CPUs with the default share. Last, the head node is killed mid-run: the
driver, attached to the second node as a driver on another machine would be, exits within
10 s with one line naming the address. Both nodes are stopped by their
own pids and every process of theirs is verified gone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from _nodes import BRIGADE, RAY, node_env, node_port, start_node, stop_nodes
from _procs import with_cmdline

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def cluster():
    if RAY is None or BRIGADE is None:
        pytest.skip("the `ray` and `brigade` command-line scripts are not installed")
    root = Path(tempfile.mkdtemp(prefix="brg2n", dir="/tmp"))  # short: unix socket paths
    env = node_env(root)
    port = node_port()
    nodes = []
    try:
        nodes.append(start_node(root, "head", env, head_port=port, cpus=1,
                                resources={"trusted": 1}, temp_dir=root / "head"))
        nodes.append(start_node(root, "second", env, head_port=port, cpus=1,
                                temp_dir=root / "second"))
        yield {"env": env, "root": root, "address": f"127.0.0.1:{port}", "nodes": nodes,
               "second_temp_dir": root / "second"}
    finally:
        left = stop_nodes(nodes, root)
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"processes of the two nodes still running after their stop: {left}"
        assert all(n.poll() is not None for n in nodes)


DRIVER = textwrap.dedent('''
    import json, os, signal, sys, time
    import torch
    from torch import nn
    import ray
    from brigade.engine import Pipeline, PipelineConfigError, StageFailedError
    from brigade.engine.ray_cluster import ensure_ray

    ensure_ray(sys.argv[1])
    out = {"nodes": {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}}

    def net(blocks=7):
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh())
                               for _ in range(blocks - 1)], nn.Linear(8, 3))

    x, y = torch.randn(14, 8), torch.randint(0, 3, (14,))

    def node_ids(pipe):
        return ray.get([a.__ray_call__.remote(
            lambda self: ray.get_runtime_context().get_node_id())
            for a in pipe._backend.actors])

    for placement in ("spread", "strict_spread"):
        with Pipeline(net(), stages=2, microbatches=2, placement=placement) as pipe:
            loss = pipe.step(x, y)["loss"]
            out[placement] = {"nodes": node_ids(pipe), "loss": loss}

    with Pipeline(net(), stages=3, schedule="dni", method="dni", microbatches=2,
                  placement="spread", trusted_resource="trusted") as pipe:
        pipe.run([(x, y)] * 2)
        out["trusted_dni"] = node_ids(pipe)
    with Pipeline(net(), stages=2, schedule="dni", method="cdni", microbatches=2,
                  trusted_resource="trusted", placement_timeout_s=5) as pipe:
        pipe.step(x, y)
        out["trusted_cdni"] = node_ids(pipe)
    try:
        Pipeline(net(), stages=2, microbatches=2, trusted_resource="vault")
    except PipelineConfigError as err:
        out["no_such_resource"] = str(err)

    shares = {}
    for stages in (3, 5, 7):  # the default share on 2 CPUs (1 + 1): trains
        with Pipeline(net(), stages=stages, microbatches=stages) as pipe:
            shares[stages] = {"loss": pipe.step(x, y)["loss"],
                              "cpus": ray.util.placement_group_table(
                                  pipe._backend.placement_group)["bundles"][0]["CPU"]}
    out["shares"] = shares

    second = next(n for n, r in out["nodes"].items() if "trusted" not in r)
    pipe = Pipeline(net(), stages=2, microbatches=2, placement="strict_spread")
    where = node_ids(pipe)
    victim = where.index(second)
    os.kill(pipe.worker_pids[victim], signal.SIGKILL)
    t0 = time.monotonic()
    try:
        pipe.step(x, y)
    except StageFailedError as err:
        out["killed"] = {"worker": victim, "error": str(err), "s": time.monotonic() - t0,
                         "stage_worker": err.worker}
    pipe.shutdown()
    print("RESULT " + json.dumps(out))
''')


# `brigade ARGS...` whose driver attaches to the node whose temp dir is argv[1]. Why: where
# several nodes share a host, ray.init attaches to the head's raylet, which the head-kill test
# kills too (the driver then dies with it, not with the one line); on a real cluster the
# driver's machine keeps its own raylet. ray.init's _temp_dir picks the node (Ray 2.60).
JOIN_SECOND = textwrap.dedent('''
    import functools, sys
    import ray
    ray.init = functools.partial(ray.init, _temp_dir=sys.argv.pop(1))
    from brigade.engine.cli import main
    sys.argv[0] = "brigade"
    sys.exit(main())
''')


def test_placement_trust_shares_and_a_killed_stage_on_two_nodes(cluster, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    proc = subprocess.run([sys.executable, str(script), cluster["address"]], env=cluster["env"],
                          capture_output=True, text=True, timeout=400)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    out = json.loads(next(ln for ln in proc.stdout.splitlines()
                          if ln.startswith("RESULT "))[7:])
    nodes = out["nodes"]
    assert len(nodes) == 2, nodes
    head = next(n for n, r in nodes.items() if "trusted" in r)
    for placement in ("spread", "strict_spread"):  # one stage on each node
        assert sorted(out[placement]["nodes"]) == sorted(nodes), (placement, out[placement])
    # dni: worker 0 gets the inputs, worker 2 the labels: both on the trusted node
    dni = out["trusted_dni"]
    assert dni[0] == head and dni[2] == head, dni
    assert out["trusted_cdni"] == [head, head]  # cdni: every worker gets labels
    assert out["no_such_resource"] == (
        "cannot place 2 stages x {1 CPU, 0 GPU} (placement pack): no node of the cluster "
        "has the resource 'vault'; start a node with `ray start --resources "
        "'{\"vault\": 1}'`, or drop --trusted-resource (trusted_resource=None)")
    # fair_share: the largest share of which the two 1-CPU nodes hold the stages, rounded
    # down: 3 -> 1/2 (2 + 2 fit), 5 -> 1/3 (3 + 3), 7 -> 1/4 (4 + 4; 1/3 holds only 6)
    assert {int(k): v["cpus"] for k, v in out["shares"].items()} == {3: 0.5, 5: 0.33, 7: 0.25}
    killed = out["killed"]
    assert killed["stage_worker"] == killed["worker"]
    assert f"(worker {killed['worker']}) failed: " in killed["error"], killed
    assert "died" in killed["error"] and killed["s"] < 30, killed


def test_a_head_node_that_dies_mid_run_is_one_line_naming_it(cluster, tmp_path):
    """Last in this module: it kills the cluster's head (its GCS and raylet, kill -9)."""
    env, root, address = cluster["env"], cluster["root"], cluster["address"]
    proc = subprocess.Popen(
        [sys.executable, "-c", JOIN_SECOND, str(cluster["second_temp_dir"]), "train",
         "--address", address, "--model", "mlp", "--width", "16", "--data",
         "synthetic", "--steps", "100000", "--batch-size", "16", "--checkpoint",
         str(tmp_path / "ck"), "--checkpoint-every", "5"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "ck" / "latest").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        head = cluster["nodes"][0]
        gcs = [p for p in with_cmdline("gcs_server", with_cmdline(str(root)))]
        raylets = [p for p in with_cmdline("raylet", with_cmdline(str(root)))
                   if f"--node_manager_port={head.cmd[head.cmd.index('--node-manager-port') + 1]}"
                   in Path(f"/proc/{p}/cmdline").read_bytes().decode().replace("\0", " ")]
        assert gcs, "no gcs_server of this cluster found"
        for pid in gcs + raylets:
            os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    last = [ln for ln in err.strip().splitlines() if ln.startswith("brigade train")]
    assert last and last[-1].startswith("brigade train: failed: the Ray cluster at "), err[-3000:]
    assert address.split(":")[1] in last[-1] and "stopped answering" in last[-1], last
    assert took < 10, (took, last)
