"""A checker of Chrome trace JSON (the Trace Event Format's object form) as Perfetto and
chrome://tracing read it: shared by the tests of traces brigade writes."""

from __future__ import annotations

from collections import Counter, defaultdict

PHASES = {"X", "M", "s", "f"}


def check_chrome_trace(data: dict, workers: int | None = None) -> dict:
    """Assert that ``data`` is a well-formed trace; return counts the caller may check:
    ``{"spans": {(pid, tid): n}, "flows": n, "threads": {(pid, tid): name}}``."""
    assert isinstance(data, dict) and isinstance(data["traceEvents"], list)
    spans: dict[tuple, list[dict]] = defaultdict(list)
    threads: dict[tuple, str] = {}
    processes: dict[int, str] = {}
    flows: dict[int, dict[str, dict]] = defaultdict(dict)
    for e in data["traceEvents"]:
        assert e["ph"] in PHASES, e
        assert isinstance(e["pid"], int) and isinstance(e["tid"], int), e
        assert isinstance(e["name"], str) and e["name"], e
        if e["ph"] == "M":
            assert e["name"] in ("process_name", "thread_name", "process_sort_index",
                                 "thread_sort_index"), e
            if e["name"] == "thread_name":
                threads[(e["pid"], e["tid"])] = e["args"]["name"]
            elif e["name"] == "process_name":
                processes[e["pid"]] = e["args"]["name"]
            continue
        assert isinstance(e["ts"], (int, float)) and e["ts"] >= 0, e
        if e["ph"] == "X":
            assert isinstance(e["dur"], (int, float)) and e["dur"] >= 0, e
            spans[(e["pid"], e["tid"])].append(e)
        else:
            assert e["ph"] not in flows[e["id"]], f"flow id {e['id']} has two {e['ph']!r}"
            flows[e["id"]][e["ph"]] = e
            if e["ph"] == "f":
                assert e.get("bp") == "e", e
    for key in spans:
        assert key in threads, f"track {key} has spans but no thread_name"
        assert key[0] in processes, f"process {key[0]} has no process_name"
    for fid, pair in flows.items():
        assert set(pair) == {"s", "f"}, f"flow {fid} is not a start/finish pair: {pair}"
        s, f = pair["s"], pair["f"]
        assert s["cat"] == f["cat"] and s["pid"] == f["pid"]
        assert s["ts"] <= f["ts"] + 1e-3, (s, f)  # a message arrives after it was sent
        for end in (s, f):  # each end binds to a span of its track that encloses it
            assert any(x["ts"] <= end["ts"] <= x["ts"] + x["dur"]
                       for x in spans[(end["pid"], end["tid"])]), end
    if workers is not None:
        for pid in processes:
            have = {tid for (p, tid) in spans if p == pid}
            assert have == set(range(workers)), f"process {pid}: spans on tracks {have}"
    return {"spans": Counter({k: len(v) for k, v in spans.items()}), "flows": len(flows),
            "threads": threads}
