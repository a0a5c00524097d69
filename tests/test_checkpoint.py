"""Checkpoints: atomic, verified, refused when corrupt or foreign; resume and restart exact."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from brigade.engine.checkpoint import (Checkpoint, CheckpointError, latest_checkpoint,
                                       load_checkpoint, save_checkpoint)
from brigade.engine.cli import main
from brigade.schedulers import Timeline

from _procs import descendants, with_cmdline

TRAIN = ["train", "--model", "mlp", "--width", "32", "--data", "synthetic", "--batch-size",
         "32", "--optimizer", "momentum", "--quiet"]


def small_ckpt(step: int = 3) -> Checkpoint:
    stages = {s: {"module": {"w": torch.full((2, 2), float(s))}, "optimizer": None,
                  "extra": None, "rng": torch.get_rng_state()} for s in range(2)}
    return Checkpoint(step, {"balance": [1, 2], "schedule": "1f1b"}, stages,
                      {"loader": {"epoch": 0, "index": step}})


def test_save_load_round_trip_and_latest(tmp_path):
    save_checkpoint(tmp_path, small_ckpt(2))
    path = save_checkpoint(tmp_path, small_ckpt(4))
    assert latest_checkpoint(tmp_path) == path
    assert not list(tmp_path.glob(".tmp-*"))
    ck = load_checkpoint(tmp_path, identity={"balance": [1, 2], "schedule": "1f1b"})
    assert ck.step == 4 and torch.equal(ck.stages[1]["module"]["w"], torch.ones(2, 2))
    save_checkpoint(tmp_path, small_ckpt(6), keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000004", "step-00000006"]


def test_a_corrupt_byte_is_refused_naming_the_file(tmp_path):
    path = save_checkpoint(tmp_path, small_ckpt())
    f = path / "stage-1.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"stage-1.pt: checksum mismatch"):
        load_checkpoint(path)


@pytest.mark.parametrize("damage,message", [
    (lambda p: (p / "driver.pt").unlink(), "driver.pt: missing"),
    (lambda p: (p / "manifest.json").write_text("{not json"), "unreadable manifest"),
])
def test_damaged_checkpoints_are_refused(tmp_path, damage, message):
    path = save_checkpoint(tmp_path, small_ckpt())
    damage(path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    save_checkpoint(tmp_path, small_ckpt())
    with pytest.raises(CheckpointError, match=r"balance: checkpoint \[1, 2\], this run \[2, 1\]"):
        load_checkpoint(tmp_path, identity={"balance": [2, 1], "schedule": "1f1b"})
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        load_checkpoint(tmp_path / "elsewhere")


@pytest.mark.parametrize("schedule", ["1f1b", "zb1p"])
def test_stop_and_resume_ends_with_the_same_weights(tmp_path, schedule):
    base = TRAIN + ["--backend", "local", "--schedule", schedule]
    full, resumed, ck = tmp_path / "full.pt", tmp_path / "resumed.pt", tmp_path / "ck"
    assert main(base + ["--steps", "9", "--save", str(full)]) == 0
    assert main(base + ["--steps", "4", "--checkpoint", str(ck), "--checkpoint-every", "2"]) == 0
    trace = tmp_path / "resumed.json"
    assert main(base + ["--steps", "9", "--checkpoint", str(ck), "--resume",
                        "--save", str(resumed), "--trace", str(trace)]) == 0
    # the resumed run ran only the 5 steps after the checkpoint (a run that ignored the
    # checkpoint would run all 9 from the same seed and end with the same weights)
    assert Timeline.from_json(trace).meta["steps"] == 5
    a, b = torch.load(full, weights_only=True), torch.load(resumed, weights_only=True)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)


def test_resume_refuses_another_split(tmp_path, capsys):
    ck = tmp_path / "ck"
    base = TRAIN + ["--backend", "local", "--steps", "2", "--checkpoint", str(ck)]
    assert main(base + ["--balance", "1,2"]) == 0
    capsys.readouterr()
    assert main(base + ["--balance", "2,1", "--resume"]) == 2
    assert "balance: checkpoint [1, 2], this run [2, 1]" in capsys.readouterr().err


def test_resume_refuses_other_schedule_options(tmp_path, capsys):
    """A stale run saved with k=2 does not resume as k=3 (the steps' pattern differs)."""
    ck = tmp_path / "ck"
    base = TRAIN + ["--backend", "local", "--steps", "2", "--checkpoint", str(ck),
                    "--method", "stale", "--schedule", "stale"]
    assert main(base + ["--stale-k", "2"]) == 0
    capsys.readouterr()
    assert main(base + ["--stale-k", "3", "--resume"]) == 2
    assert "schedule_options: checkpoint {'k': 2}, this run {'k': 3}" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_stage_restarts_from_the_checkpoint_and_ends_equal(tmp_path):
    """kill -9 one stage process mid-run; --max-restarts 1 resumes and matches."""
    full, got, ck, js = (tmp_path / n for n in ("full.pt", "got.pt", "ck", "o.json"))
    base = TRAIN + ["--steps", "40"]
    assert main(base + ["--backend", "local", "--save", str(full)]) == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "brigade.engine.cli", *base, "--backend", "ray",
         "--checkpoint", str(ck), "--checkpoint-every", "5", "--max-restarts", "1",
         "--save", str(got), "--json", str(js)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while latest_checkpoint(ck) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        victims = with_cmdline("_StageActor", descendants(proc.pid))
        assert victims, "no stage actor process found"
        os.kill(victims[-1], signal.SIGKILL)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    report = json.loads(js.read_text())
    assert len(report["restarts"]) == 1 and "failed" in report["restarts"][0]["error"]
    # it went on from a checkpoint taken before the kill (not from step 0, same weights)
    restart = report["restarts"][0]
    assert 5 <= restart["resumed_from"] <= restart["step"] and restart["resumed_from"] % 5 == 0
    a, b = torch.load(full, weights_only=True), torch.load(got, weights_only=True)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)


