"""``brigade train`` and ``brigade report`` as a user runs them (one process, small sizes)."""

from __future__ import annotations

import json

import pytest
import torch

from brigade.engine.cli import main
from brigade.stages.models import build_model

SMALL = ["--model", "mlp", "--width", "32", "--data", "synthetic", "--backend", "local",
         "--batch-size", "32", "--steps", "12", "--quiet"]


def test_train_writes_json_state_dict_and_trace_then_report_reads_it(tmp_path, capsys):
    out, save, trace = tmp_path / "o.json", tmp_path / "m.pt", tmp_path / "t.json"
    assert main(["train", *SMALL, "--json", str(out), "--save", str(save),
                 "--trace", str(trace)]) == 0
    figures = json.loads(out.read_text())
    for key in ("final_test_accuracy", "train_loss", "samples_per_s", "wall_s",
                "bubble_fraction", "stages"):
        assert key in figures, key
    assert 0.0 <= figures["final_test_accuracy"] <= 1.0
    assert len(figures["train_loss"]) == 1 and figures["samples_per_s"] > 0
    assert len(figures["stages"]) == 2
    for row in figures["stages"]:
        assert 0.0 <= row["idle_fraction"] < 1.0 and row["busy_s"] > 0
        assert row["peak_stored_activation_bytes"] > 0
    state = torch.load(save, weights_only=True)
    want = build_model("mlp", width=32).state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in want.items()}

    report_json, plot = tmp_path / "r.json", tmp_path / "r.png"
    capsys.readouterr()
    assert main(["report", str(trace), "--plot", str(plot), "--json", str(report_json)]) == 0
    printed = capsys.readouterr().out
    assert "measured vs simulated" in printed and "1f1b" in printed
    rep = json.loads(report_json.read_text())
    assert rep["measured"]["bubble_fraction"] == pytest.approx(figures["bubble_fraction"])
    assert rep["simulated"]["makespan"] > 0 and rep["throughput_ratio"] > 0
    assert plot.stat().st_size > 10_000


@pytest.mark.parametrize("args,message", [
    (["--model", "vgg"], "unknown model 'vgg'"),
    (["--stages", "5"], "5 stages"),
    (["--balance", "1,1"], "sums to 2 but the model has 3 blocks"),
    (["--balance", "1,x"], "--balance '1,x' must be comma-separated integers"),
    (["--batch-size", "0"], "--batch-size 0 must be >= 1"),
    (["--microbatches", "-1"], "--microbatches -1 must be >= 1"),
    (["--epochs", "0"], "--epochs 0 must be >= 1"),
    (["--lr", "0"], "--lr 0.0 must be a positive number"),
    (["--optimizer", "lbfgs"], "unknown optimizer 'lbfgs'"),
    (["--method", "hebbian"], "unknown method 'hebbian'"),
    (["--schedule", "dni"], "schedule 'dni' cannot run method 'backprop'"),
    (["--data", "imagenet21k"], "imagenet21k"),
    (["--data", "mnist", "--data-dir", "/nonexistent/mnist"], "/nonexistent/mnist"),
    (["--stale-k", "2"], "--stale-k applies to --method stale"),
    (["--sg-lr", "0.1"], "--sg-lr applies to --method dni or cdni"),
])
def test_bad_train_arguments_exit_2_naming_the_value(args, message, capsys):
    base = ["train", "--model", "mlp", "--width", "16", "--data", "synthetic", "--backend",
            "local", "--steps", "1", "--quiet"]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_report_refuses_what_is_not_a_measured_trace(tmp_path, capsys):
    bogus = tmp_path / "x.json"
    bogus.write_text("{}")
    assert main(["report", str(bogus)]) == 2
    assert "is not a brigade timeline" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_forward_gradient_training_in_one_process(tmp_path):
    out = tmp_path / "fg.json"
    assert main(["train", "--model", "mlp", "--width", "32", "--data", "synthetic",
                 "--backend", "local", "--stages", "1", "--method", "fwdgrad", "--guess", "local",
                 "--batch-size", "32", "--epochs", "2", "--quiet", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["final_test_accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert figures["train_loss"][1] < figures["train_loss"][0]


@pytest.mark.parametrize("method, expected", [
    ("backprop", "momentum"), ("stale", "momentum"), ("dni", "sgd"), ("cdni", "sgd"),
    ("petra", "momentum"), ("fwdgrad", "adam"),
])
def test_each_method_gets_its_measured_default_optimizer(method, expected):
    from brigade.engine.train import TrainConfig

    assert TrainConfig(method=method, backend="local").optimizer == expected
    assert TrainConfig(method=method, backend="local", optimizer="adam").optimizer == "adam"


def test_report_counts_workers_not_virtual_stages(tmp_path, capsys):
    """An interleaved run of 4 stages on 2 workers reports 2 workers (its meta's "stages"
    is 4: the report read that once)."""
    from torch import nn

    from brigade.engine import Pipeline

    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(4)])
    with Pipeline(model, stages=2, schedule="interleaved", virtual=2, microbatches=2,
                  backend="local", loss_fn=nn.MSELoss(),
                  optimizer=lambda p: torch.optim.SGD(p, lr=0.1)) as pipe:
        pipe.step(torch.randn(4, 4), torch.randn(4, 4))
        trace = tmp_path / "t.json"
        pipe.timeline().to_json(trace)
    capsys.readouterr()
    assert main(["report", str(trace)]) == 0
    printed = capsys.readouterr().out
    assert "2 workers" in printed and "4 workers" not in printed
