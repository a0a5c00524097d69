"""The pure room stays pure: importing brigade.schedulers pulls no torch, ray, rich or
matplotlib, and `brigade schedule show|compare` runs without importing torch or ray (each
checked in a fresh interpreter, where nothing else has imported them first)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "ray", "rich", "matplotlib")


def _fresh(code: str) -> dict:
    """Run ``code`` in a new interpreter; it prints a JSON object as its last line."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_the_schedulers_pulls_no_heavy_library():
    loaded = _fresh(
        "import json, sys\n"
        "import brigade.schedulers as s\n"
        "s.simulate(s.build('1f1b', stages=2, microbatches=2))\n"
        f"print(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))\n")
    assert loaded == dict.fromkeys(HEAVY, False)


@pytest.mark.parametrize("argv", [
    ["schedule", "compare", "--stages", "4", "--microbatches", "8", "--steps", "2"],
    ["schedule", "show", "--schedule", "zb1p", "--stages", "3", "--microbatches", "3",
     "--lowered"],
])
def test_brigade_schedule_runs_without_torch(argv, tmp_path):
    out = tmp_path / "figures.json"
    loaded = _fresh(
        "import json, sys, contextlib, io\n"
        "from brigade.engine.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    rc = main({argv + ['--json', str(out)]!r})\n"
        "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules,\n"
        "                  'ray': 'ray' in sys.modules}))\n")
    assert loaded == {"rc": 0, "torch": False, "ray": False}
    assert json.loads(out.read_text())["schedules"]  # it did the work


def test_the_engine_package_loads_its_names_on_first_use():
    loaded = _fresh(
        "import json, sys\n"
        "import brigade.engine as e\n"
        "before = 'torch' in sys.modules\n"
        "ok = e.Pipeline.__name__ == 'Pipeline' and 'Pipeline' in dir(e)\n"
        "print(json.dumps({'before': before, 'after': 'torch' in sys.modules, 'ok': ok}))\n")
    assert loaded == {"before": False, "after": True, "ok": True}