# Every rule resumes exactly. Decoupled rules (dni, cdni, petra) do not flush between the
# steps of a window, and a stop is a flush: the stop must fall on a window boundary of the
# uninterrupted run (--window 2 here) for the two runs to be the same computation.
RULES = {
    "dni": ["--method", "dni", "--window", "2"],
    "cdni": ["--method", "cdni", "--window", "2"],
    "petra": ["--method", "petra", "--window", "2", "--model", "revnet18", "--width", "4",
              "--batch-size", "8", "--microbatches", "2"],
    "stale": ["--method", "stale", "--stale-k", "3"],
    "dgl": ["--method", "dgl", "--window", "2"],
    "fwdgrad": ["--method", "fwdgrad", "--projections", "2", "--optimizer", "sgd",
                "--lr", "0.01"],
    # the local guess keeps a head (and its Adam) per unit; one stage: a unit per block
    "fwdgrad-local": ["--method", "fwdgrad", "--guess", "local", "--window", "2"],
    "fwdgrad-local-one-stage": ["--method", "fwdgrad", "--guess", "local", "--stages", "1"],
}


@pytest.mark.parametrize("rule", list(RULES))
def test_stop_and_resume_ends_with_the_same_weights_for_every_rule(tmp_path, rule):
    # a measured cut (--balance-by method, these rules' default) may differ between the
    # three runs under load; the comparison needs one cut. A cosine schedule (dni, cdni,
    # fwdgrad's default) spans the run's steps, so a run stopped by --steps 4 is another
    # run than the first half of --steps 8: constant here (a cosine run resumed: below)
    base = [a for a in TRAIN if a != "momentum" and a != "--optimizer"] + [
        "--backend", "local", "--balance-by", "uniform", "--lr-schedule", "constant"]
    base += RULES[rule]
    full, resumed, ck = tmp_path / "full.pt", tmp_path / "resumed.pt", tmp_path / "ck"
    assert main(base + ["--steps", "8", "--save", str(full)]) == 0
    assert main(base + ["--steps", "4", "--checkpoint", str(ck)]) == 0
    assert main(base + ["--steps", "8", "--checkpoint", str(ck), "--resume",
                        "--save", str(resumed)]) == 0
    a, b = torch.load(full, weights_only=True), torch.load(resumed, weights_only=True)
    start = torch.load(ck / "step-00000004" / "stage-0.pt", weights_only=True)["module"]
    moved = False
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
        moved |= k in start and a[k].is_floating_point() and not torch.equal(a[k], start[k])
    assert moved, "the resumed steps changed nothing: the test would not see a wrong resume"


