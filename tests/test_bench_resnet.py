"""bench/resnet_splits.py: rows that make sense, one-line errors, a torch peer that stops.

The figures themselves depend on the machine; these tests check what can fail regardless:
a row for every requested model x stages x schedule (petra on revnets only), fractions in
[0, 1], samples/s = batch / step time, skips that say why, bad flags exiting 2 with one
line, and the torchrun ranks (torch.distributed.pipelining's side and brigade's torchrun
side) running and profiling a split and leaving no process behind.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from _procs import descendants, wait_gone, with_cmdline

BENCH = Path(__file__).resolve().parents[1] / "bench" / "resnet_splits.py"


def _load():
    spec = importlib.util.spec_from_file_location("resnet_splits", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["resnet_splits"] = module
    spec.loader.exec_module(module)
    return module


rs = _load()  # puts bench/ on sys.path: its helper package imports by name
from resnet_bench import measure  # noqa: E402  (the private helpers the tests reach)

from brigade.schedulers import Timeline  # noqa: E402

KEYS = {"model", "stages", "microbatches", "schedule", "runner", "step_time_s", "samples_per_s",
        "bubble_fraction"}


def run_main(args: list[str]) -> int:
    try:
        return rs.main(args)
    except SystemExit as exit_:  # argparse's own errors
        return exit_.code


def check_row(row: dict) -> None:
    """Keys present; fractions in [0, 1]; samples/s consistent with the step time."""
    assert KEYS <= set(row), KEYS - set(row)
    if row.get("skipped"):
        assert row["step_time_s"] is None
        return
    assert row["step_time_s"] > 0
    assert row["samples_per_s"] == pytest.approx(row["batch_size"] / row["step_time_s"], rel=1e-9)
    assert 0.0 <= row["bubble_fraction"] <= 1.0
    idle = row["idle_per_stage"]
    assert len(idle) == row["stages"] and all(0.0 <= x <= 1.0 for x in idle)
    if "peak_activation_bytes" in row:
        assert row["peak_activation_bytes"] >= 0


def test_quick_simulated_run_writes_sane_rows(tmp_path):
    out, md, png = tmp_path / "rows.json", tmp_path / "t.md", tmp_path / "g.png"
    assert run_main(["--quick", "--no-measure", "--stages", "2,5", "--json", str(out),
                     "--markdown", str(md), "--gantt", str(png)]) == 0
    rows = json.loads(out.read_text())
    assert {r["runner"] for r in rows} == {"simulated"}
    got = sorted((r["model"], r["stages"], r["schedule"]) for r in rows)
    want = sorted((m, p, s) for m in ("resnet18", "revnet18") for p in (2, 5)
                  for s in rs.SCHEDULES if s != "petra" or m == "revnet18")
    assert got == want  # one row each; petra for the revnet only
    blocks = {"resnet18": 10, "revnet18": 10}
    for r in rows:
        check_row(r)
        assert r["microbatches"] == 4 and r["batch_size"] == 16 and r["shape"] == "cifar"
        if r.get("skipped"):
            continue
        assert sum(r["balance"]) == blocks[r["model"]]
        assert len(r["balance"]) == r["stages"] * (2 if r["schedule"] == "interleaved" else 1)
        steps = 2 if r["schedule"] in ("dni", "petra", "dgl") else 1  # decoupled: one window
        assert r["simulated_steps"] == steps
        assert r["costs"] == "profiled"
    # p=5 > m=4: the 1F1B family needs a microbatch per stage; gpipe and the decoupled don't
    skipped = {(r["model"], r["stages"], r["schedule"]): r["skipped"] for r in rows if r.get("skipped")}
    assert set(skipped) == {(m, 5, s) for m in ("resnet18", "revnet18")
                            for s in ("1f1b", "interleaved", "zb1p")}
    assert all("m=4" in why and "p=5" in why for why in skipped.values()), skipped
    assert md.read_text().startswith("# ResNet stage splits") and "| model |" in md.read_text()
    assert png.stat().st_size > 10_000


def test_too_few_blocks_for_interleaved_is_a_skip_that_says_why(tmp_path):
    out = tmp_path / "rows.json"
    assert run_main(["--models", "resnet18", "--shapes", "cifar", "--stages", "8",
                     "--schedules", "interleaved,gpipe", "--width", "4", "--batch-size", "16",
                     "--repeats", "1", "--no-measure", "--json", str(out)]) == 0
    rows = {r["schedule"]: r for r in json.loads(out.read_text())}
    assert "16 model stages" in rows["interleaved"]["skipped"] and "10 blocks" in rows["interleaved"]["skipped"]
    check_row(rows["gpipe"])
    assert len(rows["gpipe"]["balance"]) == 8


def test_imagenet_shape_is_profiled_small_and_scaled(tmp_path):
    out = tmp_path / "rows.json"
    assert run_main(["--models", "resnet18", "--shapes", "imagenet", "--stages", "2",
                     "--schedules", "1f1b", "--width", "4", "--batch-size", "16",
                     "--microbatches", "4", "--imagenet-profile-batch", "1", "--repeats", "1",
                     "--no-measure", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    check_row(row)
    assert row["costs"] == "scaled x4 from batch 1"


@pytest.mark.parametrize("args,names", [
    (["--models", "resnet19"], "resnet19"),
    (["--shapes", "svhn"], "svhn"),
    (["--schedules", "1f1b,foo"], "foo"),
    (["--stages", "1"], "stage count 1 is out of range"),
    (["--stages", "two"], "two"),
    (["--batch-size", "30", "--microbatches", "8"], "--batch-size 32"),
    (["--width", "7"], "--width 8"),
    (["--steps", "0"], "--steps 0"),
    (["--gantt", "g.txt"], "g.txt"),
    (["--no-such-flag"], "--no-such-flag"),
    (["--worker-env", "MALLOC_ARENA_MAX"], "'MALLOC_ARENA_MAX' must read KEY=VALUE"),
])
def test_bad_flags_exit_2_with_one_line(args, names, capsys):
    assert run_main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert names in err[0] and "error" in err[0]


def test_torch_worker_runs_splits_from_the_same_weights_and_leaves_no_process(tmp_path):
    """Same seed, weights and batch as brigade: torch's first loss is what one process
    computes; both schedules record compute spans on both ranks; nothing outlives close()."""
    from torch import nn

    cfg = rs.BenchConfig(models=("resnet18",), shapes=("cifar",), stages=(2,), microbatches=2,
                         batch_size=4, width=4, warmup=1, window=2)
    model = rs.make_model(cfg, "resnet18", "cifar")
    x, y = rs.make_batch(cfg, "cifar", 4)
    want = sum(nn.functional.cross_entropy(model(xc), yc).item()
               for xc, yc in zip(x.chunk(2), y.chunk(2))) / 2
    with rs.TorchPeer(tmp_path / "peer", nproc=2, timeout_s=120) as peer:
        for schedule, balance in (("1f1b", [5, 5]), ("interleaved", [3, 2, 2, 3])):
            built = peer.call("build", config=measure._config_dict(cfg), model="resnet18",
                              shape="cifar", schedule=schedule, balance=balance, warmup=1)
            assert built["first_loss"] == pytest.approx(want, rel=1e-4)
            res = peer.call("run", steps=2)
            assert len(res["wall"]) == 2 and all(w > 0 for w in res["wall"])
            kinds = {(e[0], e[2]) for e in res["events"]}
            assert {(0, "F"), (0, "B"), (1, "F"), (1, "B"), (0, "U"), (1, "U")} <= kinds
            stages = {e[1] for e in res["events"]}
            assert stages == set(range(len(balance)))  # interleaved: 2 chunks per rank
            # brigade's torchrun backend on the same ranks: same first loss, a timeline
            built = peer.call("build", runner="brigade", config=measure._config_dict(cfg),
                              model="resnet18", shape="cifar", schedule=schedule,
                              balance=balance, warmup=1)
            assert built["first_loss"] == pytest.approx(want, rel=1e-4)
            res = peer.call("run", runner="brigade", steps=2)
            assert len(res["wall"]) == 2 and all(w > 0 for w in res["wall"])
            tl = Timeline.from_json(res["timeline"])
            assert tl.meta["backend"] == "torchrun" and tl.meta["steps"] == 2
            assert {(e.worker, e.kind) for e in tl.compute_events()} >= {
                (0, "F"), (0, "B"), (1, "F"), (1, "B")}
            # the split profiled in place: every compute action of 2 steps, timed on both
            # ranks, and nothing waited for
            prof = Timeline.from_json(peer.call("profile", runner="brigade", steps=2)["profile"])
            assert prof.meta["source"] == "profiled" and prof.meta["steps"] == 2
            assert sorted((e.stage, e.kind) for e in prof.compute_events()) == \
                sorted((e.stage, e.kind) for e in tl.compute_events())
            assert not [e for e in prof.events if e.category == "wait"]
        with pytest.raises(rs.TorchPeerError, match="unknown command 'run' for runner 'nobody'"):
            peer.call("run", runner="nobody", steps=1)
        pids = [peer.pid, *descendants(peer.pid)]
        assert len(pids) >= 3  # torchrun and its two ranks
    assert wait_gone(pids, 15)
    assert with_cmdline(str(tmp_path / "peer")) == []


def test_in_place_prediction_uses_the_profiles_costs_and_the_rounds_latency():
    """A profile whose actions cost what the round's did predicts what the round's own
    spans predict (the calibrated figure); a profile twice as slow, a slower round; and the
    profile's latency (0: it never waits) is replaced by the round's."""
    from brigade import schedulers

    costs = schedulers.Costs(f=[2e-3, 3e-3], b=[4e-3, 6e-3], u=[1e-3, 1e-3], latency=5e-4)
    sched = schedulers.build("1f1b", stages=2, microbatches=4, steps=2)
    run = schedulers.simulate(sched, costs)
    quiet = schedulers.simulate(sched, replace(costs, latency=0.0))
    assert measure._in_place_step(run, quiet, 2) == pytest.approx(measure._predicted_step(run, 2))
    slow = schedulers.simulate(sched, replace(costs, f=[4e-3, 6e-3], b=[8e-3, 12e-3],
                                              u=[2e-3, 2e-3], latency=0.0))
    assert measure._in_place_step(run, slow, 2) > 1.8 * measure._predicted_step(run, 2)


def test_in_place_error_is_the_rounds_time_together():
    """Rounds measured at 1, 2 and 6 s per step against 2 s predicted for each: the rounds'
    time together (9 s against 6 s: 1.5), not the median round's ratio (1.0), so a round
    whose profile caught the host fast or slow counts by its time."""
    cfg = rs.BenchConfig(**rs.QUICK)
    tally = measure._Tally(step_times=[1.0, 2.0, 6.0], rounds=[1.0, 2.0, 6.0],
                      in_place=[2.0, 2.0, 2.0], steps=3)
    row = measure._measured_row(cfg, "resnet18", "1f1b", "brigade", tally, [5, 5])
    assert row["in_place_over_measured_rounds"] == [0.5, 1.0, 3.0]
    assert row["in_place_over_measured"] == pytest.approx(1.5)
    assert row["in_place_samples_per_s"] == pytest.approx(cfg.batch_size / 2.0)


@pytest.mark.slow
@pytest.mark.ray
def test_tiny_measured_run_compares_both_runners_and_stops_everything(tmp_path):
    """Brigade on Ray and torch under torchrun, side by side; Ray and the ranks are gone after."""
    ray = pytest.importorskip("ray")
    had_ray = ray.is_initialized()
    out, png = tmp_path / "rows.json", tmp_path / "g.png"
    assert run_main(["--quick", "--models", "resnet18", "--schedules", "1f1b,dni",
                     "--json", str(out), "--gantt", str(png)]) == 0
    rows = json.loads(out.read_text())
    by = {(r["runner"], r.get("backend"), r["schedule"]): r for r in rows}
    assert set(by) == {("simulated", None, "1f1b"), ("simulated", None, "dni"),
                       ("brigade", "ray", "1f1b"), ("brigade", "ray", "dni"),
                       ("brigade", "torchrun", "1f1b"), ("brigade", "torchrun", "dni"),
                       ("torch", None, "1f1b")}
    for r in rows:
        check_row(r)
    for backend in ("ray", "torchrun"):
        for s in ("1f1b", "dni"):
            b = by[("brigade", backend, s)]
            assert b["torch_schedule"] == "1f1b" and b["torch_step_time_s"] > 0
            assert b["ratio_vs_torch"] == pytest.approx(b["step_time_s"] / b["torch_step_time_s"])
            if s == "1f1b":  # measured beside the torch row of the same split and schedule
                assert b["torch_step_time_s"] == pytest.approx(
                    by[("torch", None, "1f1b")]["step_time_s"])
            assert b["predicted_samples_per_s"] == pytest.approx(
                by[("simulated", None, s)]["samples_per_s"])
            assert b["steps_timed"] == 2
            # on Ray a round is one run of its 2 steps (one figure); on the ranks a flush
            # schedule's steps are timed one by one between barriers, as torch's are
            one_run = backend == "ray" or s == "dni"
            assert len(b["step_times_s"]) == (1 if one_run else 2)
            assert b["calibrated_samples_per_s"] > 0  # the round re-simulated with its own costs
            # and from an in-place profile taken right before each round, with the
            # round's latency
            assert len(b["in_place_over_measured_rounds"]) == 1  # --quick: one round
            # (how rounds combine: test_in_place_error_is_the_rounds_time_together)
            assert b["in_place_samples_per_s"] > 0
        checks = [c["check"] for c in rs.target_checks(rows) if backend in c["check"]]
        assert sum("simulated (in-place profile) / measured" in c for c in checks) == 2, checks
        # same weights, same batch: every runner starts from the same loss
        assert by[("brigade", backend, "1f1b")]["first_loss"] == pytest.approx(
            by[("torch", None, "1f1b")]["first_loss"], rel=1e-4)
    assert with_cmdline("--torch-worker") == [] or wait_gone(with_cmdline("--torch-worker"), 10)
    assert ray.is_initialized() == had_ray


def test_decoupled_target_names_what_removing_the_flush_can_gain():
    """The 1.3x target beside its ceiling: a decoupled schedule's gain over a flushed one is
    the flush, (m+p-1)/m of the work on balanced stages (1.125x at p=2, m=8)."""
    row = {"runner": "brigade", "model": "resnet18", "schedule": "dni", "backend": "ray",
           "microbatches": 8, "stages": 2, "torch_step_time_s": 1.0, "step_time_s": 0.9}
    (check,) = rs.target_checks([row])
    assert check["value"] == pytest.approx(1 / 0.9) and not check["met"]
    assert "(m+p-1)/m = 1.125x at p=2, m=8" in check["note"]
    row.update(microbatches=2, stages=4)
    assert "= 2.500x at p=4, m=2" in rs.target_checks([row])[0]["note"]


def test_dgl_costs_charge_the_heads_backward_to_f_and_send_nothing_back():
    """DGL's F is the forward, the head's loss and its backward: dearer than backprop's F on
    the same stage, and no B, I, W or R (nothing comes back from the next stage)."""
    from resnet_bench.costs import stage_costs
    from resnet_bench.profiling import make_model, profile_model

    cfg = rs.BenchConfig(**{**rs.QUICK, "models": ("resnet18",), "repeats": 3})
    mp = profile_model(cfg, "resnet18", "cifar")
    model = make_model(cfg, "resnet18", "cifar")
    bp, dgl = (stage_costs(cfg, mp, model, 2, rule) for rule in ("backprop", "dgl"))
    assert dgl.balance == bp.balance
    for s in (0, 1):  # the backward inside (the last stage's on its real loss): ~2.5x
        assert dgl.costs.f[s] > 1.5 * bp.costs.f[s], (s, dgl.costs.f, bp.costs.f)
    assert bp.costs.b is not None and dgl.costs.b is None and dgl.costs.r is None
    assert dgl.costs.sg == 0.0  # no synthesizer: no T
