"""``brigade submit``: the ``ray job submit`` command it builds, and train flags refused
before anything is sent (the round trip on a real cluster is in test_cluster.py)."""

from __future__ import annotations

import pytest

from brigade.engine.cli import main


def test_print_shows_the_ray_job_command(capsys, tmp_path):
    argv = ["submit", "--print", "--address", "http://10.0.0.1:8265", "--submission-id",
            "run-1", "--working-dir", str(tmp_path), "--no-wait", "--", "--model", "mlp",
            "--stages", "2", "--cpus-per-stage", "1", "--placement", "spread"]
    assert main(argv) == 0
    line = capsys.readouterr().out.strip()
    assert line.split(" job submit ", 1)[1] == (
        f"--address http://10.0.0.1:8265 --submission-id run-1 --working-dir {tmp_path} "
        "--no-wait -- brigade train --model mlp --stages 2 --cpus-per-stage 1 "
        "--placement spread")


def test_default_address_follows_ray(capsys, monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert main(["submit", "--print", "--", "--steps", "3"]) == 0
    assert "--address http://127.0.0.1:8265 --" in capsys.readouterr().out
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://head:9000")
    assert main(["submit", "--print", "--", "--steps", "3"]) == 0
    assert "--address http://head:9000 --" in capsys.readouterr().out


@pytest.mark.parametrize("train,message", [
    ([], "no train flags; give them after --"),
    (["--model", "mlp", "--bogus", "1"], "unknown train flags --bogus 1"),
    (["--stages", "x"], "--stages 'x' must be an integer"),
    (["--placement", "ring"], "unknown placement 'ring'; valid placements: pack, spread"),
    (["--cpus-per-stage", "-2"], "--cpus-per-stage -2 must be >= 0"),
    (["--backend", "torchrun"], "--backend torchrun cannot run as a Ray job"),
])
def test_bad_train_flags_exit_2_before_submitting(train, message, capsys):
    assert main(["submit", "--print", "--", *train]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_missing_working_dir_is_refused(capsys, tmp_path):
    assert main(["submit", "--print", "--working-dir", str(tmp_path / "nope"), "--",
                 "--steps", "1"]) == 2
    assert "is not a folder" in capsys.readouterr().err
