"""Chrome traces of simulated timelines: one track per worker, a flow per message between
workers (found by the dependency rules), and brigade's own data kept so that reading the
file back gives the same timeline."""

from __future__ import annotations

import json

import pytest

from brigade.schedulers import (
    Costs, ScheduleError, Timeline, build, chrome_trace, lower, read_chrome_trace, simulate,
    write_chrome_trace,
)
from trace_format import check_chrome_trace


def _same_figures(a: dict, b: dict) -> None:
    """Two summaries equal up to float rounding (lists compared item by item)."""
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], list):
            assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-12), k
        elif isinstance(a[k], float):
            assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-12), k
        else:
            assert a[k] == b[k], k


def _flows(data: dict) -> list[tuple[str, int, int]]:
    """(name, from worker, to worker) of every flow."""
    starts = {e["id"]: e for e in data["traceEvents"] if e["ph"] == "s"}
    return sorted((e["name"], starts[e["id"]]["tid"], e["tid"])
                  for e in data["traceEvents"] if e["ph"] == "f")


@pytest.mark.parametrize("name, virtual, messages", [
    ("gpipe", 1, 2 * 2 * 3),        # (p-1) links x m x (activation + gradient)
    ("interleaved", 2, (2 * 3 - 1) * 3 * 2),  # v*p-1 links, every one between workers
    ("fwdgrad", 1, 3 * 2 + 2 * 3),  # activations (2 links x 3) + d from the last to 2
    ("dni", 1, 2 * 3 + 2 * 3),      # S sends h on, T gets the gradient back
])
def test_flows_follow_the_messages_between_workers(name, virtual, messages, tmp_path):
    p, m = 3, 3
    tl = simulate(build(name, stages=p, microbatches=m, virtual=virtual), Costs(f=1, b=2))
    data = json.loads(write_chrome_trace(tl, tmp_path / "t.json").read_text())
    counts = check_chrome_trace(data, workers=p)
    assert counts["flows"] == messages
    if name == "fwdgrad":
        back = [f for f in _flows(data) if f[1] > f[2]]
        assert {(a, b) for _, a, b in back} == {(2, 0), (2, 1)}  # d goes straight back


def test_lowered_flows_go_from_send_to_receive():
    tl = simulate(lower(build("1f1b", stages=2, microbatches=2)), Costs(latency=0.5))
    data = chrome_trace(tl)
    check_chrome_trace(data, workers=2)
    names = {n for n, _, _ in _flows(data)}
    assert names == {"0SF0 -> 1RF0", "0SF1 -> 1RF1", "1SB0 -> 0RB0", "1SB1 -> 0RB1"}


def test_reading_a_trace_back_gives_the_same_timeline(tmp_path):
    tls = {n: simulate(build(n, 2, 4), Costs(f=1, b=2, latency=0.1)) for n in ("gpipe", "petra")}
    path = write_chrome_trace(tls, tmp_path / "two.json")
    again = read_chrome_trace(path)
    assert list(again) == ["gpipe", "petra"]
    for n, tl in tls.items():
        assert again[n].meta == tl.meta and again[n].num_workers == tl.num_workers
        assert [(e.worker, e.label, e.category) for e in again[n].events] == \
               [(e.worker, e.label, e.category) for e in tl.events]
        for got, want in zip(again[n].events, tl.events):
            assert got.start == pytest.approx(want.start, abs=1e-9)
            assert got.end == pytest.approx(want.end, abs=1e-9)
        _same_figures(again[n].summary(), tl.summary())
    with pytest.raises(ScheduleError, match="holds 2 timelines"):
        Timeline.from_json(path)
    one = write_chrome_trace(tls["petra"], tmp_path / "one.json")
    _same_figures(Timeline.from_json(one).summary(), tls["petra"].summary())


def test_a_trace_without_brigade_data_is_refused(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"traceEvents": [{"ph": "X", "name": "x", "ts": 0, "dur": 1,
                                                 "pid": 0, "tid": 0}]}))
    with pytest.raises(ScheduleError, match="holds no brigade timeline"):
        Timeline.from_json(path)


def test_a_timeline_whose_schedule_is_unknown_gets_spans_but_no_flows():
    tl = simulate(build("gpipe", 2, 2))
    tl.meta["schedule"] = "hand-made"
    data = chrome_trace(tl)
    assert check_chrome_trace(data, workers=2)["flows"] == 0
