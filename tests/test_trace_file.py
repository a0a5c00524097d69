"""``brigade train --trace`` writes a Chrome trace (Perfetto, chrome://tracing): events
per worker, valid phases and times, a flow per message; ``brigade report`` reads it back."""

from __future__ import annotations

import json

import pytest

from brigade.engine.cli import main
from brigade.schedulers import Timeline
from trace_format import check_chrome_trace

SMALL = ["--model", "mlp", "--width", "32", "--data", "synthetic", "--backend", "local",
         "--batch-size", "32", "--quiet"]


def test_train_trace_opens_as_chrome_trace_and_report_reads_it(tmp_path, capsys):
    trace, out, rep = tmp_path / "t.json", tmp_path / "o.json", tmp_path / "r.json"
    assert main(["train", *SMALL, "--stages", "2", "--schedule", "1f1b", "--microbatches",
                 "4", "--steps", "3", "--trace", str(trace), "--json", str(out)]) == 0
    data = json.loads(trace.read_text())
    counts = check_chrome_trace(data, workers=2)
    assert counts["flows"] == 3 * 4 * 2  # steps x m x (activation, gradient) over one link
    assert sorted(counts["threads"].values()) == ["worker 0 (stages 0)", "worker 1 (stages 1)"]
    compute = [e for e in data["traceEvents"] if e["ph"] == "X" and e["cat"] == "compute"]
    assert {e["args"]["kind"] for e in compute} == {"F", "B", "U"}
    assert len([e for e in compute if e["args"]["kind"] == "F"]) == 3 * 4 * 2
    kept = data["otherData"]["brigade"]["timelines"][0]
    assert kept["meta"]["source"] == "measured" and kept["meta"]["schedule"] == "1f1b"

    capsys.readouterr()
    assert main(["report", str(trace), "--no-plot", "--json", str(rep)]) == 0
    assert "measured vs simulated" in capsys.readouterr().out
    figures = json.loads(out.read_text())
    measured = json.loads(rep.read_text())["measured"]
    assert measured["bubble_fraction"] == pytest.approx(figures["bubble_fraction"], rel=1e-6)
    # the older timeline JSON still reads
    old = tmp_path / "old.json"
    Timeline.from_json(trace).to_json(old)
    assert main(["report", str(old), "--no-plot"]) == 0


def test_dni_trace_has_flows_both_ways(tmp_path):
    trace = tmp_path / "dni.json"
    assert main(["train", *SMALL, "--stages", "3", "--method", "dni", "--schedule", "dni",
                 "--microbatches", "2", "--steps", "2", "--trace", str(trace)]) == 0
    data = json.loads(trace.read_text())
    counts = check_chrome_trace(data, workers=3)
    starts = {e["id"]: e for e in data["traceEvents"] if e["ph"] == "s"}
    ends = [e for e in data["traceEvents"] if e["ph"] == "f"]
    links = {(starts[e["id"]]["tid"], e["tid"], e["name"].split(" -> ")[1][1]) for e in ends}
    # h goes on to the next stage's S; the gradient it returns trains the previous one's T
    assert links == {(0, 1, "S"), (1, 2, "S"), (1, 0, "T"), (2, 1, "T")}
    assert counts["flows"] == 2 * 2 * 2 * 2  # 2 links x 2 ways x 4 microbatches


def test_report_reads_its_own_chrome_trace_of_measured_and_simulated(tmp_path, capsys):
    trace, both = tmp_path / "t.json", tmp_path / "both.json"
    assert main(["train", *SMALL, "--stages", "2", "--steps", "2", "--trace", str(trace)]) == 0
    assert main(["report", str(trace), "--no-plot", "--chrome-trace", str(both)]) == 0
    data = json.loads(both.read_text())
    check_chrome_trace(data, workers=2)
    names = [t["name"] for t in data["otherData"]["brigade"]["timelines"]]
    assert names == ["measured", "simulated"]
    capsys.readouterr()
    assert main(["report", str(both), "--no-plot"]) == 0  # picks the measured one
    assert "measured vs simulated" in capsys.readouterr().out
