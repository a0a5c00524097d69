"""bench/unlocked_regime.py: the sweep's ratios from resnet_splits rows, and its flag checks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import unlocked_regime as ur  # noqa: E402


def test_ratios_pair_each_decoupled_row_with_its_backends_1f1b_and_torch():
    rows = [
        {"runner": "brigade", "schedule": "1f1b", "backend": "ray", "samples_per_s": 100.0},
        {"runner": "brigade", "schedule": "dni", "backend": "ray", "samples_per_s": 150.0,
         "load_avg_1min": [1.0, 2.0]},
        {"runner": "brigade", "schedule": "petra", "backend": "ray", "samples_per_s": 120.0},
        {"runner": "brigade", "schedule": "dgl", "backend": "ray", "samples_per_s": 175.0},
        {"runner": "torch", "schedule": "1f1b", "samples_per_s": 125.0},
        {"runner": "simulated", "schedule": "dni", "samples_per_s": 999.0},
    ]
    for r in rows:
        r["model"] = "revnet18"
    out = {r["method"]: r for r in ur.ratios(rows, m=2)}
    assert set(out) == {"dni", "petra", "dgl"}
    assert out["dni"]["over_brigade_1f1b"] == pytest.approx(1.5)
    assert out["dni"]["over_torch_1f1b"] == pytest.approx(1.2)
    assert out["petra"]["ceiling"] == pytest.approx(1.5)  # (m+p-1)/m at m=2, p=2
    mlp = [{**r, "model": "mlp", "samples_per_s": r["samples_per_s"] * (0.5 if
            r["schedule"] == "dni" else 1.0)} for r in rows if r["schedule"] != "petra"]
    best = ur.best_over_torch([*out.values(), *ur.ratios(mlp, m=2)])
    assert best == {("revnet18", 2): ("dgl", pytest.approx(1.4)),
                    ("mlp", 2): ("dgl", pytest.approx(1.4))}


def test_the_mlp_sweeps_on_mnist_shapes_at_its_own_width():
    args = ur.argparse.Namespace(batch_size=64, width=16, backends="ray", warmup=1, steps=2,
                                 window=1)
    mlp, rev = ur.sweep_config("mlp", 2, args), ur.sweep_config("revnet18", 2, args)
    assert (mlp.shapes, mlp.measure_shape, rev.shapes) == (("mnist",), "mnist", ("cifar",))
    assert "dgl" in mlp.schedules and "petra" in mlp.schedules  # petra: skipped (revnets only)
    from resnet_bench.profiling import make_model

    assert make_model(mlp, "mlp", "mnist")[0][1].out_features == 1024  # not --width 16


def test_bad_sweep_flags_exit_2_before_anything_runs(capsys):
    assert ur.main(["--microbatches", "1,x"]) == 2
    assert ur.main(["--microbatches", "3", "--batch-size", "64"]) == 2
    assert "not a multiple of --microbatches 3" in capsys.readouterr().err
