"""``brigade schedule show|compare``: output, JSON, files, and invalid combinations (exit 2)."""

from __future__ import annotations

import argparse
import json

import pytest

from brigade.engine import cli
from brigade.engine.cli import schedule_cmd
from brigade.schedulers import ScheduleError

MODULE = "brigade.engine.cli.schedule_cmd"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="brigade schedule")
    schedule_cmd.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture
def main(monkeypatch):
    """``brigade.engine.cli.main`` with the schedule command registered (and only it, so
    this test does not depend on the other commands)."""
    monkeypatch.setattr(cli, "COMMANDS", [MODULE])
    return cli.main


def test_protocol():
    assert schedule_cmd.NAME == "schedule" and schedule_cmd.HELP
    assert callable(schedule_cmd.add_arguments) and callable(schedule_cmd.run)


def test_show_prints_the_grid_and_the_summary(capsys):
    assert schedule_cmd.run(parse(["show", "--schedule", "1F1B", "--stages", "3",
                                   "--microbatches", "4"])) == 0
    out = capsys.readouterr().out
    assert "w0 | 0F0 0F1 0F2         0B0 0F3 0B1     0B2     0B3 0U0" in out
    assert "33.3%" in out and "makespan 18" in out  # (p-1)/(m+p-1) with b = 2f


def test_show_lowered(capsys):
    schedule_cmd.run(parse(["show", "--schedule", "gpipe", "--stages", "2",
                            "--microbatches", "1", "--lowered"]))
    assert "0F0 0SF0" in capsys.readouterr().out


def test_compare_all_seven_writes_json_plot_and_trace(tmp_path, capsys):
    out_json, png, trace = tmp_path / "c.json", tmp_path / "c.png", tmp_path / "t.json"
    code = schedule_cmd.run(parse([
        "compare", "--stages", "4", "--microbatches", "8", "--steps", "2",
        "--costs", "f=1,b=2,u=0.1", "--json", str(out_json), "--plot", str(png),
        "--trace", str(trace)]))
    assert code == 0
    text = capsys.readouterr().out
    for name in ("gpipe", "1f1b", "interleaved", "zb1p", "dni", "petra", "stale"):
        assert name in text
    data = json.loads(out_json.read_text())
    assert (data["stages"], data["microbatches"], data["virtual"], data["steps"]) == (4, 8, 2, 2)
    assert data["costs"]["b"] == 2 and data["costs"]["u"] == 0.1
    assert list(data["schedules"]) == ["gpipe", "1f1b", "interleaved", "zb1p", "dni", "petra",
                                       "stale"]
    for figures in data["schedules"].values():
        assert set(figures) >= {"bubble_fraction", "idle_fraction", "makespan", "throughput",
                                "peak_activations"}
        assert len(figures["idle_fraction"]) == 4
    assert len(data["schedules"]["interleaved"]["peak_activations"]) == 8
    assert data["schedules"]["1f1b"]["peak_activations"] == [4, 3, 2, 1]
    assert png.stat().st_size > 10_000
    assert json.loads(trace.read_text())["traceEvents"]


def test_compare_uses_virtual_only_for_interleaved(tmp_path):
    path = tmp_path / "c.json"
    schedule_cmd.run(parse(["compare", "--schedules", "gpipe,interleaved", "--stages", "2",
                            "--microbatches", "4", "--virtual", "3", "--json", str(path)]))
    data = json.loads(path.read_text())["schedules"]
    assert len(data["gpipe"]["peak_activations"]) == 2
    assert len(data["interleaved"]["peak_activations"]) == 6
    # same model both ways: interleaved's chunks cost 1/v, so its bubble is smaller
    assert data["interleaved"]["bubble_fraction"] == pytest.approx(1 / (3 * 4 + 1))
    assert data["gpipe"]["bubble_fraction"] == pytest.approx(1 / 5)


