"""Timeline: metrics from compute events, JSON round trip, Chrome trace, reports, plots."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from brigade.schedulers import (
    Costs, Event, ScheduleError, Timeline, build, compare_table, grid_text, plot_gantt,
    side_by_side, simulate, summary_table, write_chrome_trace,
)


def tiny() -> Timeline:
    """Two workers: w0 computes 0..2 and 3..4, waits 2..3; w1 computes 1..2 and 4..5."""
    return Timeline(
        events=[
            Event(0, 0, "F", 0, 0.0, 2.0),
            Event(0, 0, "B", 0, 2.0, 3.0, "wait"),
            Event(0, 0, "B", 0, 3.0, 4.0),
            Event(1, 1, "F", 0, 1.0, 2.0),
            Event(1, 1, "B", 0, 4.0, 5.0),
            Event(1, 1, "SB", 0, 5.0, 6.0, "send"),
        ],
        num_workers=2, samples=10, meta={"schedule": "tiny", "source": "measured"},
    )


def test_metrics_use_compute_events_over_their_window():
    tl = tiny()
    assert tl.window == (0.0, 5.0) and tl.makespan == 5.0
    assert (tl.busy(0), tl.idle(0), tl.idle_fraction(0)) == (3.0, 2.0, 0.4)
    assert (tl.busy(1), tl.idle(1)) == (2.0, 3.0)
    assert tl.bubble_fraction == pytest.approx(5 / 10)
    assert tl.throughput == 2.0
    assert tl.peak_activations(0) == 1 and tl.num_stages == 2
    s = tl.summary()
    assert s["idle_fraction"] == [0.4, 0.6] and s["peak_activations"] == [1, 1]


def test_events_are_checked():
    with pytest.raises(ScheduleError, match="before it starts"):
        Event(0, 0, "F", 0, 2.0, 1.0)
    with pytest.raises(ScheduleError, match="not one of compute, wait, send, recv"):
        Event(0, 0, "F", 0, 0.0, 1.0, "sleep")
    with pytest.raises(ScheduleError, match="workers 0..0"):
        Timeline([Event(1, 0, "F", 0, 0.0, 1.0)], num_workers=1)


def test_overlapping_compute_counts_once():
    tl = Timeline([Event(0, 0, "F", 0, 0, 2), Event(0, 0, "F", 1, 1, 3)], num_workers=1)
    assert tl.busy(0) == 3 and tl.idle(0) == 0


def test_json_round_trip(tmp_path):
    tl = simulate(build("1f1b", 3, 4), Costs(f=1, b=2, latency=0.1))
    again = Timeline.from_json(tl.to_json())
    assert again == tl
    path = tmp_path / "tl.json"
    tl.to_json(path)
    loaded = Timeline.from_json(path)
    assert loaded.summary() == tl.summary() and loaded.meta["source"] == "simulated"
    assert Timeline.from_json(json.dumps(tl.to_json())).events == tl.events


def test_chrome_trace_is_well_formed(tmp_path):
    tl = simulate(build("gpipe", 2, 2), Costs(f=1, b=2))
    trace = tl.to_chrome_trace()
    assert len(trace) == len(tl.events)
    for e in trace:
        assert {"name", "ph", "ts", "dur", "pid", "tid"} <= set(e)
        assert e["ph"] == "X" and e["dur"] >= 0 and e["ts"] >= 0
    first = min(trace, key=lambda e: e["ts"])
    assert first["name"] == "0F0" and first["dur"] == pytest.approx(1e6)
    path = write_chrome_trace({"gpipe": tl, "again": tl}, tmp_path / "trace.json")
    data = json.loads(path.read_text())
    assert {e["pid"] for e in data["traceEvents"]} == {0, 1}
    names = [e["args"]["name"] for e in data["traceEvents"] if e["ph"] == "M"
             and e["name"] == "process_name"]
    assert names == ["gpipe", "again"]


def render(table) -> str:
    console = Console(width=160, record=True)
    console.print(table)
    return console.export_text()


def test_compare_table_has_a_row_per_schedule():
    tls = {n: simulate(build(n, 2, 4), Costs(f=1, b=1)) for n in ("gpipe", "1f1b", "dni")}
    text = render(compare_table(tls, title="p=2"))
    assert "gpipe" in text and "dni" in text and "20.0%" in text  # (p-1)/(m+p-1) = 1/5
    assert "idle" in text and "w1" in text and "4 4" in text  # gpipe peak m per stage


def test_side_by_side_and_summary_tables():
    sim = simulate(build("gpipe", 2, 2), Costs(f=1, b=1))
    measured = Timeline([Event(e.worker, e.stage, e.kind, e.microbatch, e.start * 1.1,
                               e.end * 1.1, e.category) for e in sim.events],
                        num_workers=2, samples=sim.samples, meta={"source": "measured"})
    text = render(side_by_side(measured, sim, title="run vs model"))
    assert "measured" in text and "simulated" in text and "bubble" in text
    assert "w1" in text and "throughput" in text
    assert "makespan 6" in render(summary_table(sim))


def test_grid_text_of_a_schedule_and_of_a_timeline():
    assert grid_text(build("gpipe", 2, 2)).startswith("w0 | 0F0 0F1")
    text = grid_text(simulate(build("gpipe", 2, 2), Costs(f=1, b=1)), width=12)
    assert text.splitlines() == [
        "w0 | FFFF....BBBB",
        "w1 | ..FFFFBBBB..",
        "     0          6",
    ]


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_plot_writes_a_non_empty_picture(tmp_path, suffix):
    tls = {n: simulate(build(n, 3, 4, virtual=2 if n == "interleaved" else 1, steps=2),
                       Costs(f=1, b=2, u=0.2))
           for n in ("gpipe", "interleaved", "petra")}
    path = plot_gantt(tls, tmp_path / f"g{suffix}")
    data = path.read_bytes()
    assert len(data) > 5000
    assert data[:8] == b"\x89PNG\r\n\x1a\n" if suffix == ".png" else b"<svg" in data[:2000]


def test_plot_refuses_an_unknown_format(tmp_path):
    with pytest.raises(ScheduleError, match=".png, .svg"):
        plot_gantt(tiny(), tmp_path / "g.bmp")
