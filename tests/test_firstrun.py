"""What ``brigade train`` tells a first-time user (issue 20): one timed line per phase,
m and the batch, measured beside simulated figures, no bubble where there is no
pipeline, resume and checkpoint lines, a resumed run's throughput of training only."""

from __future__ import annotations

import json

import pytest
import torch

from brigade.engine.cli import main
from brigade.engine.phases import PhaseLog
from brigade.engine.pipeline import Pipeline
from brigade.stages.data import load_dataset
from brigade.stages.models import build_model

SMALL = ["train", "--model", "mlp", "--width", "32", "--data", "synthetic", "--backend",
         "local", "--batch-size", "32"]


def test_phase_lines_say_when_what_and_how_long():
    heard = []
    log = PhaseLog(heard.append)
    log.record("ray", 1.25, "started a local Ray cluster: 2 CPU")
    with log.timed("stopped", lambda: "stopped 2 workers"):
        pass
    log.record("restored", 0.5, "resumed from ck/step-00000004", label="restore")
    assert [p.name for p in heard] == ["ray", "stopped", "restored"]
    assert heard[0].line().endswith("started a local Ray cluster: 2 CPU (1.2 s)")
    assert heard[0].line().startswith("[")
    assert heard[2].line().endswith("resumed from ck/step-00000004 (restore 0.5 s)")
    assert log.seconds("ray", "restored") == pytest.approx(1.75)
    assert heard[1].at_s >= heard[0].at_s  # seconds since the process began


def test_a_pipelined_run_prints_its_phases_m_batch_and_simulated_figures(tmp_path, capsys):
    out = tmp_path / "o.json"
    assert main([*SMALL, "--stages", "2", "--steps", "6", "--json", str(out)]) == 0
    printed = capsys.readouterr()
    text = printed.out + printed.err
    for words in ("checked the job", "built 2 stages, blocks [1, 2] in this process",
                  "first step done (step 1 of 6", "evaluated 256 test samples", "stopped 2",
                  "m=4 microbatches of 8 (batch 32)", "measured vs simulated",
                  "local backend: the stages take turns"):
        assert words in text, words
    rep = json.loads(out.read_text())
    names = [p["name"] for p in rep["phases"]]
    assert names[0] == "checked" and names[-1] == "stopped"
    assert {"placed", "first step", "evaluated"} <= set(names)
    assert "profiled" not in names  # uniform cut: no block profile
    # 6 steps: the first alone (its line), then the other 5 in one run of about a second
    assert rep["microbatches"] == 4 and rep["batch_size"] == 32 and rep["window"] == 5
    assert "up to 5 steps per pipelined run" in text
    sim = rep["simulated"]
    assert 0.0 <= sim["bubble_fraction"] < 1.0 and sim["samples_per_s"] > 0
    assert rep["bubble_note"] and "local backend" in rep["bubble_note"]
    assert rep["first_step_at_s"] > 0 and rep["outside_training_s"] >= 0


@pytest.mark.parametrize("extra", [[], ["--method", "fwdgrad"]])
def test_a_one_process_run_reports_no_bubble(tmp_path, capsys, extra):
    out = tmp_path / "o.json"
    assert main([*SMALL, "--stages", "1", "--steps", "3", "--quiet", "--json", str(out),
                 *extra]) == 0
    text = capsys.readouterr().out
    assert "bubble: none" in text and "one worker" in text
    assert "measured vs simulated" not in text
    rep = json.loads(out.read_text())
    assert rep["bubble_fraction"] is None and rep["simulated"] is None
    assert "one worker" in rep["bubble_note"]


def test_resume_says_what_it_did_and_counts_training_only(tmp_path, capsys):
    ck, out = tmp_path / "ck", tmp_path / "o.json"
    assert main([*SMALL, "--steps", "4", "--checkpoint", str(ck), "--quiet"]) == 0
    first = capsys.readouterr().err
    assert f"checkpoint written {ck / 'step-00000004'}" in first
    assert main([*SMALL, "--steps", "8", "--checkpoint", str(ck), "--resume",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert f"resumed from {ck / 'step-00000004'} (restore " in text
    assert f"checkpoint written {ck / 'step-00000008'}" in text
    rep = json.loads(out.read_text())
    assert rep["resumed_from"] == str(ck / "step-00000004")
    assert rep["restore_s"] > 0 and "restore" in text.split("time:")[1]
    # samples/s: the 4 steps this run trained, over this run's training seconds only
    assert rep["samples_per_s"] == pytest.approx(4 * 32 / rep["wall_s"], rel=1e-6)
    assert rep["train_s_total"] > rep["wall_s"]  # the first run's seconds are kept apart


def test_checkpoints_land_on_their_steps_within_long_windows(tmp_path, capsys):
    ck = tmp_path / "ck"
    assert main([*SMALL, "--steps", "8", "--checkpoint", str(ck), "--checkpoint-every", "3",
                 "--quiet"]) == 0
    written = [line.split("checkpoint written ")[1].split(" (")[0]
               for line in capsys.readouterr().err.splitlines() if "checkpoint written" in line]
    assert written == [str(ck / f"step-{n:08d}") for n in (3, 6, 8)]


def test_only_a_measured_balance_profiles_the_blocks():
    model = build_model("mlp", width=16)
    sample = torch.randn(16, 1, 28, 28)
    for by, profiled in (("uniform", False), ("params", False), ("time", True)):
        log = PhaseLog()
        with Pipeline(model, stages=2, backend="local", balance_by=by, sample=sample,
                      phases=log) as pipe:
            assert (pipe.partition.profile is not None) == profiled, by
        assert ("profiled" in [p.name for p in log.phases]) == profiled, by
        assert [p.name for p in log.phases][-1] == "placed"


@pytest.mark.parametrize("like", ["cifar10", "mnist"])
def test_synthetic_test_split_is_drawn_like_the_training_split(like):
    """Same class templates, same normalisation, fresh samples: a nearest-class-mean rule
    fitted on the training split scores the same on the test split."""
    train = load_dataset("synthetic", split="train", size=1024, like=like, seed=3)
    test = load_dataset("synthetic", split="test", size=256, like=like, seed=3)
    assert not torch.equal(train.x[:256], test.x)
    means = torch.stack([train.x[train.y == k].mean(0) for k in range(train.num_classes)])

    def accuracy(ds):
        d = ((ds.x[:, None] - means[None]) ** 2).flatten(2).sum(-1)
        return (d.argmin(1) == ds.y).float().mean().item()

    assert accuracy(test) >= accuracy(train) - 0.02 and accuracy(test) > 0.9
    assert abs(train.x.mean() - test.x.mean()) < 0.05 and abs(train.x.std() - test.x.std()) < 0.05


def test_a_flush_schedules_runs_last_about_a_second_and_a_decoupled_ones_64_steps():
    from types import SimpleNamespace

    from brigade.engine.train import (DECOUPLED_WINDOW, MAX_AUTO_WINDOW, RUN_S, TrainConfig,
                                      window_steps)

    flush, decoupled = SimpleNamespace(decoupled=False), SimpleNamespace(decoupled=True)
    cfg = TrainConfig()
    assert window_steps(cfg, flush) == 16  # no step timed yet
    assert window_steps(cfg, flush, 0.01) == round(RUN_S / 0.01)
    assert window_steps(cfg, flush, 5.0) == 1 and window_steps(cfg, flush, 1e-6) == MAX_AUTO_WINDOW
    assert window_steps(cfg, decoupled, 0.01) == DECOUPLED_WINDOW == 64  # cuts change results
    assert window_steps(TrainConfig(window=3), flush, 0.01) == 3
