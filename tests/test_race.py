"""``brigade race``: the same setting for every method, a charged clock, curves, best rates."""

from __future__ import annotations

import json

import pytest

from brigade.engine.cli import main
from brigade.engine.errors import PipelineConfigError
from brigade.engine.race import RaceConfig, best_lane, run_race, time_to_target
from brigade.engine.train import DECOUPLED_WINDOW

SMALL = ["--model", "mlp", "--width", "16", "--data", "synthetic", "--batch-size", "16",
         "--microbatches", "2", "--quiet", "--eval-size", "64"]


def test_time_to_target_and_best_lane():
    curve = [[0.0, 0.1], [1.0, 0.5], [2.0, 0.9], [3.0, 0.95]]
    assert time_to_target(curve, 0.9) == 2.0
    assert time_to_target(curve, 0.99) is None and time_to_target(curve, None) is None
    lanes = [{"lr": 0.1, "time_to_target_s": None, "final_test_accuracy": 0.99},
             {"lr": 0.03, "time_to_target_s": 5.0, "final_test_accuracy": 0.9},
             {"lr": 0.01, "time_to_target_s": 3.0, "final_test_accuracy": 0.8}]
    assert best_lane(lanes)["lr"] == 0.01  # soonest to the target wins
    assert best_lane([dict(lanes[0]), {**lanes[1], "time_to_target_s": None}])["lr"] == 0.1


def test_race_charges_training_only_and_writes_json_plot_and_tensorboard(tmp_path, capsys):
    out, png, tb = tmp_path / "race.json", tmp_path / "race.png", tmp_path / "tb"
    assert main(["race", *SMALL, "--methods", "backprop,dni", "--budget-s", "1.5",
                 "--eval-every-s", "0.5", "--target", "0.2", "--lrs", "0.03,0.1",
                 "--json", str(out), "--plot", str(png), "--tensorboard", str(tb)]) == 0
    printed = capsys.readouterr().out
    assert "race: mlp on synthetic" in printed and "every rate of the grid" in printed
    result = json.loads(out.read_text())
    assert set(result["methods"]) == {"backprop", "dni"} and len(result["lanes"]) == 4
    assert result["eval_examples"] == 64  # --eval-size 64, the plot's axis label
    for lane in result["lanes"]:
        curve = lane["curve"]
        assert curve[0][0] == 0.0 and len(curve) >= 2
        assert all(b[0] >= a[0] for a, b in zip(curve, curve[1:]))  # seconds grow
        # the budget is training time: the last window may overrun it, by about a step
        assert 1.5 <= lane["train_s"] < 1.5 + 5.0
        assert lane["samples_per_s"] > 0 and lane["lr"] in (0.03, 0.1)
        assert 0.0 <= lane["final_test_accuracy"] <= 1.0
        assert len(lane["idle_fraction"]) == 2 and len(lane["updates"]) == 2
        ttt = lane["time_to_target_s"]
        assert ttt is None or ttt in [p[0] for p in curve]
    # backprop steps once per batch on each stage; dni once per microbatch (m = 2)
    bp = next(r for r in result["lanes"] if r["method"] == "backprop")
    dni = next(r for r in result["lanes"] if r["method"] == "dni")
    assert bp["updates"] == [bp["steps"]] * 2 and dni["updates"] == [2 * dni["steps"]] * 2
    for name, best in result["methods"].items():
        assert best == best_lane([r for r in result["lanes"] if r["method"] == name])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = sorted(p.name for p in tb.iterdir())
    assert runs == ["backprop-lr0.03", "backprop-lr0.1", "dni-lr0.03", "dni-lr0.1"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb / "dni-lr0.1"))
    acc.Reload()
    assert {"train_loss", "test_accuracy", "samples_per_s"} <= set(acc.Tags()["scalars"])