def test_a_cosine_run_resumed_mid_way_ends_with_the_uninterrupted_weights(tmp_path):
    """dni's default schedule is cosine over the run's steps: a run of 8 steps stopped
    after its checkpoint at step 4 and resumed with the same command ends as the run that
    was never stopped (the schedule's clock is saved with each optimizer)."""
    import shutil

    base = TRAIN[:-3] + ["--backend", "local", "--balance-by", "uniform", "--method", "dni",
                         "--window", "2", "--steps", "8", "--lr-schedule", "cosine"]
    full, resumed, ck = tmp_path / "full.pt", tmp_path / "resumed.pt", tmp_path / "ck"
    assert main(base + ["--save", str(full), "--checkpoint", str(ck),
                        "--checkpoint-every", "4"]) == 0
    assert (ck / "step-00000004").is_dir()
    shutil.rmtree(ck / "step-00000008")  # as if the run had died after step 4
    assert latest_checkpoint(ck).name == "step-00000004"
    assert main(base + ["--checkpoint", str(ck), "--resume", "--save", str(resumed)]) == 0
    a, b = torch.load(full, weights_only=True), torch.load(resumed, weights_only=True)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)


def _kill_a_stage_after_the_first_checkpoint(ck, seconds: float = 120.0) -> threading.Thread:
    """A thread that kill -9s one stage actor of this process's Ray cluster (a descendant
    of this process: never another run's) once a checkpoint exists under ``ck``."""
    def kill():
        deadline = time.monotonic() + seconds
        while latest_checkpoint(ck) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        victims = with_cmdline("_StageActor", descendants(os.getpid()))
        if victims:
            os.kill(victims[-1], signal.SIGKILL)
    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


DNI_RAY = TRAIN[:-3] + ["--quiet", "--method", "dni", "--steps", "12", "--window", "3",
                        "--checkpoint-every", "3", "--balance-by", "uniform"]  # one cut


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_stage_under_dni_restarts_and_ends_with_the_uninterrupted_weights(
        ray_cluster, tmp_path, capsys):
    """kill -9 of a stage under a decoupled rule, --max-restarts 1: the rebuilt pipeline
    goes on from the last checkpoint (a window boundary) and ends with the weights of the
    run that was never killed; without restarts the error names the stage and the
    checkpoint."""
    full, got, ck, js = (tmp_path / n for n in ("full.pt", "got.pt", "ck", "o.json"))
    assert main(DNI_RAY + ["--backend", "local", "--save", str(full), "--checkpoint",
                           str(tmp_path / "ck-full")]) == 0
    killer = _kill_a_stage_after_the_first_checkpoint(ck)
    assert main(DNI_RAY + ["--checkpoint", str(ck), "--max-restarts", "1", "--save", str(got),
                           "--json", str(js)]) == 0
    killer.join(5)
    restart, = json.loads(js.read_text())["restarts"]
    assert "died" in restart["error"], restart
    assert 3 <= restart["resumed_from"] <= restart["step"] < 12, restart
    a, b = torch.load(full, weights_only=True), torch.load(got, weights_only=True)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)

    capsys.readouterr()
    ck2 = tmp_path / "ck2"
    killer = _kill_a_stage_after_the_first_checkpoint(ck2)
    t0 = time.monotonic()
    assert main(DNI_RAY + ["--checkpoint", str(ck2)]) == 1
    killer.join(5)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("brigade train: failed: stage "), err
    assert re.search(r"stage \d \(worker \d\) failed: .*died", err), err
    last = latest_checkpoint(ck2)
    assert err.endswith(f"; last checkpoint: {last}"), (err, last)
    load_checkpoint(last)  # the checkpoint it names is intact
    assert time.monotonic() - t0 < 120
