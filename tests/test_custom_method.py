"""A user's own rule (examples/custom_method.py), registered from outside brigade, on Ray.

The example's module is not importable by the Ray workers (it is not on their path): the
declaration travels with the WorkerSpec and the backend ships the module by value, so
this fails if a worker had to import the rule by name.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from brigade.stages.rules import get_method, load_rules, method_names

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_method.py"

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_registered_rule_trains_on_ray_as_on_one_process(ray_cluster):
    module = load_rules(str(EXAMPLE))
    assert "signsgd" in method_names() and get_method("SignSGD").stage_class is module.SignSGDStage
    want = module.train(steps=12, backend="local")
    got = module.train(steps=12, backend="ray")
    assert got == pytest.approx(want, rel=1e-5)
    assert sum(got[-3:]) / 3 < 0.5 * sum(got[:3]) / 3, got


def test_the_example_script_trains_on_its_own_ray_cluster():
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "20"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "signsgd on ray: loss" in proc.stdout
