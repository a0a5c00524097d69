"""Actions and schedules as data: text forms, JSON, placement; no torch or ray imported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from brigade.schedulers import (
    COMM_KINDS, COMPUTE_KINDS, KINDS, Action, Schedule, ScheduleError, build, names,
    parse_actions,
)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("stage, microbatch", [(0, 0), (1, 3), (12, 105)])
def test_every_kind_prints_and_parses_back(kind, stage, microbatch):
    a = Action(stage, kind, microbatch)
    assert str(a) == f"{stage}{kind}{microbatch}"
    assert Action.parse(str(a)) == a
    assert repr(a) == str(a)


def test_kind_sets():
    assert COMPUTE_KINDS == {"F", "B", "I", "W", "U", "S", "T", "R", "D"}
    assert COMM_KINDS == {"SF", "RF", "SB", "RB"}
    # one-letter S (DNI) and two-letter SF (send) never read alike
    assert Action.parse("1S3").kind == "S" and Action.parse("1SF3").kind == "SF"


@pytest.mark.parametrize("text", ["", "F3", "1F", "1X3", "1f3", "-1F3", "1FFF3", "1 F 3"])
def test_bad_text_is_refused_with_the_valid_kinds(text):
    with pytest.raises(ScheduleError, match="kinds"):
        Action.parse(text)


def test_bad_fields_are_refused():
    with pytest.raises(ScheduleError, match="valid kinds"):
        Action(0, "X", 0)
    with pytest.raises(ScheduleError, match=">= 0"):
        Action(-1, "F", 0)


def test_parse_actions_reads_a_list():
    assert parse_actions(" 0F0 0F1\n1B0 ") == [Action(0, "F", 0), Action(0, "F", 1),
                                               Action(1, "B", 0)]


def test_names_are_the_nine_schedules():
    assert names() == ["gpipe", "1f1b", "interleaved", "zb1p", "dni", "petra", "stale",
                       "fwdgrad", "dgl"]


def test_build_is_case_insensitive_and_lists_names_when_unknown():
    assert build("GPipe", 2, 2).name == "gpipe"
    with pytest.raises(ScheduleError, match="valid names: gpipe, 1f1b, interleaved"):
        build("pipedream", 2, 2)
    with pytest.raises(ScheduleError, match="its options: k"):
        build("stale", 2, 2, lag=3)


def test_placement_follows_megatron():
    s = build("interleaved", 2, 4, virtual=2)
    assert (s.num_stages, s.num_workers, s.virtual) == (4, 2, 2)
    assert [s.worker_of(x) for x in range(4)] == [0, 1, 0, 1]
    assert s.stages_of(0) == [0, 2] and s.stages_of(1) == [1, 3]
    with pytest.raises(ScheduleError, match="stages 0..3"):
        s.worker_of(4)


@pytest.mark.parametrize("name", names())
def test_schedule_json_round_trip(name, tmp_path):
    s = build(name, 2, 4, virtual=2 if name == "interleaved" else 1, steps=2)
    again = Schedule.from_json(s.to_json())
    assert again == s
    path = tmp_path / "s.json"
    s.to_json(path)
    assert Schedule.from_json(path) == s
    assert Schedule.from_json(json.dumps(s.to_json())) == s


def test_schedule_accepts_text_rows_and_checks_sizes():
    s = Schedule("mine", 2, 2, 1, 1, 1, ["0F0 0B0", ["1F0", "1B0"]])
    assert s.workers[1] == [Action(1, "F", 0), Action(1, "B", 0)]
    with pytest.raises(ScheduleError, match="x virtual"):
        Schedule("bad", 3, 2, 1, 1, 1, [[], []])
    with pytest.raises(ScheduleError, match="microbatches must be a positive integer"):
        Schedule("bad", 2, 2, 0, 1, 1, [[], []])


def test_schedulers_import_neither_torch_nor_ray():
    code = ("import sys, brigade.schedulers as s; s.simulate(s.build('1f1b', 2, 2)); "
            "bad = [m for m in ('torch', 'ray', 'matplotlib') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