# argv, text the one-line error must contain
INVALID = [
    (["show", "--schedule", "1f1b", "--stages", "4", "--microbatches", "2"],
     "1f1b needs microbatches >= stages"),
    (["show", "--schedule", "1f1b", "--stages", "4", "--microbatches", "2"], "use m >= 4"),
    (["show", "--schedule", "zb1p", "--stages", "3", "--microbatches", "2"], "use m >= 3"),
    (["show", "--schedule", "interleaved", "--stages", "4", "--microbatches", "9"],
     "use m=8 or m=10"),
    (["show", "--schedule", "interleaved", "--stages", "4", "--microbatches", "3"],
     "interleaved needs microbatches >= stages"),
    (["show", "--schedule", "interleaved", "--stages", "2", "--microbatches", "4",
      "--virtual", "1"], "interleaved needs virtual >= 2"),
    (["compare", "--stages", "2", "--microbatches", "4", "--virtual", "1"],
     "with one stage per worker use '1f1b'"),
    (["show", "--schedule", "gpipe", "--stages", "2", "--microbatches", "4", "--virtual", "2"],
     "gpipe runs one stage per worker"),
    (["show", "--schedule", "gpipe", "--stages", "0", "--microbatches", "4"],
     "stages must be a positive integer, got 0"),
    (["show", "--schedule", "gpipe", "--stages", "2", "--microbatches", "-1"],
     "microbatches must be a positive integer, got -1"),
    (["show", "--schedule", "dni", "--stages", "2", "--microbatches", "2", "--steps", "0"],
     "steps must be a positive integer, got 0"),
    (["show", "--schedule", "pipedream", "--stages", "2", "--microbatches", "2"],
     "valid names: gpipe, 1f1b, interleaved, zb1p, dni, petra, stale"),
    (["compare", "--schedules", "gpipe,foo", "--stages", "2", "--microbatches", "2"],
     "unknown schedule 'foo'"),
    (["compare", "--stages", "2", "--microbatches", "2", "--costs", "f=-1"],
     "cost f must be a finite number >= 0"),
    (["compare", "--stages", "2", "--microbatches", "2", "--costs", "speed=3"],
     "with keys f, b"),
    (["compare", "--schedules", "gpipe", "--stages", "2", "--microbatches", "2",
      "--options", "k=2"], "no chosen schedule takes option k"),
    (["show", "--schedule", "stale", "--stages", "2", "--microbatches", "2",
      "--options", "k=0"], "stale option k must be a positive integer"),
    (["show", "--schedule", "stale", "--stages", "2", "--microbatches", "2",
      "--options", "k=two"], "write key=integer"),
    (["compare", "--stages", "2", "--microbatches", "2", "--plot", "x.bmp"],
     "ending in .png, .svg or .pdf"),
]


@pytest.mark.parametrize("argv, expected", INVALID, ids=[" ".join(a[:4]) + "|" + e[:20]
                                                        for a, e in INVALID])
def test_invalid_combinations_raise_schedule_error(argv, expected):
    with pytest.raises(ScheduleError, match=expected.replace("(", r"\(")):
        schedule_cmd.run(parse(argv))


@pytest.mark.parametrize("argv, expected", INVALID[::3], ids=[e[:30] for _, e in INVALID[::3]])
def test_invalid_combinations_exit_2_with_one_line(main, capsys, argv, expected):
    assert main(["schedule", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("brigade schedule: error: ") and expected in err
    assert err.count("\n") == 1


def test_main_runs_compare(main, capsys):
    assert main(["schedule", "compare", "--schedules", "gpipe,dni", "--stages", "2",
                 "--microbatches", "2"]) == 0
    assert "dni" in capsys.readouterr().out


def test_subcommand_is_required(main):
    with pytest.raises(SystemExit) as info:
        main(["schedule"])
    assert info.value.code == 2


def test_compare_says_its_units_and_why_petra_is_slow_at_the_lowest_bubble(main, capsys):
    assert main(["schedule", "compare", "--schedules", "gpipe,1f1b,zb1p,dni,petra",
                 "--stages", "4", "--microbatches", "8", "--steps", "10",
                 "--width", "200"]) == 0
    out = capsys.readouterr().out
    assert "(cost units)" in out and "/ cost unit)" in out and "(microbatches)" in out
    assert "throughput = (1 - bubble) / work per sample" in out
    note = next(line for line in out.splitlines() if line.startswith("petra has"))
    assert "lowest bubble (3.6%)" in note and "work per sample is 4 cost units" in note
    assert "R (reconstruct + backward (PETRA)) costs r + b" in note
    assert not any(line.startswith(("dni has", "gpipe has")) for line in out.splitlines())


def test_work_per_sample_gives_the_throughput(tmp_path):
    from brigade.schedulers import Costs, build, simulate

    for name in ("gpipe", "dni", "petra", "stale"):
        tl = simulate(build(name, stages=3, microbatches=4, steps=3), Costs(f=1, b=2, u=0.5))
        assert tl.throughput == pytest.approx((1 - tl.bubble_fraction) / tl.work_per_sample)