def test_epoch_race_evaluates_once_per_epoch():
    rc = RaceConfig(methods=["backprop"], width=8, batch_size=64, microbatches=2, epochs=2,
                    synthetic_size=256, eval_size=32)
    result = run_race(rc)
    lane = result["methods"]["backprop"]
    assert lane["steps"] == 2 * (256 // 64)
    assert len(lane["curve"]) == 3  # before training and after each epoch


@pytest.mark.parametrize("args, message", [
    (["--methods", "backprop,nope", "--budget-s", "1"], "unknown method 'nope'"),
    (["--methods", "dni,dni", "--budget-s", "1"], "names a method twice"),
    (["--budget-s", "1", "--epochs", "2"], "exactly one of --budget-s"),
    ([], "exactly one of --budget-s"),
    (["--budget-s", "-3"], "--budget-s -3.0 must be a positive"),
    (["--budget-s", "1", "--target", "95"], "--target 95.0 must be an accuracy"),
    (["--budget-s", "1", "--lrs", "0.1,-1"], "must be positive rates"),
    (["--budget-s", "1", "--lrs", "a"], "comma-separated numbers"),
    (["--budget-s", "1", "--plot", "x.jpg"], "must end in .png or .svg"),
    (["--budget-s", "1", "--eval-every-s", "0.001"], "--eval-every-s 0.001"),
])
def test_bad_race_arguments_exit_2_before_anything_runs(args, message, capsys, tmp_path):
    assert main(["race", *SMALL, "--json", str(tmp_path / "x.json"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "x.json").exists()


def test_race_config_checks_each_lane_train_config():
    with pytest.raises(PipelineConfigError, match="--optimizer|unknown optimizer"):
        RaceConfig(methods=["backprop"], budget_s=1, optimizer="nope")


def test_a_rate_that_diverges_leaves_the_race_and_the_others_go_on(tmp_path, capsys):
    """A grid rate whose loss becomes nan/inf ends its lane at that step (recorded, shown);
    the race runs its other lanes and reports the method at a rate that kept finite."""
    out = tmp_path / "race.json"
    assert main(["race", *SMALL, "--methods", "backprop", "--epochs", "1",
                 "--lrs", "0.05,1e12", "--json", str(out)]) == 0
    lanes = {r["lr"]: r for r in json.loads(out.read_text())["lanes"]}
    assert lanes[0.05]["diverged_at_step"] is None
    bad = lanes[1e12]
    assert bad["diverged_at_step"] is not None and 1 <= bad["diverged_at_step"] <= bad["steps"] + 1
    assert json.loads(out.read_text())["methods"]["backprop"]["lr"] == 0.05
    assert f"diverged at step {bad['diverged_at_step']}" in capsys.readouterr().out


def test_evaluations_inside_a_run_are_of_kept_weights_and_do_not_cut_it(monkeypatch):
    """dgl (a run fills and drains once) evaluated every 0.05 s, a fraction of its run of
    64 steps: the runs stay 64 steps (an epoch's end aside) while the curve gets a point
    per interval, from weights kept inside the runs. Epochs, not a budget: a budget's end
    cuts runs at a length that depends on the machine's load."""
    from brigade.engine import Pipeline
    from brigade.stages.data import load_dataset

    runs: list[tuple[int, list[int]]] = []
    plain_run = Pipeline.run

    def spy(self, batches, keep=()):
        runs.append((len(batches), list(keep)))
        return plain_run(self, batches, keep)

    monkeypatch.setattr(Pipeline, "run", spy)
    rc = RaceConfig(methods=["dgl"], model="mlp", data="synthetic", batch_size=64,
                    microbatches=2, epochs=3, eval_every_s=0.05, eval_size=64,
                    backend="local")
    lane = run_race(rc)["lanes"][0]
    per_epoch = len(load_dataset("synthetic", split="train")) // 64
    sizes = [n for n, _ in runs]
    done = sizes[0]  # one step, to time a step
    for n in sizes[1:]:
        done += n
        assert n == DECOUPLED_WINDOW or done % per_epoch == 0, sizes  # the rule's, or an epoch's end
    inside = [t for n, keep in runs for t in keep if t < n - 1]
    assert len(inside) >= 3, runs
    times = [p[0] for p in lane["curve"]]
    assert times == sorted(times) and times[-1] == pytest.approx(lane["train_s"], abs=1e-3)
    # a point per interval: at most one in each (and the start and the end beside them),
    # and no long holes (the candidates' real times pick them, not a guessed step time)
    intervals = lane["train_s"] / 0.05
    assert 0.3 * intervals <= len(times) <= intervals + 2, (times, runs)


def test_kept_candidates_are_spread_over_a_run_and_picked_one_per_interval():
    from brigade.engine.race import _keep_steps, _pick_kept

    # a run of 32 steps of 10 ms from 0 s, due at 0.045, 0.145, ...: the steps ending at
    # or after 0.045, 0.095, 0.145, ... (step t ends at 0.01 (t + 1)); not the last one
    assert _keep_steps(32, 0.01, 0.0, 0.045, 0.1) == [4, 9, 14, 19, 24, 29]
    assert _keep_steps(8, 1.0, 0.0, 0.25, 0.25) == list(range(7))  # slow: each step is due
    assert _keep_steps(8, None, 0.0, 0.25, 0.25) == [] and _keep_steps(8, 0.01, 0.0, 0.25, None) == []
    kept = [(0.31, "a"), (0.12, "b"), (0.33, "c"), (0.58, "d"), (0.95, "e")]
    # due 0.25, 0.5, 0.75, 1.0: 0.31 is the first after 0.25; 0.33 shares its interval;
    # 0.58 serves 0.5; 0.95 serves 0.75; nothing is left for 1.0 (the run's end serves it)
    assert _pick_kept(kept, 0.25, 0.25) == [(0.31, "a"), (0.58, "d"), (0.95, "e")]
    assert _pick_kept(kept, None, 0.25) == [] and _pick_kept([], 0.25, 0.25) == []
