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
        {"runner": "torch", "schedule": "1f1b", "samples_per_s": 125.0},
        {"runner": "simulated", "schedule": "dni", "samples_per_s": 999.0},
    ]
    out = {r["method"]: r for r in ur.ratios(rows, m=2)}
    assert set(out) == {"dni", "petra"}
    assert out["dni"]["over_brigade_1f1b"] == pytest.approx(1.5)
    assert out["dni"]["over_torch_1f1b"] == pytest.approx(1.2)
    assert out["petra"]["ceiling"] == pytest.approx(1.5)  # (m+p-1)/m at m=2, p=2


def test_bad_sweep_flags_exit_2_before_anything_runs(capsys):
    assert ur.main(["--microbatches", "1,x"]) == 2
    assert ur.main(["--microbatches", "3", "--batch-size", "64"]) == 2
    assert "not a multiple of --microbatches 3" in capsys.readouterr().err
