"""``brigade methods``: the rules' declarations as a table (and JSON), user rules included."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from brigade.engine.cli import main

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = ["backprop", "stale", "dni", "cdni", "petra", "fwdgrad", "dgl"]


def test_every_builtin_rule_with_schedules_wire_and_exposure(tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["methods", "--stages", "3", "--shape", "8,32", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    rules = {r["name"]: r for r in report["methods"]}
    assert list(rules)[:len(BUILTIN)] == BUILTIN
    for name in BUILTIN:
        assert name in printed
    assert rules["backprop"]["schedules"][0] == "1f1b"
    assert rules["dni"]["default_optimizer"] == {"name": "sgd", "lr": 0.1,
                                                 "lr_schedule": "cosine"}
    assert rules["backprop"]["forward"][0]["elements"] == 8 * 32
    assert rules["petra"]["backward"][0]["elements"] == 2 * 8 * 32
    assert rules["dgl"]["backward"] == []
    # projections auto (the default) depend on the model's blocks: no size from a shape alone
    assert rules["fwdgrad"]["backward"][0]["elements"] is None

    def seen(name, key):
        return [e[key] for e in rules[name]["exposure"]]

    assert seen("backprop", "true_gradients") == [True, True, False]
    assert seen("backprop", "inputs") == [True, False, False]
    assert seen("dni", "true_gradients") == [False, True, False]  # only the last's target
    assert seen("cdni", "labels") == [True, True, True]
    assert seen("dgl", "labels") == [True, True, True]
    assert not any(seen("dgl", "true_gradients")) and not any(seen("fwdgrad", "true_gradients"))
    flags = {o["flag"] for o in rules["dni"]["options"]}
    assert {"--sg-lr", "--sg-hidden-layers", "--update-prob"} <= flags


def test_bad_arguments_exit_2(capsys):
    assert main(["methods", "--stages", "0"]) == 2
    assert "--stages 0 must be >= 1" in capsys.readouterr().err
    assert main(["methods", "--import", "no/such/rules.py"]) == 2
    assert "no rules module at 'no/such/rules.py'" in capsys.readouterr().err


def test_a_users_rule_is_listed_once_its_module_is_imported(tmp_path):
    out = tmp_path / "m.json"
    proc = subprocess.run(
        [sys.executable, "-m", "brigade.engine.cli", "methods", "--import",
         str(ROOT / "examples" / "custom_method.py"), "--json", str(out)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    names = [r["name"] for r in json.loads(out.read_text())["methods"]]
    assert names[:len(BUILTIN)] == BUILTIN and "signsgd" in names
    assert "signsgd" in proc.stdout
